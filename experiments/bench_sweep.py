"""Sweep throughput: points per minute of `cwsim sweep` at 1 and N workers, in the local process pool
and on a local Ray instance, and the speed-up of N workers over 1.

    .venv/bin/python experiments/bench_sweep.py                  # N = every core, 8 points
    .venv/bin/python experiments/bench_sweep.py --workers 4 --seeds 4 --max-sessions 3

The grid: vllm and cachewise x two pool sizes x ``--seeds`` seeds (Poisson arrivals, 2 agents) on
the bundled trace, its first ``--max-sessions`` sessions. Each measurement sweeps into a fresh
folder (nothing resumed) and times ``run_sweep`` whole: start-up of the pool or of Ray, loading
the trace, the points, writing ``results.parquet``. Figures are wall-clock, so they are only
comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from cwsim.sweep import run_sweep


def grid(seeds: int, max_sessions: int) -> dict:
    return {"policy": ["vllm", "cachewise"], "kv_blocks": [2200, 3000], "seed": list(range(seeds)),
            "arrivals": "poisson", "rate": 0.5, "agents": 2, "max_sessions": max_sessions}


def points_per_minute(spec: dict, workers: int, ray_address: str | None) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as out:
        t0 = time.perf_counter()
        df = run_sweep(spec, out, workers=workers, ray_address=ray_address)
        wall = time.perf_counter() - t0
    if (df["status"] != "ok").any():
        raise SystemExit(f"a point failed: {df.loc[df['status'] != 'ok', 'error'].iloc[0]}")
    return len(df) / wall * 60, len(df)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N (default: every core)")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per (policy, pool size) (default 2: 8 points)")
    ap.add_argument("--max-sessions", type=int, default=2, help="sessions of the bundled trace per point (default 2)")
    ap.add_argument("--no-ray", action="store_true", help="the local pool only")
    args = ap.parse_args(argv)
    spec = grid(args.seeds, args.max_sessions)
    backends = [("local pool", None)] + ([] if args.no_ray else [("local Ray", "local")])
    print(f"cores: {os.cpu_count()}; N = {args.workers} workers; grid: {spec}")
    for name, address in backends:
        one, n = points_per_minute(spec, 1, address)
        many, _ = points_per_minute(spec, args.workers, address)
        print(f"{name:<10}  {n} points   1 worker: {one:7.1f} points/min   {args.workers} workers: {many:7.1f} "
              f"points/min   speed-up {many / one:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
