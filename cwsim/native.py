"""Which compiled modules the simulator runs (``setup.py`` builds them with Cython).

Each compiled class has a Python twin that specifies it: ``cwsim.free_queue.PyFreeBlockQueue`` for
``cwsim._free_queue.FreeBlockQueue``. The package uses the compiled class where the build made it,
and the Python one where it did not (no C compiler) or where ``CWSIM_PURE_PYTHON=1`` is set in the
environment when ``cwsim`` is first imported: the results are the same, bit for bit, only slower.
``available()`` lists what was built; ``in_use()`` what runs.
"""

from __future__ import annotations

import importlib
import os

#: the compiled modules, each with the Python module whose class it replaces
MODULES = {"cwsim._free_queue": "cwsim.free_queue", "cwsim._block_pool": "cwsim.block_pool",
           "cwsim._hashing": "cwsim.hashing", "cwsim._kv_cache_manager": "cwsim.kv_cache_manager"}

#: set (to anything but "" or "0") when ``cwsim`` is imported: run the Python classes only
PURE_PYTHON_ENV = "CWSIM_PURE_PYTHON"


def wanted() -> bool:
    """Whether the compiled classes are to be used (``CWSIM_PURE_PYTHON`` unset)."""
    return os.environ.get(PURE_PYTHON_ENV, "") in ("", "0")


def load(name: str):
    """The compiled module ``name``, or None when it was not built or is not wanted."""
    if not wanted():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def available() -> list[str]:
    """The compiled modules that were built (whatever ``CWSIM_PURE_PYTHON`` says)."""
    out = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
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
