"""How far working-set's results turn on the request path's latency, with and without a residency floor.

Where tool times are scaled down (the live studies replay gaps x 0.05 on a CPU server) a session
stays resident for ``idle_factor`` x its tool's expected idle time after its call ends: 45-180 ms
there, while a prefill step of the costly live model takes up to ~0.3 s. A session's next call is
seen by the scheduler only when the step in progress ends, so whether it is still resident then is
a race that a few milliseconds of request overhead decide (``live_steps.py --overheads``). A floor
on the horizon (``min_idle_s``, ``cwsim run --min-idle-s``) of about two full-budget prefill steps
(``StepTimeProfile.full_prefill_step_s``) takes the race out.

What it does
    Sessions ``--sessions LO:HI`` of the bundled mini-swe-agent trace shrunk as the live studies shrink
    them (tokens / 10, 24 turns, gaps <= 20 s, then gaps x 0.05), on 128 blocks of 32 tokens with 8
    agents, 8 sequences and a 512-token budget (the live studies' server), under ``--profile``
    (default: the costly live model's server calibration in ``live-ratios-2026-12-07-floor``) with each request overhead of ``--overheads``: ``vllm``, then
    ``working-set`` with each floor of ``--floors`` (``auto``: two full-budget prefill steps of the
    profile), each ``--seeds`` times with 5% step jitter. The predictor is fitted on every other session
    of the bundled trace (never the sample's), shrunk and scaled the same way.

    Printed and written to ``OUT/floors.csv``: per overhead and policy, the mean and standard deviation
    of total session time and the mean evicted blocks over the seeds; ``OUT/floors.png``: session time
    against the overhead, one line per floor.

    .venv/bin/python experiments/residency_floor.py --out runs/floor-study              # the live study's sessions
    .venv/bin/python experiments/residency_floor.py --sessions 23:39 --out runs/floor-lite  # deepseek_lite_dev's

(about 1 minute each on one core)
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRACE = ROOT / "traces" / "data" / "miniswe-deepseek.jsonl.gz"
PROFILE = ROOT / "experiments" / "results" / "live-ratios-2026-12-07-floor" / "server-profile.json"
SCHED = dict(max_num_seqs=8, max_num_batched_tokens=512)
FIELDS = ["request_overhead_s", "policy", "min_idle_s", "session_s", "session_sd_s", "evicted", "seeds"]


def shrunk(sessions, time_scale: float):
    """The live studies' shrink (tokens / 10, 24 turns, gaps <= 20 s), gaps times ``time_scale``."""
    from replay.live_compare import scaled
    from traces.format import Trace
    from traces.transform import shrink

    return scaled(shrink(Trace(sessions, source="sample"), token_scale=10, max_turns=24, max_gap_s=20.0), time_scale)


def floor_values(spec: str, profile: str) -> list[float]:
    """``--floors``: each seconds, or ``auto`` (two full-budget prefill steps of ``profile``), as
    ``live_ratios.py --min-idle-s`` reads one."""
    sys.path.insert(0, str(ROOT / "experiments"))
    from live_ratios import min_idle

    return [min_idle(x.strip(), profile, SCHED) for x in spec.split(",")]


def main(argv: list[str] | None = None) -> int:
    from cwsim.config import SimConfig
    from cwsim.runner import simulate
    from cwsim.steptime import load_profile
    from traces.reader import load_trace, write_trace

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--sessions", default="0:16", help="LO:HI, sessions of the bundled trace (default: the live study's)")
    ap.add_argument("--profile", default=str(PROFILE))
    ap.add_argument("--overheads", default="0.004,0.0075,0.01,0.02", help="request overheads (s), comma-separated")
    ap.add_argument("--floors", default="0,0.12,auto,0.36", help="working-set min_idle_s values (s, or auto)")
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    args = ap.parse_args(argv)
    try:
        lo, hi = (int(x) for x in args.sessions.split(":"))
    except ValueError:
        raise SystemExit(f"--sessions {args.sessions!r}: expected LO:HI") from None
    base = load_profile(args.profile)
    floors = floor_values(args.floors, args.profile)
    overheads = [float(x) for x in args.overheads.split(",")]
    bundled = load_trace(TRACE)
    if not 0 <= lo < hi <= len(bundled.sessions):
        raise SystemExit(f"--sessions {args.sessions}: the bundled trace has {len(bundled.sessions)} sessions")
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sample = shrunk(bundled.sessions[lo:hi], args.time_scale)
    history = shrunk(bundled.sessions[:lo] + bundled.sessions[hi:], args.time_scale)
    trace_path, pred_path = out / "trace.jsonl", out / "predictor.jsonl"
    write_trace(trace_path, sample.calls(), sample.header)
    write_trace(pred_path, history.calls(), history.header)
    print(f"sessions {lo}:{hi} ({len(sample.sessions)}, {sample.num_calls} calls), gaps x {args.time_scale}; floors "
          + ", ".join(f"{f:.3f}" for f in floors) + f" s; {args.seeds} seeds of 5% step jitter", flush=True)
    rows = []
    part = out / "floors.csv.part"
    with tempfile.TemporaryDirectory(prefix="cw-floor-") as tmp_dir, part.open("w", newline="") as f:
        tmp = Path(tmp_dir)  # the profiles of each request overhead
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        for ovh in overheads:
            prof = tmp / f"overhead-{1e3 * ovh:g}ms.json"
            prof.write_text(json.dumps(replace(base, request_overhead_s=ovh).to_json()) + "\n")
            cfg = SimConfig(profile=str(prof), kv_blocks=128, block_size=32, agents=8, predictor_trace=str(pred_path), cpu_kv_blocks=0,
                            step_jitter=0.05, **SCHED)
            for policy, floor in [("vllm", None)] + [("working-set", x) for x in floors]:
                c = replace(cfg, policy=policy, min_idle_s=floor or 0.0,
                            predictor_trace=None if policy == "vllm" else cfg.predictor_trace)
                runs = [simulate(str(trace_path), replace(c, seed=k)).summary for k in range(args.seeds)]
                st = [r["total_session_time_s"] for r in runs]
                row = {"request_overhead_s": ovh, "policy": policy, "min_idle_s": floor, "session_s": float(np.mean(st)),
                       "session_sd_s": float(np.std(st)), "evicted": float(np.mean([r["evicted_blocks"] for r in runs])),
                       "seeds": args.seeds}
                rows.append(row)
                w.writerow(row)
                f.flush()
                label = policy if floor is None else f"working-set, floor {floor:.3f} s"
                print(f"  {1e3 * ovh:5.1f} ms  {label:<28} {row['session_s']:7.1f} +- {row['session_sd_s']:5.1f} s "
                      f"{row['evicted']:8.0f} evicted", flush=True)
    part.replace(out / "floors.csv")
    _plot(out / "floors.png", rows, overheads, floors)
    print(f"written: {out}/floors.csv, {out}/floors.png")
    return 0


def _plot(path: Path, rows: list[dict], overheads: list[float], floors: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = [1e3 * o for o in overheads]
    for policy, floor in [("vllm", None)] + [("working-set", f) for f in floors]:
        pts = [r for r in rows if r["policy"] == policy and r["min_idle_s"] == floor]
        ax.errorbar(x, [r["session_s"] for r in pts], yerr=[r["session_sd_s"] for r in pts], marker="o", capsize=3,
                    label=policy if floor is None else f"working-set, min_idle_s {floor:.2f} s")
    ax.set_xlabel("request overhead (ms): the latency a call pays outside the engine")
    ax.set_ylabel("total session time (s), mean +- sd over seeds")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title("working-set's residency race: gaps x 0.05 on the costly CPU model", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
