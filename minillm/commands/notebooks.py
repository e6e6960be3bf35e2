"""``python -m minillm notebooks``: execute the chapter notebooks and save them with their outputs and figures.

::

    python -m minillm notebooks                 # every notebook, full size, outputs saved in place
    python -m minillm notebooks --only ch06,ch07
    python -m minillm notebooks --quick --out /tmp/nb   # the tiny configuration, saved elsewhere

Each notebook runs top to bottom in a fresh kernel started in ``notebooks/`` (as Jupyter would), and is written
back only when every cell ran: a notebook that fails keeps its committed outputs, and the error names the cell.
A run with ``--quick`` never writes over the committed notebooks unless ``--out`` says where to write.
"""

from __future__ import annotations

import os
import pathlib
import time
from dataclasses import dataclass, field

from minillm import MinillmError
from minillm.config import QuickConfig
from minillm.files import atomic_write_text

NOTEBOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent.parent / "notebooks"


@dataclass
class NotebooksConfig(QuickConfig):
    """Execute the chapter notebooks and save them with their outputs, so that they show results unrun."""

    only: str = field(default="", metadata={"help": "comma-separated chapters to run, e.g. 'ch06,ch07' (default: all)"})
    out: str = field(default="", metadata={"help": "folder to write the executed notebooks to (default: in place; "
                                                   "required with --quick, so quick outputs never replace real ones)"})
    timeout: int = field(default=7200, metadata={"help": "seconds one cell may run before the notebook fails"})

    def validate(self):
        if self.timeout < 1:
            raise ValueError(f"--timeout must be at least 1 second, got {self.timeout}")
        if self.quick and not self.out:
            raise ValueError("--quick needs --out: quick outputs must not replace the committed notebooks' real ones")


def selected_notebooks(only: str, folder: pathlib.Path = NOTEBOOKS_DIR) -> list[pathlib.Path]:
    """The notebooks ``--only`` names (by their chNN prefix or full name), in chapter order; all by default."""
    notebooks = sorted(folder.glob("ch[0-9][0-9]_*.ipynb"))
    if not notebooks:
        raise MinillmError(f"no chapter notebooks in {folder}: run this from a clone of the repository")
    if not only:
        return notebooks
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if not any(path.stem.startswith(name) for path in notebooks)]
    if unknown:
        raise MinillmError(f"no notebook matches {', '.join(unknown)}: choose from "
                           f"{', '.join(path.stem.split('_')[0] for path in notebooks)}")
    return [path for path in notebooks if any(path.stem.startswith(name) for name in wanted)]


def execute_notebook(path: pathlib.Path, out: pathlib.Path, timeout: int, quick: bool) -> float:
    """Run ``path`` in a fresh kernel started in its folder and write it, with outputs, to ``out``; seconds taken."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = nbformat.read(path, as_version=4)
    environment = os.environ.copy()
    os.environ["MINILLM_QUICK"] = "1" if quick else "0"  # the kernel inherits this process's environment
    start = time.perf_counter()
    try:
        NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(path.parent)}}).execute()
    except CellExecutionError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "a cell failed"
        raise MinillmError(f"{path.name} stopped at a cell that raised ({first_line[:200]}); "
                           f"{out} is unchanged") from None
    finally:
        os.environ.clear()
        os.environ.update(environment)
    seconds = time.perf_counter() - start
    stamp_execution(notebook, seconds, quick)
    atomic_write_text(out, nbformat.writes(notebook) + "\n")
    return seconds


EXECUTION_NOTE = "execution-note"  # the tag of the markdown cell that says where a notebook's outputs come from


def stamp_execution(notebook, seconds: float, quick: bool) -> None:
    """Say, in the notebook's last cell, where its saved outputs come from: the machine, the date, the command."""
    import datetime

    import nbformat
    import torch

    machine = (f"an {torch.cuda.get_device_name(0)} GPU" if torch.cuda.is_available()
               else f"a {os.cpu_count()}-core CPU without a GPU")
    size = "the quick configuration" if quick else "its full configuration"
    text = (f"*The outputs above come from one run of {size} on {machine}, "
            f"{datetime.date.today().isoformat()}, {seconds / 60:.1f} minutes, saved by `python -m minillm notebooks`.*")
    notebook.cells = [cell for cell in notebook.cells if EXECUTION_NOTE not in cell.get("metadata", {}).get("tags", [])]
    notebook.cells.append(nbformat.v4.new_markdown_cell(text, metadata={"tags": [EXECUTION_NOTE]}))


def run_notebooks(config: NotebooksConfig) -> list[pathlib.Path]:
    """Execute the selected notebooks one after another; return the files written."""
    notebooks = selected_notebooks(config.only)
    out_dir = pathlib.Path(config.out) if config.out else None
    written = []
    for index, path in enumerate(notebooks, start=1):
        target = (out_dir / path.name) if out_dir else path
        print(f"[{index}/{len(notebooks)}] {path.name} ...", flush=True)
        seconds = execute_notebook(path, target, config.timeout, config.quick)
        print(f"    saved {target} ({seconds:.0f} s)", flush=True)
        written.append(target)
    return written
