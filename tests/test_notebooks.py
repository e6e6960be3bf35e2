"""Every notebook executes top to bottom in its quick configuration (MINILLM_QUICK=1)."""

from __future__ import annotations

import nbformat
import pytest
from conftest import REPO_ROOT
from nbclient import NotebookClient

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


def test_every_chapter_script_has_a_notebook():
    scripts = {p.stem for p in (REPO_ROOT / "chapters").glob("ch[0-9][0-9]_*.py")}
    assert scripts and scripts <= {p.stem for p in NOTEBOOKS}


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes_top_to_bottom(path, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_QUICK", "1")  # inherited by the kernel process
    monkeypatch.setenv("MINILLM_RUNS_DIR", str(tmp_path / "runs"))  # the notebooks' runs, not the repository's
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors


def test_notebooks_find_the_repositorys_runs_folder_whatever_folder_they_start_in(tmp_path):
    """Jupyter may start in notebooks/ or anywhere else: runs.runs_dir() is <repository>/runs all the same."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "MINILLM_RUNS_DIR"}
    env["PYTHONPATH"] = str(REPO_ROOT)  # this checkout's minillm, whichever one the environment installed
    for folder in (REPO_ROOT / "notebooks", tmp_path):
        printed = subprocess.run([sys.executable, "-c", "from minillm import runs; print(runs.runs_dir())"], cwd=folder,
                                 env=env, capture_output=True, text=True, check=True).stdout.strip()
        assert printed == str(REPO_ROOT / "runs")
    env["MINILLM_RUNS_DIR"] = str(tmp_path / "elsewhere")
    printed = subprocess.run([sys.executable, "-c", "from minillm import runs; print(runs.runs_dir())"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert printed == str(tmp_path / "elsewhere")


def test_no_notebook_writes_runs_relative_to_the_folder_it_started_in():
    for path in NOTEBOOKS:
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type == "code":
                assert '"runs/' not in cell.source and "'runs/" not in cell.source, f"{path.name}: use RUNS (runs.runs_dir())"


def test_the_notebooks_command_selects_by_chapter_and_refuses_unknown_ones_and_quick_in_place(capsys):
    from minillm import MinillmError
    from minillm.__main__ import main
    from minillm.commands.notebooks import selected_notebooks

    assert [p.stem for p in selected_notebooks("ch06,ch01")] == ["ch01_hello_pytorch", "ch06_gpt"]
    assert len(selected_notebooks("")) == len(NOTEBOOKS)
    with pytest.raises(MinillmError, match="no notebook matches ch99"):
        selected_notebooks("ch01,ch99")
    with pytest.raises(SystemExit) as exit_info:
        main(["notebooks", "--quick"])  # quick outputs must never replace the committed notebooks
    assert exit_info.value.code == 2 and "--quick needs --out" in capsys.readouterr().err


@pytest.mark.slow
def test_the_notebooks_command_saves_an_executed_notebook_with_its_outputs_and_figures(tmp_path, monkeypatch):
    from minillm.__main__ import main

    monkeypatch.setenv("MINILLM_RUNS_DIR", str(tmp_path / "runs"))
    before = (REPO_ROOT / "notebooks" / "ch01_hello_pytorch.ipynb").read_bytes()
    assert main(["notebooks", "--quick", "--only", "ch01", "--out", str(tmp_path)]) == 0
    executed = nbformat.read(tmp_path / "ch01_hello_pytorch.ipynb", as_version=4)
    code = [cell for cell in executed.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code)
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # its figures are in the file
    assert (REPO_ROOT / "notebooks" / "ch01_hello_pytorch.ipynb").read_bytes() == before  # the committed one untouched


# Notebooks committed executed, with the outputs and figures of a real run (python -m minillm notebooks), so that
# they show their results on GitHub unrun. Every chapter joins this set once its full run is saved.
EXECUTED = {"ch01_hello_pytorch", "ch02_gradient_descent", "ch03_tokenization", "ch04_attention", "ch05_transformer",
            "ch06_gpt", "ch07_bert", "ch08_finetune", "ch09_efficient", "ch10_contrastive", "ch11_scaling",
            "ch12_deployment"}


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem in EXECUTED], ids=lambda p: p.stem)
def test_a_committed_notebook_keeps_its_outputs_figures_and_where_they_come_from(path):
    notebook = nbformat.read(path, as_version=4)
    again = f"run python -m minillm notebooks --only {path.stem.split('_')[0]} and commit the result"
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), f"{path.name} has cells that were not run: {again}"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"], f"{path.name} saved an error: {again}"
    assert any("image/png" in output.get("data", {}) for output in outputs), f"{path.name} shows no figure: {again}"
    assert "execution-note" in notebook.cells[-1].get("metadata", {}).get("tags", []), f"{path.name}: {again}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_ends_with_exercises_whose_solutions_are_collapsed_and_checked(path):
    cells = nbformat.read(path, as_version=4).cells
    assert any(cell.cell_type == "markdown" and "## Exercises" in cell.source for cell in cells), path.name
    solutions = [cell for cell in cells if "solution" in cell.get("metadata", {}).get("tags", [])]
    assert len(solutions) >= 3, f"{path.name}: {len(solutions)} solution cells"
    for cell in solutions:
        assert cell.cell_type == "code" and cell.metadata.get("jupyter", {}).get("source_hidden"), path.name
        assert "assert " in cell.source, f"{path.name}: a solution that checks nothing cannot fail"
