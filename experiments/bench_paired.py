"""Paired speed comparison of two checkouts of the simulator on the same machine state.

This machine's speed drifts by about 25% over minutes, so two versions are
timed in alternation (ABBA...), each run in a fresh process, CPU time of
``simulate()`` only (the trace is loaded first), and compared by the ratio of
their fastest and median runs. Both runs use this interpreter (the same
numpy and simpy); ``--old`` / ``--new`` are checkout folders put first on
``PYTHONPATH``.

    git worktree add /tmp/old <commit>
    python experiments/bench_paired.py --old /tmp/old --new . --runs 6
    python experiments/bench_paired.py --old /tmp/old --new . --config '{"kv_blocks": 12000}'
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

_RUN = r'''
import json, sys, time
from cwsim.config import SimConfig
from cwsim.runner import simulate, DEFAULT_TRACE
from traces.reader import load_trace
tr = load_trace(sys.argv[2] or DEFAULT_TRACE)
cfg = SimConfig(**json.loads(sys.argv[1]))
t = time.process_time()
s = simulate(tr, cfg).summary
print(json.dumps({"cpu_s": time.process_time() - t, "requests": s["requests"],
                  "evicted_blocks": s["evicted_blocks"], "preemptions": s["preemptions"]}))
'''


def run_once(checkout: str, config: str, trace: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(checkout))
    out = subprocess.run([sys.executable, "-c", _RUN, config, trace], cwd=checkout, env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="checkout of the baseline")
    ap.add_argument("--new", default=".", help="checkout of the version under test (default: this one)")
    ap.add_argument("--runs", type=int, default=6, help="runs of each version")
    ap.add_argument("--config", default="{}", help="SimConfig fields as JSON (default: the default run)")
    ap.add_argument("--trace", default="", help="trace file (default: the bundled one)")
    args = ap.parse_args(argv)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for i in range(args.runs):
        order = ("old", "new") if i % 2 == 0 else ("new", "old")
        for name in order:
            r = run_once(getattr(args, name), args.config, args.trace)
            times[name].append(r["cpu_s"])
            print(f"run {i + 1} {name}: {r['cpu_s']:.3f} s CPU, {r['requests']} calls "
                  f"({r['requests'] / r['cpu_s']:,.0f} calls/s), {r['evicted_blocks']} evicted blocks, "
                  f"{r['preemptions']} preemptions", flush=True)
    for name, v in times.items():
        print(f"{name}: fastest {min(v):.3f} s, median {statistics.median(v):.3f} s")
    print(f"new / old: fastest {min(times['new']) / min(times['old']):.3f}, "
          f"median {statistics.median(times['new']) / statistics.median(times['old']):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
