"""Which compiled modules the simulator runs (``setup.py`` builds them with Cython).

Each compiled class has a Python twin that specifies it: ``cwsim.free_queue.PyFreeBlockQueue`` for
``cwsim._free_queue.FreeBlockQueue``. The package uses the compiled class where the build made it,
and the Python one where it did not (no C compiler) or where ``CWSIM_PURE_PYTHON=1`` is set in the
environment when ``cwsim`` is first imported: the results are the same, bit for bit, only slower.
``available()`` lists what was built; ``in_use()`` what runs.

A compiled module records the digest of the sources it was compiled from (``source_digest``: every
``cwsim/_*.pyx``, ``.pxd`` and ``.pxi``). In a source checkout whose sources have changed since (a
pull or an edit without ``pip install -e .`` again), the modules are stale: they are not used, with
a warning, and the Python twins run, so a stale build never gives results of code that is gone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
import warnings
from pathlib import Path

#: the compiled modules, each with the Python module whose class it replaces
MODULES = {"cwsim._free_queue": "cwsim.free_queue", "cwsim._block_pool": "cwsim.block_pool",
           "cwsim._hashing": "cwsim.hashing", "cwsim._kv_cache_manager": "cwsim.kv_cache_manager",
           "cwsim._metrics": "cwsim.metrics"}

#: set (to anything but "" or "0") when ``cwsim`` is imported: run the Python classes only
PURE_PYTHON_ENV = "CWSIM_PURE_PYTHON"


def wanted() -> bool:
    """Whether the compiled classes are to be used (``CWSIM_PURE_PYTHON`` unset)."""
    return os.environ.get(PURE_PYTHON_ENV, "") in ("", "0")


#: where the compiled modules' sources lie in a source checkout (an installed wheel has none)
SOURCES = Path(__file__).resolve().parent


def source_digest(folder: Path = SOURCES) -> str:
    """SHA-256 over the compiled modules' sources in ``folder`` (names and bytes), "" if there are none.
    ``setup.py`` compiles it into each module (``SOURCE_DIGEST``)."""
    h = hashlib.sha256()
    files = sorted(p for p in folder.glob("_*.p*") if p.suffix in (".pyx", ".pxd", ".pxi"))
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest() if files else ""


@functools.cache
def _current_digest() -> str:
    return source_digest()


def stale(module) -> bool:
    """Whether a compiled ``module`` was built from other sources than the checkout now holds."""
    current = _current_digest()
    return bool(current) and getattr(module, "SOURCE_DIGEST", "") != current


def load(name: str):
    """The compiled module ``name``, or None when it was not built, is stale (with a warning) or is
    not wanted."""
    if not wanted():
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    if stale(module):
        _warn_stale()
        return None
    return module


@functools.cache
def _warn_stale() -> None:
    """Once a process: the compiled modules are stale."""
    warnings.warn(f"the compiled modules were built from other sources than {SOURCES}/_*.pyx now hold: running "
                  "their Python twins (slower, same results); run `pip install -e .` again to rebuild",
                  RuntimeWarning, stacklevel=3)


def available() -> list[str]:
    """The compiled modules that were built from the current sources (whatever ``CWSIM_PURE_PYTHON``
    says)."""
    out = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if not stale(module):
            out.append(name)
    return out


def in_use() -> dict[str, str]:
    """Per Python module with a compiled twin: the module whose class the simulator runs."""
    out = {}
    for name, py in MODULES.items():
        mod = importlib.import_module(py)
        out[py] = name if getattr(mod, "NATIVE", False) else py
    return out


def describe() -> str:
    """One line for a benchmark's output: the compiled modules that run, or that none do."""
    running = sorted(name for py, name in in_use().items() if name != py)
    return f"compiled: {', '.join(running)}" if running else "compiled: none (the Python twins run)"
