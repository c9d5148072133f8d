"""Simulator speed and memory on a single-call workload: the shape other simulators are timed on.

What it measures
    ``cwsim.runner.simulate`` on ``N`` independent requests of 3,800 prompt and 200 output tokens
    (no two share a token), Poisson arrivals at ``--rate`` requests per second, at most 128
    sequences in a batch and a 4,096-token step budget, the default profile and pool, ``vllm``
    (the rate sets how busy the engine is, and so how many steps a request takes: the figures
    are printed with the simulated makespan and steps).
    This is the workload the issue's side-by-side timed Vidur (520-570 requests/s) and BLIS
    (1,000-1,120 requests/s) on, on these 2-core machines. For each ``N`` in ``--requests``
    (default 1k, 10k, 50k), in a fresh process: requests per wall second and per CPU second of
    ``simulate()`` (the trace is written to a file first and streamed, as ``cwsim run`` reads
    it), peak RSS of the process, microseconds per request, and how that cost grows from the
    smallest ``N`` to the largest (1.00: linear).

Target (issue 14)
    >= 6,000 simulated requests per wall second on one core (10x Vidur, 3x BLIS here); memory
    that does not grow with ``N``. The last line says whether each size meets it.

How to run
    .venv/bin/python experiments/bench_single_call.py
    .venv/bin/python experiments/bench_single_call.py --requests 1000,10000 --rate 20 --csv runs/single.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

TARGET_REQUESTS_PER_S = 6000.0
PROMPT, OUTPUT = 3800, 200

CHILD = r"""
import json, resource, sys, time
from cwsim import native
from cwsim.config import SimConfig
from cwsim.runner import simulate
from traces.format import Call
from traces.reader import write_trace
n, rate, path = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
write_trace(path, (Call(f"r{i}", 0, ((f"p{i}", %(prompt)d),), %(output)d) for i in range(n)))
cfg = SimConfig(policy="vllm", arrivals="poisson", rate=rate, max_num_seqs=128, max_num_batched_tokens=4096)
t0, c0 = time.perf_counter(), time.process_time()
s = simulate(path, cfg).summary
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"requests": s["requests"], "wall_s": wall, "cpu_s": cpu, "makespan_s": s["makespan_s"],
                  "steps": s["steps"], "evicted_blocks": s["evicted_blocks"], "kv_blocks": s["kv_blocks"],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "compiled": native.describe()}))
""" % {"prompt": PROMPT, "output": OUTPUT}

FIELDS = ["requests", "rate", "wall_s", "cpu_s", "requests_per_wall_s", "requests_per_cpu_s", "us_per_request",
          "peak_rss_mib", "makespan_s", "steps", "evicted_blocks", "kv_blocks", "compiled"]


def measure(n: int, rate: float, work: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", CHILD, str(n), str(rate), str(work / f"single-{n}.jsonl.gz")],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"the run of {n} requests failed: {(res.stderr.strip().splitlines() or ['?'])[-1]}")
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r.update(rate=rate, requests_per_wall_s=r["requests"] / r["wall_s"], requests_per_cpu_s=r["requests"] / r["cpu_s"],
             us_per_request=1e6 * r["cpu_s"] / r["requests"])
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", default="1000,10000,50000", help="comma-separated workload sizes")
    ap.add_argument("--rate", type=float, default=5.0,
                    help="Poisson arrivals, requests per second (default 5: just under what the default profile's "
                         "engine serves of this shape, about 6/s; above it the queue grows all run)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.requests.split(",") if s.strip()]
    rows = []
    print(f"{'requests':>9} {'wall s':>8} {'cpu s':>8} {'req/s':>8} {'req/cpu s':>10} {'us/req':>8} "
          f"{'peak MiB':>9} {'sim s':>9} {'steps':>9} {'evicted':>9}", flush=True)
    with tempfile.TemporaryDirectory(prefix="cw-bench-single-") as tmp:
        for n in sizes:
            r = measure(n, args.rate, Path(tmp))
            rows.append(r)
            print(f"{n:>9,} {r['wall_s']:>8.2f} {r['cpu_s']:>8.2f} {r['requests_per_wall_s']:>8,.0f} "
                  f"{r['requests_per_cpu_s']:>10,.0f} {r['us_per_request']:>8.1f} {r['peak_rss_mib']:>9,.0f} "
                  f"{r['makespan_s']:>9,.0f} {r['steps']:>9,} {r['evicted_blocks']:>9,}", flush=True)
    if args.csv is not None:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if rows:
        print(rows[0]["compiled"])
    if len(rows) >= 2:
        print(f"cost per request at {rows[-1]['requests']:,} / at {rows[0]['requests']:,}: "
              f"{rows[-1]['us_per_request'] / rows[0]['us_per_request']:.2f} (1.00 = linear); peak RSS "
              f"{rows[0]['peak_rss_mib']:,.0f} -> {rows[-1]['peak_rss_mib']:,.0f} MiB")
    verdicts = ", ".join(f"{r['requests']:,}: {'MET' if r['requests_per_wall_s'] >= TARGET_REQUESTS_PER_S else 'NOT MET'}"
                         f" ({r['requests_per_wall_s']:,.0f}/s wall, {r['requests_per_cpu_s']:,.0f}/s CPU)" for r in rows)
    print(f"Target >= {TARGET_REQUESTS_PER_S:,.0f} simulated requests/s on one core: {verdicts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
