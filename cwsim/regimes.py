"""Where reuse-aware policies pay: each policy's ratio to ``vllm`` across workload regimes.

What it runs
    For every regime (gap scale x agents x block size x pressure) and every policy, one
    simulation (``cwsim.runner.simulate``, as a point of a sweep: ``cwsim.sweep.run_points``):

    - **gap scale**: every gap between a call's answer and the session's next call (tool
      and client time) multiplied by it (``SimConfig.gap_scale``; the tool-call predictor
      learns the scaled gaps). The bundled mini-swe-agent trace's recorded gaps have a
      median of 0.25 s (``pip install`` 3-14 s); TraceLab's real Claude Code / Codex tool
      latencies reach minutes. 1x is the recording, 10x and 100x agents whose tools run
      test suites and builds, or wait on a person;
    - **agents**: sessions running at once (``--arrivals concurrent``);
    - **block size**: tokens per KV block;
    - **pressure**: the pool is ``ceil(peak / pressure) + 1`` blocks, ``peak`` the peak KV
      working set of that regime's trace timing, agents and block size
      (``cwsim.analysis.analyze``, cached in ``OUT/working_set.json``), as in
      ``cwsim.compare``; but never smaller than the largest call needs, so with few agents
      the pressure reached can be lower (``effective_pressure`` = peak / usable blocks).

Outputs (in ``--out``, default ``runs/regimes``)
    ``results.csv``: one row per run (regime, policy, ``kv_blocks`` and the summary's
    figures), written when the runs end; the runs' own folders and ``results.parquet`` in
    ``OUT/sweep/`` (a rerun skips finished runs). ``ratios.csv``: per regime and policy,
    ``x_fewer_evictions`` and ``x_faster`` (``vllm``'s evicted blocks / total session time
    over the policy's). ``regimes_x_faster.png``, ``regimes_x_fewer_evictions.png``: one
    heatmap per (pressure, policy) over gap scale x agents, each cell the ratio (block sizes
    side by side when there are several).

How to run
    .venv/bin/python experiments/regimes.py                  # the default grid (about 15 min on 2 cores)
    .venv/bin/python experiments/regimes.py --quick          # smoke run, well under a minute
    .venv/bin/python experiments/regimes.py --gap-scales 1,100 --agents 8,64 --trace synth.jsonl.gz

From Python: ``from cwsim import regimes``; ``regimes.run(...)`` returns the rows,
``regimes.ratios(df)`` and ``regimes.make_figures(df)`` work on an existing ``results.csv``
(``regimes.load_results``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from rich.console import Console

from cwsim.compare import _plain_console, apply_preset, kv_blocks_for, parse_floats, peak_working_set, trace_name, truncate
from cwsim.config import SimConfig
from cwsim.policies.registry import POLICIES
from cwsim.runner import DEFAULT_TRACE
from cwsim.sweep import SweepPoint, point_id, run_points
from traces.format import Trace
from traces.columnar import TraceTable, load_table
from traces.transform import scale_gaps

__all__ = ["AXES", "COLUMNS", "load_results", "main", "make_figures", "ratios", "run"]

#: the regime's axes, in grid order (the last varies fastest)
AXES = ["gap_scale", "agents", "block_size", "pressure"]
COLUMNS = ["trace", *AXES, "policy", "kv_blocks", "peak_blocks", "effective_pressure", "sessions", "requests", "evicted_blocks", "harmful_evictions",
           "prefix_hit_rate", "preemptions", "total_session_time_s", "p99_session_time_s", "makespan_s", "wall_s"]
DEFAULTS = {"policies": "vllm,sglang,cachewise,cachewise-sched,cachewise-evict,continuum,pbkv,tokencake",
            "gap_scales": "1,10,100", "agents": "8,16,32", "block_sizes": "16", "pressures": "2,4",
            "max_sessions": None}
QUICK = {"policies": "vllm,cachewise,continuum", "gap_scales": "1,100", "agents": "4,8", "block_sizes": "16",
         "pressures": "2", "max_sessions": 8}
SWEEP_DIR = "sweep"
#: (ratios column, figure title)
FIGURES = [("x_faster", "total session time: vllm / policy"),
           ("x_fewer_evictions", "evicted blocks: vllm / policy")]


def _ints(text: str) -> list[int]:
    return sorted({int(v) for v in text.split(",") if v.strip()})


def run(trace_path: str | Path, policies: list[str], gap_scales: list[float], agents: list[int],
        block_sizes: list[int], pressures: list[float], *, max_sessions: int | None = None,
        out: str | Path = "runs/regimes", workers: int | None = None, ray_address: str | None = None,
        console: Console | None = None) -> pd.DataFrame:
    """Run every regime x policy (finished runs in ``out/sweep`` are kept); write and return ``results.csv``'s rows."""
    console = console or Console()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        raise ValueError(f"unknown policies {unknown}; available: {', '.join(POLICIES)}")
    if "vllm" not in policies:
        policies = ["vllm", *policies]  # every ratio is to vllm
    bad = [("--gap-scales", v) for v in gap_scales if not v >= 0] + [("--agents", v) for v in agents if v < 1] + \
        [("--block-sizes", v) for v in block_sizes if v < 1] + [("--pressures", v) for v in pressures if not v > 0]
    if bad:
        raise ValueError(f"{bad[0][0]}: {bad[0][1]} is out of range")
    trace = load_table(trace_path)
    name = trace_name(trace_path)
    points, meta = [], {}
    first = truncate(trace, max_sessions)
    for gap in gap_scales:
        regime_trace = first if gap == 1 else TraceTable.from_sessions(scale_gaps(first.sessions, gap),
                                                                       source=trace.source)
        for n_agents in agents:
            for bs in block_sizes:
                peak = peak_working_set(regime_trace, name, n_agents, max_sessions, out, console, block_size=bs,
                                        regime=f"gap_scale={gap:g}" if gap != 1 else "")
                largest = -(-max(c.prompt_tokens + c.output_tokens for c in regime_trace.calls()) // bs)
                for pressure in pressures:
                    kv = max(kv_blocks_for(peak, pressure), largest + 1)  # every call must fit alone
                    for policy in policies:
                        values = {"trace": str(trace_path), "policy": policy, "kv_blocks": kv, "agents": n_agents,
                                  "block_size": bs, "gap_scale": float(gap), "max_sessions": max_sessions}
                        config = SimConfig(policy=policy, kv_blocks=kv, agents=n_agents, block_size=bs,
                                           gap_scale=float(gap), max_sessions=max_sessions)
                        p = SweepPoint(point_id(values), values, config, Path(trace_path))
                        points.append(p)
                        meta[p.id] = {"trace": name, "gap_scale": float(gap), "agents": n_agents, "block_size": bs,
                                      "pressure": float(pressure), "policy": policy, "kv_blocks": kv,
                                      "peak_blocks": peak, "effective_pressure": round(peak / (kv - 1), 4)}
    failures: list[str] = []

    def finished(done: int, total: int, row: dict) -> None:
        m = meta[row["point_id"]]
        label = (f"gap x{m['gap_scale']:g} agents {m['agents']} block {m['block_size']} "
                 f"pressure {m['pressure']:g} {m['policy']}")
        if row["status"] != "ok":
            failures.append(f"{label}: {row['error']}")
            console.print(f"FAILED {label}: {row['error']}", markup=False, style="red")
        else:
            console.print(f"[{done}/{total}] {label}: evicted {row['evicted_blocks']:,}, total "
                          f"{row['total_session_time_s']:,.0f} s ({row['wall_s']:.1f} s wall)", markup=False)

    table = run_points(points, out / "sweep", workers, ray_address, finished, traces={str(trace_path): trace})
    rows = []
    for _, r in table.iterrows():
        if r["status"] == "ok":
            rows.append({**meta[r["point_id"]], **{c: r[c] for c in COLUMNS if c not in meta[r["point_id"]]}})
    df = pd.DataFrame(rows, columns=COLUMNS)
    df.to_csv(out / "results.csv", index=False)
    df.attrs["failures"] = failures
    return df


def load_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    return pd.read_csv(path / "results.csv" if path.is_dir() else path, dtype={"trace": str, "policy": str})


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """Per trace, regime and policy: ``vllm``'s figure over the policy's (> 1: the policy does better)."""
    keys = ["trace", *AXES]
    base = df.loc[df["policy"] == "vllm", keys + ["evicted_blocks", "total_session_time_s"]]
    m = df.merge(base, on=keys, suffixes=("", "_vllm"))

    def ratio(a: pd.Series, b: pd.Series) -> pd.Series:
        with np.errstate(divide="ignore", invalid="ignore"):
            r = a / b
        return r.where(b != 0, np.where(a == 0, 1.0, math.inf))

    m["x_fewer_evictions"] = ratio(m["evicted_blocks_vllm"], m["evicted_blocks"])
    m["x_faster"] = ratio(m["total_session_time_s_vllm"], m["total_session_time_s"])
    return m[keys + ["policy", "kv_blocks", "evicted_blocks", "total_session_time_s", "x_fewer_evictions",
                     "x_faster"]]


def make_figures(df: pd.DataFrame) -> dict[str, Figure]:
    """Per ratio: a grid of heatmaps, rows (pressure, block size), columns the policies but vllm;
    cells gap scale x agents, annotated with the ratio."""
    rt = ratios(df)
    policies = [p for p in dict.fromkeys(rt["policy"]) if p != "vllm"]
    panels = sorted({(p, b) for p, b in zip(rt["pressure"], rt["block_size"])})
    gaps, agents = sorted(set(rt["gap_scale"])), sorted(set(rt["agents"]))
    figs: dict[str, Figure] = {}
    traces = ", ".join(dict.fromkeys(rt["trace"]))
    for col, title in FIGURES:
        fig = Figure(figsize=(2.6 * max(1, len(policies)) + 1.2, 2.4 * len(panels) + 1.0), layout="constrained")
        axes = fig.subplots(len(panels), max(1, len(policies)), squeeze=False)
        vals = rt.loc[rt["policy"] != "vllm", col].replace(math.inf, np.nan)
        hi = float(np.nanmax(np.abs(np.log2(vals)))) if vals.notna().any() else 1.0
        hi = max(hi, 0.1)
        im = None
        for i, (pressure, bs) in enumerate(panels):
            for j, pol in enumerate(policies):
                ax = axes[i][j]
                grid = np.full((len(gaps), len(agents)), np.nan)
                sel = rt.loc[(rt["policy"] == pol) & (rt["pressure"] == pressure) & (rt["block_size"] == bs)]
                for _, r in sel.iterrows():
                    grid[gaps.index(r["gap_scale"]), agents.index(r["agents"])] = r[col]
                im = ax.imshow(np.log2(grid), cmap="RdBu", vmin=-hi, vmax=hi, origin="lower", aspect="auto")
                for (a, b), v in np.ndenumerate(grid):
                    if not np.isnan(v):  # white on the dark ends of the scale
                        dark = v > 0 and abs(math.log2(v)) > 0.6 * hi
                        ax.text(b, a, f"{v:.2f}", ha="center", va="center", fontsize=8,
                                color="white" if dark else "black")
                ax.set_xticks(range(len(agents)), [str(a) for a in agents])
                ax.set_yticks(range(len(gaps)), [f"x{g:g}" for g in gaps])
                ax.set_title(f"{pol}\npressure {pressure:g}, block {bs}", fontsize=9)
                if i == len(panels) - 1:
                    ax.set_xlabel("agents")
                if j == 0:
                    ax.set_ylabel("gap scale")
        if im is not None:
            fig.colorbar(im, ax=axes, shrink=0.6, label="log2(ratio): blue = better than vllm")
        fig.suptitle(f"{title} ({traces}; gaps = recorded tool + client time x scale)", fontsize=10)
        figs[f"regimes_{col}"] = fig
    return figs


def write_outputs(df: pd.DataFrame, out: str | Path, console: Console) -> pd.DataFrame:
    out = Path(out)
    rt = ratios(df)
    rt.to_csv(out / "ratios.csv", index=False)
    for stem, fig in make_figures(df).items():
        fig.savefig(out / f"{stem}.png", dpi=110)
    best = rt.loc[rt["policy"] != "vllm"].sort_values("x_faster", ascending=False).head(8)
    console.print("the best ratios to vllm (x faster total session time, x fewer evicted blocks):", markup=False)
    for _, r in best.iterrows():
        console.print(f"  {r['policy']:<16} gap x{r['gap_scale']:g}, {r['agents']} agents, block {r['block_size']}, "
                      f"pressure {r['pressure']:g}: {r['x_faster']:.2f}x faster, "
                      f"{r['x_fewer_evictions']:.2f}x fewer evictions", markup=False)
    console.print(f"results: {out / 'results.csv'}, ratios: {out / 'ratios.csv'}, figures: {out}/regimes_*.png",
                  markup=False)
    return rt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--trace", default=None, help="trace file (default: the bundled real trace)")
    ap.add_argument("--policies", default=None, help=f"comma-separated (default {DEFAULTS['policies']})")
    ap.add_argument("--gap-scales", default=None, help=f"comma-separated (default {DEFAULTS['gap_scales']})")
    ap.add_argument("--agents", default=None, help=f"comma-separated (default {DEFAULTS['agents']})")
    ap.add_argument("--block-sizes", default=None, help=f"comma-separated (default {DEFAULTS['block_sizes']})")
    ap.add_argument("--pressures", default=None, help=f"comma-separated (default {DEFAULTS['pressures']})")
    ap.add_argument("--max-sessions", type=int, default=None, help="only the first N sessions of the trace")
    ap.add_argument("--out", default="runs/regimes", help="output folder (default runs/regimes)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: every core; 1: this process)")
    ap.add_argument("--ray-address", default=None, help="run as Ray tasks: local, auto, or a cluster's address")
    ap.add_argument("--plain", action="store_true", help="plain output (notebooks, logs)")
    ap.add_argument("--quick", action="store_true", help="smoke preset: 8 sessions, 4 and 8 agents, gap x1 and "
                    "x100, pressure 2, vllm/cachewise/continuum (explicit flags still win)")
    args = ap.parse_args(argv)
    apply_preset(args, QUICK if args.quick else DEFAULTS)
    console = _plain_console() if args.plain else Console(width=None if sys.stdout.isatty() else 200)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    try:
        axes = (parse_floats(args.gap_scales), _ints(args.agents), _ints(args.block_sizes),
                parse_floats(args.pressures))
    except ValueError as e:
        ap.error(f"a comma-separated list of numbers was expected: {e}")
    t0 = time.perf_counter()
    try:
        df = run(args.trace or str(DEFAULT_TRACE), policies, *axes, max_sessions=args.max_sessions, out=args.out,
                 workers=args.workers, ray_address=args.ray_address, console=console)
    except ValueError as e:
        ap.error(str(e))
    console.print(f"{len(df)} runs in {time.perf_counter() - t0:.0f} s", markup=False)
    if df.empty:
        console.print("no results", markup=False)
        return 1
    write_outputs(df, args.out, console)
    return 1 if df.attrs.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
