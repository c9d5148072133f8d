"""Tune the `working-set` policy's settings on one trace (the tuning trace only), against `vllm`.

Every (headroom, min_idle_s, idle_factor) of a small grid, at each pressure (the pool is
``ceil(peak / pressure) + 1`` blocks, ``peak`` the trace's peak KV working set under the same
agents, as in ``cwsim.compare``), with ``--agents`` concurrent sessions, at each ``--gap-scales``. Prints and writes
``OUT/tuning.csv`` (``--table``; one row per run: settings, pressure, evicted blocks, total session time, their
ratios to vllm at that pressure) and the settings with the best geometric mean of ``x_faster``
over the pressures.

    .venv/bin/python experiments/tune_working_set.py --trace chat.jsonl.gz --out runs/tune-ws

Issue 15 tunes on the mini-swe-agent ``deepseek_chat_dev`` run only
(``cwsim import --format mini-swe-agent ../shared/data/traces/mini-swe-agent-deepseek/deepseek_chat_dev``)
and reports on the others.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd
from rich.console import Console

from cwsim.compare import kv_blocks_for, parse_floats, peak_working_set, trace_name
from cwsim.config import SimConfig
from cwsim.policies.admission import WorkingSetAdmission
from cwsim.policies.registry import POLICIES, PolicySpec, register_policy
from cwsim.runner import simulate
from traces.format import Trace
from traces.reader import load_trace
from traces.transform import scale_gaps

GRID = {"headroom": [0.2, 0.3, 0.4, 0.5], "min_idle_s": [2.0, 5.0, 15.0], "idle_factor": [0.5, 2.0]}


def _variant(settings: dict) -> str:
    """Register (in this process) a working-set policy with these settings; its name."""
    name = "ws-" + "-".join(f"{k}={v:g}" for k, v in settings.items())
    if name not in POLICIES:
        def init(self, _s=settings):
            WorkingSetAdmission.__init__(self, **_s)

        cls = type(name, (WorkingSetAdmission,), {"name": name, "__init__": init})
        register_policy(PolicySpec(name, "working-set, tuning variant", cls))
    return name


def _run(args) -> dict:
    trace, settings, kv, agents, gap = args
    policy = _variant(settings) if settings else "vllm"
    s = simulate(trace, SimConfig(policy=policy, kv_blocks=kv, agents=agents, gap_scale=gap)).summary
    return {**(settings or {}), "policy": "working-set" if settings else "vllm", "gap_scale": gap, "kv_blocks": kv,
            "evicted_blocks": s["evicted_blocks"], "total_session_time_s": s["total_session_time_s"],
            "prefix_hit_rate": s["prefix_hit_rate"], "preemptions": s["preemptions"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", required=True, help="the tuning trace")
    ap.add_argument("--pressures", default="2,3,4")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--gap-scales", default="1", help="comma-separated gap scales (cwsim run --gap-scale; default 1)")
    ap.add_argument("--workers", type=int, default=None, help="processes (default: every core)")
    ap.add_argument("--out", default="runs/tune-working-set")
    ap.add_argument("--table", default="tuning.csv", help="file name of the table in --out (default %(default)s)")
    for key, values in GRID.items():
        ap.add_argument(f"--{key.replace('_', '-')}", default=",".join(f"{v:g}" for v in values),
                        help=f"comma-separated values of the setting (default %(default)s)")
    args = ap.parse_args(argv)
    grid = {key: parse_floats(getattr(args, key)) for key in GRID}
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace = load_trace(args.trace)
    pressures = parse_floats(args.pressures)
    variants = [dict(zip(grid, v)) for v in itertools.product(*grid.values())]
    jobs, where = [], []
    for gap in parse_floats(args.gap_scales):
        timed = trace if gap == 1 else Trace(list(scale_gaps(trace.sessions, gap)), source=trace.source)
        peak = peak_working_set(timed, trace_name(args.trace), args.agents, None, out, console,
                                regime=f"gap_scale={gap:g}" if gap != 1 else "")
        for p in pressures:
            for s in [None, *variants]:
                jobs.append((trace, s, kv_blocks_for(peak, p), args.agents, gap))
                where.append(p)
    rows = []
    with ProcessPoolExecutor(args.workers) as ex:
        for pressure, row in zip(where, ex.map(_run, jobs)):
            row["pressure"] = pressure
            rows.append(row)
            console.print(row, markup=False)
    df = pd.DataFrame(rows)
    key = df["gap_scale"].astype(str) + "|" + df["pressure"].astype(str)
    base = df.loc[df["policy"] == "vllm"].set_index(key[df["policy"] == "vllm"])
    df["x_faster"] = key.map(base["total_session_time_s"]) / df["total_session_time_s"]
    df["x_fewer_evictions"] = key.map(base["evicted_blocks"]) / df["evicted_blocks"].clip(lower=1)
    df.to_csv(out / args.table, index=False)
    ws = df.loc[df["policy"] == "working-set"]
    score = ws.groupby(list(GRID))["x_faster"].apply(lambda x: math.exp(x.map(math.log).mean()))
    best = score.idxmax()
    console.print(f"best settings (geometric mean x_faster over pressures {args.pressures} and gap scales "
                  f"{args.gap_scales}: {score.max():.3f}): "
                  f"{dict(zip(GRID, best))}", markup=False)
    console.print(ws.sort_values("x_faster", ascending=False).head(10).to_string(index=False), markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
