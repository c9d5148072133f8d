"""Compare KV-cache policies on real coding-agent traces under increasing memory pressure.

What it runs
    Every (trace, pressure, policy) with ``cwsim.runner.simulate``:
    ``--agents`` concurrent sessions (default 16), and a KV pool of
    ``ceil(peak / pressure) + 1`` blocks (the ``+ 1`` is vLLM's null block),
    where ``peak`` is the trace's peak KV working set in blocks under the same
    number of agents (``cwsim.analysis.analyze(trace)["kv_working_set"]
    ["peak_blocks"]``, computed once per trace and cached in
    ``OUT/working_set.json``). Pressure 1 means the pool just holds the working
    set, pressure 4 that the working set is 4x the pool. Policies default to
    every entry of ``cwsim.policies.registry.POLICIES`` at run time (CacheWise's
    two halves are the separate policies ``cachewise-sched`` and
    ``cachewise-evict``).

    Ablation: ``cachewise`` with injected tool-call prediction error
    (``SimConfig.predictor_error``; idle predictions multiplied by
    ``exp(N(0, err))``) at the pressure where ``vllm`` has the most harmful
    evictions per call. Error 0 is the grid's own ``cachewise`` row.

Outputs (in ``--out``, default ``runs/compare``)
    ``results.csv``: one row per run, appended as each run finishes
    (``--resume`` skips rows already there; without it the file starts over).
    PNGs: ``evicted_blocks``, ``harmful_evictions``, ``prefix_hit_rate``,
    ``total_session_time``, ``p99_session_time``, ``evictions_vs_bound``
    against pressure (one line per policy) and ``predictor_error`` (the ablation, when there is one).
    ``ratios.csv`` (also printed): at the pressure where vllm has the most
    harmful evictions per call, each policy's ratio to vllm
    (``x_fewer_evictions`` = vllm / policy evicted blocks,
    ``x_fewer_harmful`` likewise for harmful evictions, ``x_faster`` = vllm /
    policy total session time) and its gap to the references
    (``evictions_vs_belady`` = policy / belady evicted blocks,
    ``time_vs_infinite`` = policy / infinite total session time,
    ``evictions_vs_bound`` = policy evicted blocks / the fewest any eviction
    order could have had under that run's own schedule). A last line checks
    ``cachewise`` against the paper's claims: >= 2.6x fewer evictions and
    >= 3.5x lower total session time than vllm, evictions within 25% of
    belady, and (issue 15) within 1.15x of its schedule's bound.

    The eviction bound (``cwsim.eviction_bound``; ``--no-bound`` skips it):
    every bounded run records its block references and releases, and Belady's
    MIN with pins on that stream gives ``bound_evicted_blocks`` (<= the run's
    ``evicted_blocks`` for every policy) and ``bound_remisses`` (beside the
    run's ``stream_remisses``), in ``results.csv`` and the figure
    ``evictions_vs_bound.png``; empty for ``infinite``.

How the runs run
    Each run is a point of a sweep (``cwsim.sweep.run_points``, folders in ``OUT/sweep/``, with
    the sweep's ``results.parquet``): in a process pool of ``--workers`` processes (default:
    every core), or as Ray tasks with ``--ray-address`` (``local``, ``auto`` or a cluster's
    address). A run's numbers do not depend on where it ran.

How to run (``experiments/compare_policies.py`` is this module's command line)
    .venv/bin/python experiments/compare_policies.py              # the headline comparison (10-20 min)
    .venv/bin/python experiments/compare_policies.py --workers 1  # in this process, one run at a time
    .venv/bin/python experiments/compare_policies.py --quick      # smoke run, well under a minute
    .venv/bin/python experiments/compare_policies.py --resume     # continue an interrupted run
    .venv/bin/python experiments/compare_policies.py --trace ../shared/data/traces/X.jsonl.gz --trace ...

From Python (notebooks): ``from cwsim import compare``; ``compare.main(["--quick", "--plain",
"--out", dir])`` or ``compare.run(..., plain=True)`` (``plain``: no progress bar, no colours: plain
text for notebooks and logs); ``load_results``, ``make_figures``, ``ratios`` and ``paper_check``
work on an existing ``results.csv``; ``find_results()`` is where a notebook looks for one.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.markup import escape
from rich.table import Table

from cwsim.analysis import analyze
from cwsim.config import SimConfig
from cwsim.runner import REPO
from cwsim.policies.registry import POLICIES
from cwsim.runner import DEFAULT_TRACE
from cwsim.sweep import SweepPoint, point_id, run_points
from traces.format import Trace
from traces.columnar import TraceTable, load_table

__all__ = ["BOUND_COLUMNS", "COLUMNS", "find_results", "load_results", "main", "make_figures", "paper_check", "ratios", "run",
           "write_outputs"]

COLUMNS = ["trace", "pressure", "kv_blocks", "policy", "predictor_error", "sessions", "requests", "evicted_blocks",
           "harmful_evictions", "harmful_per_call", "prefix_hit_rate", "recomputed_prompt_tokens", "preemptions",
           "total_session_time_s", "mean_session_time_s", "p99_session_time_s", "makespan_s", "wall_s",
           "bound_evicted_blocks", "evictions_vs_bound", "stream_remisses", "bound_remisses"]
#: the eviction bound's columns (``cwsim.eviction_bound``), empty for a run without one
BOUND_COLUMNS = COLUMNS[-4:]

DEFAULTS = {"pressures": "1,1.5,2,3,4", "policies": None, "agents": 16, "max_sessions": None,
            "predictor_errors": "0,0.5,1.0"}
QUICK = {"pressures": "1,2", "policies": "vllm,cachewise,belady,infinite", "agents": 8, "max_sessions": 8,
         "predictor_errors": "0"}

#: the paper's claims for cachewise against vllm / belady
CLAIM_FEWER_EVICTIONS = 2.6
CLAIM_FASTER = 3.5
CLAIM_BELADY_GAP = 1.25
#: issue 15's target: evictions within this factor of the bound under the policy's own schedule
CLAIM_BOUND_GAP = 1.15

#: (file column, figure title, y label)
FIGURES = [
    ("evicted_blocks", "Evicted KV blocks", "evicted blocks"),
    ("harmful_evictions", "Harmful evictions (evicted blocks requested again later)", "harmful evictions"),
    ("prefix_hit_rate", "Prefix cache hit rate (cached / prompt tokens)", "hit rate"),
    ("total_session_time_s", "Total session time (sum over sessions)", "seconds"),
    ("p99_session_time_s", "p99 session time", "seconds"),
    ("evictions_vs_bound", "Evicted blocks / the fewest any eviction order could have\n"
                           "under the same schedule (Belady's MIN on the run's references)", "evicted / bound"),
]
FIGURE_FILES = {"evicted_blocks": "evicted_blocks.png", "harmful_evictions": "harmful_evictions.png",
                "prefix_hit_rate": "prefix_hit_rate.png", "total_session_time_s": "total_session_time.png",
                "p99_session_time_s": "p99_session_time.png", "predictor_error": "predictor_error.png",
                "evictions_vs_bound": "evictions_vs_bound.png"}


#: one colour and marker per policy in the figures (more policies than the default colour cycle)
COLORS = colormaps["tab20"]
MARKERS = "os^vD<>ph*X"


# ------------------------------------------------------------------ helpers
def trace_name(path: str | Path) -> str:
    name = Path(path).name
    for suffix in (".gz", ".jsonl", ".json"):
        name = name.removesuffix(suffix)
    return name


def fmt_pressure(p: float) -> str:
    return f"{p:g}"


def parse_floats(text: str) -> list[float]:
    vals = [float(s) for s in text.split(",") if s.strip()]
    return sorted(dict.fromkeys(vals))


def apply_preset(args, preset: dict) -> None:
    """Fill the command-line arguments left unset (None) from a preset (``--quick`` or the defaults)."""
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)


def kv_blocks_for(peak_blocks: int, pressure: float) -> int:
    """Pool size that makes the peak working set ``pressure`` times the pool (plus the null block)."""
    return max(2, math.ceil(peak_blocks / pressure) + 1)


def truncate(trace: Trace | TraceTable, max_sessions: int | None) -> Trace | TraceTable:
    """The first ``max_sessions`` sessions, as ``simulate`` takes them (a table stays a table)."""
    if max_sessions is None or max_sessions >= len(trace.sessions):
        return trace
    if isinstance(trace, TraceTable):
        return TraceTable.from_sessions(trace.iter_sessions(max_sessions), header=trace.header, source=trace.source)
    return Trace(sessions=trace.sessions[:max_sessions], header=dict(trace.header), source=trace.source)


def peak_working_set(trace: Trace, name: str, agents: int, max_sessions: int | None, out: Path,
                     console: Console, block_size: int = 16, regime: str = "") -> int:
    """``analyze``'s peak KV working set in blocks of ``block_size``, cached in ``out/working_set.json``
    (``regime``: what else sets the trace's timing, e.g. ``gap_scale=10``, part of the cache key)."""
    cache_path = out / "working_set.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    key = f"{name}|agents={agents}|max_sessions={max_sessions}"
    if block_size != 16:
        key += f"|block_size={block_size}"
    if regime:
        key += f"|{regime}"
    if key not in cache:
        t0 = time.perf_counter()
        ws = analyze(trace, agents=agents, block_size=block_size, working_set=True)["kv_working_set"]
        cache[key] = int(ws["peak_blocks"])
        cache_path.write_text(json.dumps(cache, indent=2) + "\n")
        console.print(f"[dim]{name}: peak KV working set {cache[key]:,} blocks "
                      f"({agents} agents{', ' + regime if regime else ''}, {time.perf_counter() - t0:.1f} s)[/dim]")
    return cache[key]


def row_from(name: str, pressure: float, policy: str, err: float, summary: dict, kv_blocks: int) -> dict:
    req = summary["requests"]
    row = {
        "trace": name,
        "pressure": fmt_pressure(pressure),
        "kv_blocks": kv_blocks,
        "policy": policy,
        "predictor_error": err,
        "sessions": summary["sessions"],
        "requests": req,
        "evicted_blocks": summary["evicted_blocks"],
        "harmful_evictions": summary["harmful_evictions"],
        "harmful_per_call": round(summary["harmful_evictions"] / req, 6) if req else 0.0,
        "prefix_hit_rate": round(summary["prefix_hit_rate"], 6),
        "recomputed_prompt_tokens": summary["recomputed_prompt_tokens"],
        "preemptions": summary["preemptions"],
        "total_session_time_s": round(summary["total_session_time_s"], 4),
        "mean_session_time_s": round(summary["mean_session_time_s"], 4),
        "p99_session_time_s": round(summary["p99_session_time_s"], 4),
        "makespan_s": round(summary["makespan_s"], 4),
        "wall_s": round(summary["wall_s"], 3),
        **{k: summary.get(k) for k in BOUND_COLUMNS},  # (None without a bound)
    }
    if row["evictions_vs_bound"] is not None:
        row["evictions_vs_bound"] = round(row["evictions_vs_bound"], 4)
    return row


def row_key(row) -> tuple:
    return (str(row["trace"]), fmt_pressure(float(row["pressure"])), str(row["policy"]),
            float(row["predictor_error"]))


class ResultsFile:
    """``results.csv`` opened for appending one row at a time (flushed per row)."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        self.done: set[tuple] = set()
        if resume and path.exists() and path.stat().st_size:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != COLUMNS:
                    raise ValueError(f"{path}: written with other columns (an older version); "
                                     "rerun without --resume, or into another --out")
                self.done = {row_key(r) for r in reader}
        elif path.exists():
            path.unlink()
        new = not path.exists()
        self.f = path.open("a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=COLUMNS)
        if new:
            self.w.writeheader()
            self.f.flush()

    def add(self, row: dict) -> None:
        self.w.writerow(row)
        self.f.flush()
        self.done.add(row_key(row))

    def close(self) -> None:
        self.f.close()


def find_results(env: str = "CACHEWISE_RESULTS") -> Path | None:
    """The results folder a notebook shows: ``$CACHEWISE_RESULTS``, else the repository's
    ``runs/compare`` (the default ``--out``, from the repository root), if it holds a
    ``results.csv``; None otherwise. The same from any working folder."""
    import os

    for folder in (os.environ.get(env), REPO / "runs" / "compare"):
        if folder and (Path(folder) / "results.csv").is_file():
            return Path(folder)
    return None


def load_results(path: str | Path) -> pd.DataFrame:
    """``results.csv`` (or the folder holding it) as a DataFrame, pressure as float."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.csv"
    df = pd.read_csv(path, dtype={"trace": str, "policy": str})
    for col in BOUND_COLUMNS:  # results written before the bound existed
        if col not in df:
            df[col] = math.nan
    df["pressure"] = df["pressure"].astype(float)
    df["predictor_error"] = df["predictor_error"].astype(float)
    return df


def grid(df: pd.DataFrame) -> pd.DataFrame:
    """The main grid: every policy without injected prediction error."""
    return df.loc[df["predictor_error"] == 0]


def worst_pressure(df: pd.DataFrame, trace: str) -> float | None:
    """The pressure where vllm has the most harmful evictions per call (ties: the lowest pressure)."""
    v = grid(df)
    v = v.loc[(v["trace"] == trace) & (v["policy"] == "vllm")].sort_values("pressure")
    if v.empty:
        return None
    return float(v.loc[v["harmful_per_call"].idxmax(), "pressure"])


# ------------------------------------------------------------------ run
#: the sweep's folder in ``out``: one folder per run (``points/<id>/``) and ``results.parquet``
SWEEP_DIR = "sweep"


def run(traces: list[str | Path], policies: list[str], pressures: list[float], *, agents: int = 16,
        max_sessions: int | None = None, predictor_errors: list[float] = (0.0,), out: str | Path = "runs/compare",
        resume: bool = False, console: Console | None = None, plain: bool = False, workers: int | None = None,
        ray_address: str | None = None, bound: bool = True,
        predictor_trace: str | Path | None = None) -> pd.DataFrame:
    """Run the grid and the ablation, appending to ``out/results.csv``; return this run's rows (resumed ones too).

    The runs are points of a sweep (``cwsim.sweep.run_points``, in ``out/sweep/``): ``workers``
    processes (default: every core; 1: in this process), or Ray tasks with ``ray_address``
    (``local``, ``auto`` or a cluster's address), each run exactly as ``simulate`` alone would.
    ``bound``: each run also gives its eviction bound (``SimConfig.eviction_bound``).
    ``predictor_trace``: the policies that predict tool calls learn from this trace instead of the
    one they run on (train/test across traces); each trace's rows are then named
    ``<trace>@pred=<predictor trace>``, so they never mix with rows of a self-trained run.
    Without ``resume`` the earlier rows and sweep folders are cleared first. ``plain``: a line per
    run and no progress bar or colours (notebooks, logs)."""
    console = console or (_plain_console() if plain else Console())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; available: {', '.join(POLICIES)}")
    if predictor_trace is not None and not Path(predictor_trace).is_file():
        raise ValueError(f"--predictor-trace: no such file: {predictor_trace}")
    if not resume and (out / SWEEP_DIR).is_dir():
        shutil.rmtree(out / SWEEP_DIR)
    ablation_errors = [e for e in predictor_errors if e != 0]
    results = ResultsFile(out / "results.csv", resume)
    wanted: set[tuple] = set()
    failures: list[str] = []

    def run_all(progress, task, trace_path, trace, name, runs) -> None:
        """``runs``: (pressure, kv_blocks, policy, err) of one trace, run as one batch of sweep points."""
        points, meta = [], {}
        for pressure, kv_blocks, policy, err in runs:
            key = (name, fmt_pressure(pressure), policy, float(err))
            wanted.add(key)
            if key in results.done:
                progress.advance(task)
                continue
            values = {"trace": str(trace_path), "policy": policy, "kv_blocks": kv_blocks, "agents": agents,
                      "max_sessions": max_sessions, "predictor_error": float(err)}
            if bound:
                values["eviction_bound"] = True
            if predictor_trace is not None:
                values["predictor_trace"] = str(predictor_trace)
            config = SimConfig(policy=policy, kv_blocks=kv_blocks, agents=agents, max_sessions=max_sessions,
                               predictor_error=err, eviction_bound=bound,
                               predictor_trace=None if predictor_trace is None else str(predictor_trace))
            p = SweepPoint(point_id(values), values, config, Path(trace_path))
            points.append(p)
            meta[p.id] = (pressure, kv_blocks, policy, err)
        if not points:
            return

        def finished(done: int, total: int, row: dict) -> None:
            pressure, kv_blocks, policy, err = meta[row["point_id"]]
            label = f"{name} x{fmt_pressure(pressure)} {policy}" + (f" err={err:g}" if err else "")
            if row["status"] != "ok":
                failures.append(f"{label}: {row['error']}")
                progress.console.print(f"[red]FAILED {label}: {escape(str(row['error']))}[/red]")
            else:
                summary = json.loads((out / SWEEP_DIR / "points" / row["point_id"] / "summary.json").read_text())
                r = row_from(name, pressure, policy, err, summary, kv_blocks)
                results.add(r)
                progress.console.print(
                    f"{label:<40} kv={kv_blocks:>7,}  evicted={r['evicted_blocks']:>9,}  "
                    f"harmful={r['harmful_evictions']:>8,}  hit={r['prefix_hit_rate']:.3f}  "
                    f"total={r['total_session_time_s']:>9,.0f}s  p99={r['p99_session_time_s']:>7,.0f}s  "
                    + (f"evicted/bound={r['evictions_vs_bound']:.2f}x  " if r["evictions_vs_bound"] is not None else "")
                    + f"({r['wall_s']:.1f}s wall)")
            progress.advance(task)

        run_points(points, out / SWEEP_DIR, workers, ray_address, finished, traces={str(trace_path): trace})

    n_runs = len(traces) * (len(pressures) * len(policies) + len(ablation_errors))
    try:
        bar = _NoProgress(console) if plain else Progress(
            TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console)
        with bar as progress:
            task = progress.add_task("runs", total=n_runs)
            for path in traces:
                name = trace_name(path) + ("" if predictor_trace is None else f"@pred={trace_name(predictor_trace)}")
                progress.update(task, description=name)
                trace = load_table(path)
                peak = peak_working_set(truncate(trace, max_sessions), trace_name(path), agents, max_sessions, out,
                                        progress.console)
                run_all(progress, task, path, trace, name,
                        [(p, kv_blocks_for(peak, p), policy, 0.0) for p in pressures for policy in policies])
                if ablation_errors:
                    p_star = worst_pressure(load_results(out), name)
                    if p_star is None:  # no vllm in the grid: use the highest pressure
                        p_star = max(pressures)
                    kv = kv_blocks_for(peak, p_star)
                    errs = list(ablation_errors)
                    if "cachewise" not in policies:  # the ablation's error-0 baseline
                        progress.update(task, total=progress.tasks[task].total + 1)
                        errs.insert(0, 0.0)
                    run_all(progress, task, path, trace, name, [(p_star, kv, "cachewise", e) for e in errs])
    finally:
        results.close()
    if failures:
        console.print(f"[red]{len(failures)} run(s) failed:[/red]\n" + "\n".join(map(escape, failures)))
    df = load_results(out)
    keep = df.apply(lambda r: row_key(r) in wanted, axis=1) if len(df) else pd.Series(dtype=bool)
    df = df.loc[keep].reset_index(drop=True)
    df.attrs["failures"] = failures
    return df


def _plain_console() -> Console:
    """Plain text on stdout: no colours, no terminal or Jupyter rendering."""
    return Console(no_color=True, force_terminal=False, force_jupyter=False, width=200, highlight=False)


class _NoProgress:
    """What ``run`` uses of ``rich.progress.Progress``, showing nothing."""

    def __init__(self, console: Console):
        self.console = console
        self.tasks: list[SimpleNamespace] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, description: str, total: float | None = None) -> int:
        self.tasks.append(SimpleNamespace(total=total))
        return len(self.tasks) - 1

    def update(self, task: int, total: float | None = None, **_) -> None:
        if total is not None:
            self.tasks[task].total = total

    def advance(self, task: int, n: float = 1) -> None:
        pass


# ------------------------------------------------------------------ analysis
def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Per trace, at vllm's worst pressure: each policy against vllm, belady and infinite."""
    rows = []
    for name in dict.fromkeys(df["trace"]):
        p_star = worst_pressure(df, name)
        if p_star is None:
            continue
        at = df.loc[(df["trace"] == name) & (df["pressure"] == p_star)]
        ref = grid(at).set_index("policy")
        vllm = ref.loc["vllm"]
        belady = ref.loc["belady"] if "belady" in ref.index else None
        infinite = ref.loc["infinite"] if "infinite" in ref.index else None
        for _, r in at.sort_values(["predictor_error"], kind="stable").iterrows():
            rows.append({
                "trace": name,
                "pressure": p_star,
                "kv_blocks": int(r["kv_blocks"]),
                "policy": r["policy"],
                "predictor_error": r["predictor_error"],
                "evicted_blocks": int(r["evicted_blocks"]),
                "harmful_evictions": int(r["harmful_evictions"]),
                "total_session_time_s": r["total_session_time_s"],
                "x_fewer_evictions": _ratio(vllm["evicted_blocks"], r["evicted_blocks"]),
                "x_fewer_harmful": _ratio(vllm["harmful_evictions"], r["harmful_evictions"]),
                "x_faster": _ratio(vllm["total_session_time_s"], r["total_session_time_s"]),
                "evictions_vs_belady": (_ratio(r["evicted_blocks"], belady["evicted_blocks"])
                                        if belady is not None else math.nan),
                "time_vs_infinite": (_ratio(r["total_session_time_s"], infinite["total_session_time_s"])
                                     if infinite is not None else math.nan),
                "bound_evicted_blocks": r["bound_evicted_blocks"],
                "evictions_vs_bound": (_ratio(r["evicted_blocks"], r["bound_evicted_blocks"])
                                       if not pd.isna(r["bound_evicted_blocks"]) else math.nan),
            })
    return pd.DataFrame(rows)


def paper_check(rt: pd.DataFrame) -> list[str]:
    """One plain line per trace: does cachewise meet the paper's claims?"""
    lines = []
    for name in dict.fromkeys(rt["trace"]) if len(rt) else []:
        sel = rt.loc[(rt["trace"] == name) & (rt["policy"] == "cachewise") & (rt["predictor_error"] == 0)]
        if sel.empty:
            lines.append(f"{name}: no cachewise run to check against the paper")
            continue
        r = sel.iloc[0]

        def verdict(ok: bool) -> str:
            return "met" if ok else "NOT met"

        parts = [
            f">= {CLAIM_FEWER_EVICTIONS}x fewer evictions than vllm: {verdict(r['x_fewer_evictions'] >= CLAIM_FEWER_EVICTIONS)} "
            f"({r['x_fewer_evictions']:.2f}x; harmful {r['x_fewer_harmful']:.2f}x)",
            f">= {CLAIM_FASTER}x lower total session time: {verdict(r['x_faster'] >= CLAIM_FASTER)} ({r['x_faster']:.2f}x)",
        ]
        if not math.isnan(r["evictions_vs_belady"]):
            parts.append(f"evictions within {CLAIM_BELADY_GAP - 1:.0%} of belady: "
                         f"{verdict(r['evictions_vs_belady'] <= CLAIM_BELADY_GAP)} ({r['evictions_vs_belady']:.2f}x belady)")
        else:
            parts.append("evictions within 25% of belady: no belady run")
        if not math.isnan(r["evictions_vs_bound"]):
            parts.append(f"evictions within {CLAIM_BOUND_GAP:.2f}x of the bound under its own schedule: "
                         f"{verdict(r['evictions_vs_bound'] <= CLAIM_BOUND_GAP)} ({r['evictions_vs_bound']:.2f}x)")
        lines.append(f"cachewise vs paper ({name}, pressure {fmt_pressure(r['pressure'])}, "
                     f"{int(r['kv_blocks']):,} blocks): " + "; ".join(parts))
    return lines


def ratios_table(rt: pd.DataFrame) -> Table:
    def x(v: float) -> str:
        return "inf" if math.isinf(v) else ("" if math.isnan(v) else f"{v:.2f}x")

    table = Table(title="Policies at the pressure where vllm has the most harmful evictions per call")
    for head in ["trace", "pressure", "policy", "evicted", "harmful", "total time s", "fewer evictions",
                 "fewer harmful", "faster", "evict/belady", "evict/bound", "time/infinite"]:
        table.add_column(head, justify="left" if head in ("trace", "policy") else "right")
    for _, r in rt.iterrows():
        pol = r["policy"] + (f" (err {r['predictor_error']:g})" if r["predictor_error"] else "")
        table.add_row(r["trace"], fmt_pressure(r["pressure"]), pol, f"{r['evicted_blocks']:,}",
                      f"{r['harmful_evictions']:,}", f"{r['total_session_time_s']:,.0f}", x(r["x_fewer_evictions"]),
                      x(r["x_fewer_harmful"]), x(r["x_faster"]), x(r["evictions_vs_belady"]),
                      x(r["evictions_vs_bound"]), x(r["time_vs_infinite"]))
    return table


def make_figures(df: pd.DataFrame) -> dict[str, Figure]:
    """Figures keyed by output file name (without .png); one panel per trace, one line per policy."""
    g = grid(df)
    traces = list(dict.fromkeys(g["trace"]))
    policies = list(dict.fromkeys(p for p in POLICIES if p in set(g["policy"]))) + \
        sorted(set(g["policy"]) - set(POLICIES))
    figs: dict[str, Figure] = {}
    for col, title, ylabel in FIGURES:
        if g[col].isna().all():  # (results without the eviction bound)
            continue
        fig = Figure(figsize=(6.4 * len(traces), 4.4), layout="constrained")
        axes = fig.subplots(1, len(traces), squeeze=False)[0]
        for ax, name in zip(axes, traces):
            t = g.loc[g["trace"] == name]
            for i, pol in enumerate(policies):
                s = t.loc[t["policy"] == pol].sort_values("pressure")
                if s.empty:
                    continue
                style = "--" if pol in ("belady", "infinite") else "-"
                # one colour per policy (tab20 has enough), markers to tell neighbours apart
                ax.plot(s["pressure"], s[col], style, marker=MARKERS[i % len(MARKERS)], ms=4, label=pol,
                        color=COLORS(i % COLORS.N))
            ax.set_xlabel("pressure (peak KV working set / pool)")
            ax.set_ylabel(ylabel)
            ax.set_title(title if len(traces) == 1 else f"{title}\n{name}", fontsize=10)
            ax.set_xticks(sorted(set(t["pressure"])))
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        figs[Path(FIGURE_FILES[col]).stem] = fig
    abl = df.loc[df["policy"] == "cachewise"]
    if (abl["predictor_error"] > 0).any():
        fig = Figure(figsize=(10.0, 4.0 * len(traces)), layout="constrained")
        axes = fig.subplots(len(traces), 2, squeeze=False)
        for (ax1, ax2), name in zip(axes, traces):
            p_star = worst_pressure(df, name)
            a = abl.loc[(abl["trace"] == name) & (abl["pressure"] == p_star)].sort_values("predictor_error")
            ref = g.loc[(g["trace"] == name) & (g["pressure"] == p_star)].set_index("policy")
            for ax, col, lab in ((ax1, "evicted_blocks", "evicted blocks"),
                                 (ax2, "total_session_time_s", "total session time (s)")):
                ax.plot(a["predictor_error"], a[col], marker="o", label="cachewise")
                for pol, ls in (("vllm", ":"), ("belady", "--"), ("infinite", "-.")):
                    if pol in ref.index:
                        ax.axhline(ref.loc[pol, col], ls=ls, color="grey", lw=1)
                        ax.annotate(pol, (a["predictor_error"].max() if len(a) else 0, ref.loc[pol, col]),
                                    fontsize=8, color="grey", va="bottom", ha="right")
                ax.set_xlabel("injected predictor error sigma")
                ax.set_ylabel(lab)
                ax.set_title(f"{name}, pressure {fmt_pressure(p_star)}", fontsize=10)
                ax.grid(alpha=0.3)
        figs["predictor_error"] = fig
    return figs


def write_outputs(df: pd.DataFrame, out: str | Path, console: Console | None = None) -> pd.DataFrame:
    """Figures, ``ratios.csv``, the printed table and the paper-claims line; returns the ratios."""
    console = console or Console()
    out = Path(out)
    for stem, fig in make_figures(df).items():
        fig.savefig(out / f"{stem}.png", dpi=120)
    rt = ratios(df)
    rt.to_csv(out / "ratios.csv", index=False)
    if len(rt):
        console.print(ratios_table(rt))
    for line in paper_check(rt):
        console.print(line, soft_wrap=True)
    console.print(f"results: {out / 'results.csv'}, ratios: {out / 'ratios.csv'}, figures: {out}/*.png")
    return rt


# ------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--trace", action="append", default=None,
                    help="trace file (repeatable; default: the bundled real trace)")
    ap.add_argument("--policies", default=None, help="comma-separated (default: every registered policy)")
    ap.add_argument("--pressures", default=None,
                    help=f"comma-separated peak-working-set / pool ratios (default {DEFAULTS['pressures']})")
    ap.add_argument("--agents", type=int, default=None, help=f"concurrent sessions (default {DEFAULTS['agents']})")
    ap.add_argument("--max-sessions", type=int, default=None, help="only the first N sessions of each trace")
    ap.add_argument("--predictor-errors", default=None,
                    help=f"cachewise predictor_error ablation (default {DEFAULTS['predictor_errors']}; 0 = none)")
    ap.add_argument("--out", default="runs/compare", help="output folder (default runs/compare)")
    ap.add_argument("--resume", action="store_true", help="keep results.csv and skip the rows already in it")
    ap.add_argument("--plain", action="store_true", help="plain output: no progress bar, no colours (notebooks, logs)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes running the simulations (default: every core; 1: in this process)")
    ap.add_argument("--ray-address", default=None,
                    help="run them as Ray tasks instead: local (a Ray started here), auto, or a cluster's address")
    ap.add_argument("--no-bound", dest="bound", action="store_false",
                    help="skip each run's eviction bound under its own schedule (about 1 s per million block "
                         "references and releases a run)")
    ap.add_argument("--predictor-trace", default=None,
                    help="train the tool-call predictor on this trace instead of each run's own (rows named "
                         "<trace>@pred=<this trace>)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke preset: 8 sessions, 8 agents, pressures 1,2, vllm/cachewise/belady/infinite, "
                         "no ablation (explicit flags still win)")
    args = ap.parse_args(argv)
    apply_preset(args, QUICK if args.quick else DEFAULTS)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()] if args.policies else list(POLICIES)
    pressures = parse_floats(args.pressures)
    if not pressures or pressures[0] <= 0:
        ap.error("--pressures must be positive")
    errors = parse_floats(args.predictor_errors)
    traces = args.trace or [str(DEFAULT_TRACE)]
    if args.predictor_trace is not None and not Path(args.predictor_trace).is_file():
        ap.error(f"--predictor-trace: no such file: {args.predictor_trace}")
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown policies {bad}; available: {', '.join(POLICIES)}")

    console = _plain_console() if args.plain else Console(width=None if sys.stdout.isatty() else 200)
    console.print(f"traces: {', '.join(trace_name(t) for t in traces)}; policies: {', '.join(policies)}; "
                  f"pressures: {', '.join(map(fmt_pressure, pressures))}; agents {args.agents}; "
                  f"max sessions {args.max_sessions}; predictor errors {', '.join(f'{e:g}' for e in errors)}")
    t0 = time.perf_counter()
    df = run(traces, policies, pressures, agents=args.agents, max_sessions=args.max_sessions,
             predictor_errors=errors, out=args.out, resume=args.resume, console=console, plain=args.plain,
             workers=args.workers, ray_address=args.ray_address, bound=args.bound,
             predictor_trace=args.predictor_trace)
    console.print(f"{len(df)} rows in {time.perf_counter() - t0:.0f} s")
    if df.empty:
        console.print("[red]no results[/red]")
        return 1
    write_outputs(df, args.out, console)
    return 1 if df.attrs.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
