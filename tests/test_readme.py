"""The README's promises: CI runs its test command verbatim, and the files it shows exist."""

import re

from conftest import REPO_ROOT

README = (REPO_ROOT / "README.md").read_text(encoding="utf-8")


def readme_commands():
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", README, flags=re.DOTALL).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_gives_exactly_two_commands_that_set_up_and_run():
    main_job, tests = readme_commands()
    assert main_job.endswith("python -m minillm pipeline")
    assert tests.endswith("python -m pytest")
    assert main_job.split("&&")[:-1] == tests.split("&&")[:-1]  # the same setup


def test_ci_runs_the_readme_test_command_verbatim():
    ci_lines = [line for line in (REPO_ROOT / ".ci" / "run").read_text().splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert ci_lines == [readme_commands()[1]]


def test_every_image_and_link_in_the_readme_exists():
    for target in re.findall(r"\]\(((?!https?://)[^)#]+)\)", README):
        assert (REPO_ROOT / target).exists(), target
