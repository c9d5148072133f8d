"""Output paths: folders made on demand, files replaced atomically.

What the CLI commands and the library write goes through here, so a bad
output path is one clear ``OutputPathError`` (not an ``OSError`` traceback)
and no reader ever sees a half-written file under the final name.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["OutputPathError", "atomic_write_text", "check_file", "check_folder", "ensure_folder", "ensure_parent"]


class OutputPathError(ValueError):
    """An output path that cannot be used: ``str(e) == f"{path}: {problem}"``."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self):
        return (type(self), (self.path, self.problem))


def check_folder(path) -> Path:
    """``OutputPathError`` if ``path`` could not be made a folder (it, or a parent, is a file); makes nothing."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputPathError(p, "is a file, not a folder")
    blocker = next((q for q in p.parents if q.exists() and not q.is_dir()), None)
    if blocker is not None:
        raise OutputPathError(p, f"cannot make this folder: {blocker} is a file")
    return p


def check_file(path) -> Path:
    """``OutputPathError`` if ``path`` could not be written as a file (it is a folder, or its folder
    cannot be made); makes nothing."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(p, "is a folder; give a file name")
    check_folder(p.parent)
    return p


def ensure_folder(path) -> Path:
    """Make the folder ``path`` (and its parents) if needed; ``OutputPathError`` if it cannot be one."""
    p = check_folder(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(p, f"cannot make this folder ({e.strerror})") from None
    return p


def ensure_parent(path) -> Path:
    """Make the folder a file ``path`` goes into; ``OutputPathError`` if ``path`` is a folder."""
    p = check_file(path)
    ensure_folder(p.parent)
    return p


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
