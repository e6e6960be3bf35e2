"""Files written so that nothing is ever half-written: temp file, fsync, rename; and JSON.

``os.replace`` is atomic on POSIX and Windows, so a run killed mid-write leaves either the old
file or the new one, never half of one. Every JSON file minillm writes (configs, results, logs'
summaries, tokenizers' metadata) goes through :func:`write_json`.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from typing import Any


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        pathlib.Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> pathlib.Path:
    """Write ``obj`` as indented JSON, atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    return json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
