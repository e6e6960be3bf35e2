"""Files written so that nothing is ever half-written: temp file, fsync, rename; and JSON.

``os.replace`` is atomic on POSIX and Windows, so a run killed mid-write leaves either the old
file or the new one, never half of one. Every JSON file minillm writes (configs, results, logs'
summaries, tokenizers' metadata) goes through :func:`write_json`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pathlib
import tempfile
from typing import Any, BinaryIO, Iterator

TEMP_SUFFIX = ".tmp"
"""A file being written is ``.<name>.<random>.tmp`` beside its final name until it is complete."""


def _file_mode() -> int:
    """The mode an ordinary ``open(path, "w")`` would give: 0o666 less the process's umask (often 0o644)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_replace(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """``with atomic_replace(path) as handle: handle.write(...)``: the bytes go to a temp file in the same
    folder, which is fsynced and renamed to ``path`` only when the block ends without an error; on any error
    (or Ctrl-C) the temp file is deleted and ``path`` keeps what it held. The file gets the permissions of an
    ordinary write (``mkstemp`` alone would make it readable by its owner only)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise


def temp_files_of(path: str | os.PathLike) -> list[pathlib.Path]:
    """Temp files :func:`atomic_replace` left for ``path`` when the process was killed mid-write (SIGKILL)."""
    path = pathlib.Path(path)
    return sorted(path.parent.glob(f".{glob.escape(path.name)}.*{TEMP_SUFFIX}"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_replace`)."""
    with atomic_replace(path) as handle:
        handle.write(data)
    return pathlib.Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))


def shown_path(path: str | os.PathLike) -> str:
    """``path`` as a message should show it: relative to the working directory when it lies below it (a log
    then names ``runs/x/eval.json``, not the user's home), otherwise as given."""
    path = pathlib.Path(path)
    try:
        return str(path.resolve().relative_to(pathlib.Path.cwd().resolve()))
    except ValueError:
        return str(path)
