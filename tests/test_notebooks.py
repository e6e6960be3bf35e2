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
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the failing cell and traceback, on any error
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors
