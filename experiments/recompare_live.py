"""Simulate finished live replays again with other profiles: the same real runs, new cwsim figures.

For each ``live-*`` run folder of a ``experiments/live_miniswe.py`` results folder (the real
measurements stay as they were), a copy is compared with cwsim (``replay.live_compare``) under
each ``--profile``; ``OUT/report.json`` holds one table of rows per profile (the columns of
``live_miniswe.py``'s report), ``OUT/report.png`` the simulated against real session times of
the last profile, and each row also the session MAPE against the mean of the runs of its pool size
(the real runs differ from each other too: that figure is printed per pool).

    .venv/bin/python experiments/recompare_live.py --runs experiments/results/live-miniswe-2026-12-03-warmed \\
        --profile A.json --profile B.json --out OUT                                  # seconds
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from live_miniswe import TARGETS, _fmt, _plot, _row, _shown  # noqa: E402

SCHED = dict(max_num_seqs=8, max_num_batched_tokens=512)  # live_miniswe.py's servers


def _durations(path: Path) -> dict[str, float]:
    return {r["session_id"]: float(r["duration_s"]) for r in csv.DictReader(open(path))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=Path, required=True, help="a live_miniswe.py results folder (live-* runs, trace.jsonl)")
    ap.add_argument("--profile", type=Path, action="append", required=True, help="a profile to simulate with; repeatable")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    from replay.live_compare import compare_live
    from traces.reader import load_trace

    runs = sorted(p for p in args.runs.glob("live-*") if p.is_dir())
    if not runs:
        raise SystemExit(f"--runs {args.runs}: no live-* run folders there")
    trace = load_trace(args.runs / "trace.jsonl")
    pools: dict[str, list[Path]] = {}
    for run in runs:
        pools.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    real_mean = {}
    for pool, members in pools.items():
        ds = [_durations(r / "sessions.csv") for r in members]
        real_mean[pool] = {k: statistics.mean(d[k] for d in ds) for k in ds[0]}
        if len(ds) > 1:
            spread = statistics.mean(abs(ds[1][k] - ds[0][k]) / ds[0][k] for k in ds[0])
            print(f"{pool}: the real runs differ from each other by a session MAPE of {100 * spread:.1f}%")
    args.out.mkdir(parents=True, exist_ok=True)
    tables = []
    with tempfile.TemporaryDirectory() as tmp:
        for profile in args.profile:
            rows = []
            for run in runs:
                copy = Path(tmp) / run.name
                shutil.rmtree(copy, ignore_errors=True)
                shutil.copytree(run, copy, ignore=shutil.ignore_patterns("sim", "compare*.json", "*.png"))
                row = _row(run.name, compare_live(copy, str(profile), trace=trace, **SCHED))
                sim = _durations(copy / "sim" / "sessions.csv")
                mean = real_mean[run.name.rsplit("-", 1)[0]]
                row["session_time_mape_vs_real_mean"] = statistics.mean(abs(sim[k] - mean[k]) / mean[k] for k in mean)
                rows.append(row)
            tables.append({"profile": _shown(profile), "rows": rows})
            cols = ["run", "evicted_real", "evicted_sim", "evicted_error", "preemptions_real", "preemptions_sim",
                    "session_time_mape", "session_time_mape_vs_real_mean", "call_latency_mape"]
            pct = {"evicted_error", "session_time_mape", "session_time_mape_vs_real_mean", "call_latency_mape"}
            print(f"\n{_shown(profile)}")
            print("  ".join(f"{c[:14]:>14}" for c in cols))
            for row in rows:
                print("  ".join(f"{_fmt(row[c], c in pct):>14}" for c in cols))
        _plot(Path(tmp), tables[-1]["rows"], [])
        shutil.copy(Path(tmp) / "report.png", args.out / "report.png")
    report = {"runs": _shown(args.runs), "targets": TARGETS, **SCHED, "tables": tables}
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {args.out}/report.json, {args.out}/report.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
