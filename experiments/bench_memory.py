"""Peak memory and time against trace size: synthetic traces of 1k, 10k, 100k sessions.

For each size N (``--sessions``, comma-separated), in a fresh Python process each, so that
every peak is that phase's alone:

1. ``synth``: fit the bundled trace, sample N sessions (``traces.synth.iter_sessions``,
   seed 1) and write them with ``write_trace`` (compact lines, gzip): wall time, file size,
   peak RSS (skipped when ``--work`` already holds that file: ``reused``);
2. ``load``: ``load_trace`` of that file (the whole trace in memory): wall time, peak RSS, calls
   (``--no-load`` skips it);
3. ``index``: ``traces.stream.index_trace`` (the validating pass a run makes first): wall time,
   peak RSS;
4. ``table``: ``traces.columnar.load_table`` (the whole trace in compact columns, as ``cwsim
   analyze``, sweeps and comparisons hold it): wall time, peak RSS, and the columns' own bytes;
5. ``analyze`` (with ``--analyze``): ``cwsim.analysis.analyze`` of that table (what ``cwsim
   analyze`` computes, one ``infinite``-policy simulation included): wall time, peak RSS;
6. ``run`` (with ``--run``): ``cwsim.runner.simulate`` of the file under ``vllm``, 16 agents,
   the default pool, which streams the sessions (index, then one session at a time): wall
   time, peak RSS, and calls per second.

Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child process.
Prints one table row per phase and size; ``--csv FILE`` also writes them. The files go to
``--work`` (default: a temporary folder, removed at the end).

    .venv/bin/python experiments/bench_memory.py                          # 1k, 10k: synth + load
    .venv/bin/python experiments/bench_memory.py --sessions 1000 --run    # with a simulation
    .venv/bin/python experiments/bench_memory.py --sessions 1000,10000 --analyze --work runs/mem
    .venv/bin/python experiments/bench_memory.py --sessions 1000,10000,100000 --run --no-load --work runs/mem
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
phase, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t0 = time.perf_counter()
out = {}
if phase == "synth":
    from cwsim.runner import DEFAULT_TRACE
    from traces.reader import load_trace, write_trace
    from traces.synth import fit, iter_sessions, synthetic_header
    model = fit(load_trace(DEFAULT_TRACE))
    out["calls"] = write_trace(path, (c for s in iter_sessions(model, n, 1) for c in s.calls),
                               synthetic_header(model, n, 1, str(DEFAULT_TRACE)))
elif phase == "load":
    from traces.reader import load_trace
    out["calls"] = load_trace(path).num_calls
elif phase == "index":
    from traces.stream import index_trace
    out["calls"] = index_trace(path).num_calls
elif phase == "table":
    from traces.columnar import load_table
    table = load_table(path)
    out["calls"], out["table_mib"] = table.num_calls, table.nbytes() / 2**20
elif phase == "analyze":
    from cwsim.analysis import analyze
    from traces.columnar import load_table
    out["calls"] = analyze(load_table(path))["calls"]
else:
    from cwsim.config import SimConfig
    from cwsim.runner import simulate
    s = simulate(path, SimConfig(policy="vllm", agents=16)).summary
    out["calls"] = s["requests"]
out["wall_s"] = time.perf_counter() - t0
out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""

FIELDS = ["sessions", "phase", "calls", "wall_s", "peak_rss_mib", "file_mib", "table_mib"]


def measure(phase: str, n: int, path: Path) -> dict:
    if phase == "synth" and path.exists():
        return {"sessions": n, "phase": "reused", "calls": None, "wall_s": None, "peak_rss_mib": None,
                "file_mib": path.stat().st_size / 2**20}
    res = subprocess.run([sys.executable, "-c", CHILD, phase, str(n), str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        tail = (res.stderr.strip().splitlines() or ["?"])[-1]
        return {"sessions": n, "phase": phase, "calls": None, "wall_s": None, "peak_rss_mib": None,
                "file_mib": None, "error": tail}
    row = {"sessions": n, "phase": phase, **json.loads(res.stdout.strip().splitlines()[-1])}
    row["file_mib"] = path.stat().st_size / 2**20
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", default="1000,10000", help="comma-separated trace sizes (default 1000,10000)")
    ap.add_argument("--run", action="store_true", help="also simulate each trace (vllm, 16 agents)")
    ap.add_argument("--analyze", action="store_true", help="also analyse each trace as `cwsim analyze` does")
    ap.add_argument("--no-load", action="store_true", help="skip the whole-trace load (it needs ~0.15 MiB a session)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the traces (default: a temporary one)")
    ap.add_argument("--csv", type=Path, default=None, help="also write the rows to this CSV")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sessions.split(",") if s.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="cw-bench-memory-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"{'sessions':>9} {'phase':>6} {'calls':>10} {'wall s':>9} {'peak RSS MiB':>13} {'file MiB':>9}", flush=True)
        for n in sizes:
            path = work / f"synth-{n}.jsonl.gz"
            phases = ["synth"] + ([] if args.no_load else ["load"]) + ["index", "table"] + \
                (["analyze"] if args.analyze else []) + (["run"] if args.run else [])
            for phase in phases:
                row = measure(phase, n, path)
                rows.append(row)
                if row.get("error"):
                    print(f"{n:>9} {phase:>6}  failed: {row['error']}", flush=True)
                    break
                if row["phase"] == "reused":
                    print(f"{n:>9} {'reused':>6} {'':>10} {'':>9} {'':>13} {row['file_mib']:>9.1f}", flush=True)
                    continue
                rate = f"  {row['calls'] / row['wall_s']:,.0f} calls/s" if phase == "run" else ""
                if phase == "table":
                    rate = f"  columns {row['table_mib']:,.1f} MiB"
                print(f"{n:>9} {phase:>6} {row['calls']:>10,} {row['wall_s']:>9.1f} {row['peak_rss_mib']:>13,.0f} "
                      f"{row['file_mib']:>9.1f}{rate}", flush=True)
    if args.csv is not None:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS + ["error"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
