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


def relative_links(text):
    """The targets of a Markdown text's relative links and images, without their #anchors."""
    return [target for target in re.findall(r"\]\(([^)#\s]*)(?:#[^)\s]*)?\)", text)
            if target and not target.startswith(("http://", "https://", "mailto:"))]


def test_every_image_and_link_in_the_readme_and_docs_exists():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    assert len(pages) > 1, "docs/ holds the chapter pages the README links"
    for page in pages:
        for target in relative_links(page.read_text(encoding="utf-8")):
            assert (page.parent / target).exists(), f"{page.relative_to(REPO_ROOT)} links to {target}, which does not exist"


def heading_anchors(text):
    """The #anchors GitHub gives a Markdown file's headings (lower case, punctuation dropped, spaces to -)."""
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # a "# comment" in a code block is no heading
    return {re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
            for title in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def test_every_anchor_link_in_the_readme_and_docs_names_a_heading():
    pages = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", page.read_text(encoding="utf-8")):
            linked = (page.parent / target) if target else page
            assert anchor in heading_anchors(linked.read_text(encoding="utf-8")), f"{page.name} links to {target}#{anchor}"
