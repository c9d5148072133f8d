"""Importers from public trace formats into trace format v1, behind one registry.

Each importer module has ``convert(...) -> (calls, report)`` (the report has
``files_read, sessions, calls, rejected, render()``) and a provenance header.
:func:`run_import` is what ``cwsim import`` calls.
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


def _expand(sources: list[Path]) -> list[Path]:
    """Folders stand for the ``.jsonl`` / ``.jsonl.gz`` files in them (sorted)."""
    out: list[Path] = []
    for s in sources:
        out += sorted(p for p in s.rglob("*") if p.name.endswith((".jsonl", ".jsonl.gz"))) if s.is_dir() else [s]
    return out


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
    if fmt == "mini-swe-agent":
        calls, report = mod.convert(mod.find_trajectories(sources))
        header = {"source": mod.DEFAULT_SOURCE, "license": mod.DEFAULT_LICENSE, "converted_by": mod.CONVERTED_BY}
    elif fmt == "swe-agent":
        calls, report = mod.convert(mod.find_trajectories(sources))
        header = dict(mod.HEADER)
    elif fmt in ("tracelab", "mooncake"):
        calls, report = mod.convert(_expand(sources), progress=progress)
        header = dict(mod.HEADER)
    else:
        calls, report = mod.convert(sources)
        header = dict(mod.HEADER)
    header.update(sessions=report.sessions, calls=report.calls)
    return calls, report, header
