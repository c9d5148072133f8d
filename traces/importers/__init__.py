"""Importers from public trace formats into trace format v1, behind one registry.

Every importer module has the same surface (see :mod:`traces.importers.common`):
``find(sources) -> paths`` (folders searched for the format's files),
``convert(paths, progress=None) -> (calls, report)`` (the report has
``files_read, sessions, calls, rejected, render()``) and ``header()`` (the
provenance header). :func:`run_import` is what ``cwsim import`` calls.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ImporterSpec:
    name: str
    module: str
    description: str


IMPORTERS: dict[str, ImporterSpec] = {
    s.name: s
    for s in [
        ImporterSpec("mini-swe-agent", "traces.importers.miniswe", "mini-swe-agent .traj.json trajectories (one session per file)"),
        ImporterSpec("swe-agent", "traces.importers.sweagent", "SWE-agent .traj trajectories"),
        ImporterSpec("tracelab", "traces.importers.tracelab", "TraceLab rounds (.jsonl / .jsonl.gz, e.g. syfi_coding_trace.jsonl.gz)"),
        ImporterSpec("mooncake", "traces.importers.mooncake", "Mooncake request traces (512-token hash_ids; sessions inferred)"),
        ImporterSpec("lmcache-agent", "traces.importers.lmcache_agent", "LMCache agent-trace proxy logs"),
    ]
}


def run_import(fmt: str, sources: Iterable[str | Path], progress: Callable[[int], None] | None = None):
    """Convert ``sources`` with the importer named ``fmt``: returns ``(calls, report, header)``."""
    try:
        spec = IMPORTERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; available: {', '.join(IMPORTERS)}") from None
    mod = importlib.import_module(spec.module)
    sources = [Path(s) for s in sources]
    for s in sources:
        if not s.exists():
            raise FileNotFoundError(f"{s}: no such file or directory")
    calls, report = mod.convert(mod.find(sources), progress=progress)
    header = mod.header()
    header.update(sessions=report.sessions, calls=report.calls)
    return calls, report, header
