"""A live vLLM's scheduler steps beside cwsim's, for the same replay: does the simulator batch as vLLM does,
and does the step-time profile time vLLM's steps under load?

What it does
    1. calibrates a profile through a fresh server on this machine (``cwreplay calibrate --server``,
       as ``live_ratios.py`` does; or ``--profile``);
    2. for each policy (default ``vllm`` and ``working-set``): a fresh 128-block server with the
       scheduler's step log on (``cwreplay serve --step-log``: the plugin writes each step's
       composition and its time), the live-ratio study's replay (``--study``: its ``trace.jsonl``
       and ``predictor.jsonl``; 8 agents, gaps x 0.05), then the same run in cwsim with its step
       log (``cwsim run --step-log``);
    3. compares the two step logs over the replay's window (the warm-up's steps dropped):
       steps, and per kind of step (decode only, prefill only, mixed) how many, their prefill tokens
       and decoding sequences, and their time: live as measured (scheduling to output) and as the
       profile prices that same composition, simulated as charged, and how much of a live step
       its scheduling took (vLLM's scheduler and the policy's hooks). Then live steps by prefill
       tokens: the profile's price against the measured time;
    4. fits a profile on each policy's live step log (``cwreplay calibrate --step-log``) and
       simulates every policy's replay under it and under the quiet calibration (8 seeds of 5%
       step jitter): session time and evicted blocks against the live ones;
    5. with ``--overheads 0.004,0.01,0.02``: every replay simulated again under the profile with each
       request overhead (the latency a call pays outside the engine), beside the live figures.

    A policy whose run folder already holds its step log is not run again (the analysis is).

    .venv/bin/python experiments/live_steps.py --out runs/live-steps       # ~6 min on 2 cores, nothing else running
    # the costly-eviction study's replay (its larger model and its server calibration):
    S=experiments/results/live-ratios-2026-12-07-costly
    .venv/bin/python experiments/live_steps.py --study $S --profile $S/server-profile.json \
        --model-hidden 1024 --model-layers 4 --policies vllm working-set working-set-evict --out runs/live-steps-costly

Written to ``OUT``: ``profile.json``, per policy ``<policy>/`` (the live run, ``server-steps.csv``,
``sim/`` with ``steps.csv``), ``profile-steps-<policy>.json``, and ``steps.json`` with the tables
printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from live_ratios import calibrate_on_server, replay_on_server  # noqa: E402

STUDY = ROOT / "experiments" / "results" / "live-ratios-2026-12-06"
SCHED = dict(max_num_seqs=8, max_num_batched_tokens=512)
#: bins of a step's prefill tokens for the price-against-time table
P_BINS = (0, 1, 64, 128, 256, 384, 511, 512)


def summarize(steps, price) -> dict:
    """Per kind (``replay.calibrate_steps.step_kinds``): steps, prefill tokens and decoding sequences per
    step, time (s) and the profile's price."""
    from replay.calibrate_steps import step_kinds

    out = {}
    for kind, g in steps.groupby(step_kinds(steps)):
        out[kind] = {"steps": int(g.steps.sum()), "rows": len(g),
                     "prefill_tokens_per_step": float(g.prefill_tokens.sum() / g.steps.sum()),
                     "decode_seqs_per_step": float((g.decode_seqs * g.steps).sum() / g.steps.sum()),
                     "time_s": float((g.end_s - g.start_s).sum()),
                     "priced_s": float(sum(price(r) for r in g.itertuples()))}
        if "schedule_s" in g:  # (a live log: the scheduler's and the policy's own time, in time_s)
            out[kind]["schedule_ms_per_step"] = float(1e3 * g.schedule_s.mean())
    return out


#: a call that waited longer than this for its first scheduling was held back (not just behind a step)
HELD_S = 0.1


def held_calls(reqs) -> dict:
    """A run's ``requests.csv`` (DataFrame): the calls held back (waited over :data:`HELD_S` to be first
    scheduled), their wait, and the prompt tokens they and the other calls found uncached."""
    wait = reqs.first_scheduled_s - reqs.arrival_s
    missed = reqs.prompt_tokens - reqs.cached_tokens
    held = wait > HELD_S
    return {"calls": int(held.sum()), "wait_s": float(wait[held].sum()), "missed_tokens": int(missed[held].sum()),
            "others_missed_tokens": int(missed[~held].sum())}


def by_prefill(steps, price) -> list[dict]:
    import pandas as pd

    s = steps[steps.steps == 1].copy()
    s["bin"] = pd.cut(s.prefill_tokens, P_BINS, right=False)
    rows = []
    for b, g in s.groupby("bin", observed=True):
        t = (g.end_s - g.start_s).sum()
        rows.append({"prefill_tokens": str(b), "steps": len(g), "time_ms": 1e3 * t / len(g),
                     "priced_ms": 1e3 * sum(price(r) for r in g.itertuples()) / len(g)})
    return rows


def main(argv=None) -> int:
    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policies", nargs="+", default=["vllm", "working-set"])
    ap.add_argument("--profile", type=Path, default=None, help="a profile calibrated on this machine (else one is)")
    ap.add_argument("--study", type=Path, default=STUDY, help="a live_ratios.py folder: its trace and predictor")
    ap.add_argument("--kv-blocks", type=int, default=128)
    ap.add_argument("--model-hidden", type=int, default=128,
                    help="the random model's size, as the study's (live_ratios.py --model-hidden)")
    ap.add_argument("--model-layers", type=int, default=2, help="as the study's (live_ratios.py --model-layers)")
    ap.add_argument("--overheads", default=None,
                    help="comma-separated request overheads (s): every policy's replay simulated again under the "
                         "profile with each (8 seeds), beside the live figures: how much an admission policy's "
                         "outcome turns on the latency a call pays outside the engine")
    args = ap.parse_args(argv)

    from cwsim.runner import simulate
    from cwsim.steptime import load_profile
    from replay.live_compare import simulation_of
    from replay.tiny_model import build_tiny_model
    from traces.reader import load_trace

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    trace = load_trace(args.study / "trace.jsonl")
    pred = args.study / "predictor.jsonl"
    scratch = Path(tempfile.mkdtemp(prefix="cwls-"))  # short: the servers' socket paths
    report = {"study": str(args.study), "kv_blocks": args.kv_blocks, **SCHED, "policies": {}}
    try:
        model = str(build_tiny_model(scratch / "tiny-llama", hidden_size=args.model_hidden, layers=args.model_layers))
        profile = args.profile
        if profile is None:
            profile = out / "profile.json"
            print("calibrating a profile on this machine ...", flush=True)
            calibrate_on_server(model, scratch, SCHED, profile)
        prof = load_profile(profile)

        def price(r) -> float:  # the profile's time for a row's steps (a decode jump: n steps as cwsim charges)
            if r.steps > 1:
                return prof.decode_run_time(int(r.steps), int(r.decode_seqs), int(r.decode_ctx))
            return prof.step_time(int(r.prefill_tokens), float(r.attn_pairs), int(r.decode_seqs), int(r.decode_ctx))

        for policy in args.policies:
            run = out / policy
            pred_file = None if policy == "vllm" else str(pred)
            if (run / "server-steps.csv").is_file() and (run / "summary.json").is_file():
                live = json.loads((run / "summary.json").read_text())  # done before: analysed again
            else:
                shutil.rmtree(run, ignore_errors=True)
                log = out / f"{policy}-server-steps.csv"
                print(f"{policy}: a server of {args.kv_blocks} blocks with its step log ...", flush=True)
                live = replay_on_server(trace, run, model, scratch / policy, SCHED, kv_blocks=args.kv_blocks,
                                        time_scale=0.05, agents=8, policy=policy, predictor_trace=pred_file,
                                        step_log=str(log))
                shutil.move(log, run / "server-steps.csv")
            attempt = json.loads((run / "run.json").read_text())["attempts"][-1]
            t0, wall = attempt["t0_unix"], attempt["wall_s"]
            steps = pd.read_csv(run / "server-steps.csv")
            steps = steps[(steps.start_s >= t0) & (steps.start_s <= t0 + wall)].copy()
            steps[["start_s", "end_s"]] -= t0
            tr, sim_cfg = simulation_of(run, str(profile), trace=trace, predictor_trace=pred_file, **SCHED)
            sim = simulate(tr, sim_cfg, out_dir=run / "sim", step_log=True).summary
            ssteps = pd.read_csv(run / "sim" / "steps.csv")
            row = {"live": {"evicted": live["evicted_blocks"], "session_s": live["total_session_time_s"],
                            "steps": len(steps), "kinds": summarize(steps, price), "by_prefill": by_prefill(steps, price)},
                   "sim": {"evicted": sim["evicted_blocks"], "session_s": sim["total_session_time_s"],
                           "steps": int(ssteps.steps.sum()), "kinds": summarize(ssteps, price)}}
            for side, path in (("live", run / "requests.csv"), ("sim", run / "sim" / "requests.csv")):
                row[side]["held"] = held_calls(pd.read_csv(path))
            report["policies"][policy] = row
            _print(policy, row)
        report["from_steps"] = from_steps(out, args.policies, profile, trace, pred)
        if args.overheads:
            report["request_overhead_sweep"] = overhead_sweep(out, args.policies, profile, trace, pred,
                                                              [float(x) for x in args.overheads.split(",")])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report["profile"] = str(profile)
    (out / "steps.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten: {out}/steps.json")
    return 0


def from_steps(out: Path, policies: list[str], profile, trace, pred, seeds: int = 8) -> dict:
    """A profile fitted on each policy's live step log (``cwreplay calibrate --step-log``), and every
    policy's replay simulated under it (``seeds`` seeds of 5% step jitter): session time and evicted
    blocks beside the live ones, and beside the quiet calibration's."""
    from dataclasses import replace

    import numpy as np

    from cwsim.runner import simulate
    from replay.calibrate_steps import calibrate_from_steps
    from replay.live_compare import simulation_of

    def ensemble(prof: Path, policy: str) -> tuple[float, float]:
        t, cfg = simulation_of(out / policy, str(prof), trace=trace, **SCHED,
                               predictor_trace=None if policy == "vllm" else str(pred))
        runs = [simulate(t, replace(cfg, step_jitter=0.05, seed=k)).summary for k in range(seeds)]
        return (float(np.mean([r["total_session_time_s"] for r in runs])),
                float(np.mean([r["evicted_blocks"] for r in runs])))

    rows = {}
    sources = {"quiet calibration": Path(profile)}
    for src in policies:
        fitted = out / f"profile-steps-{src}.json"
        calibrate_from_steps(out / src / "server-steps.csv", profile, fitted)
        sources[f"steps of {src}"] = fitted
    print(f"\nsimulated ({seeds} seeds, 5% jitter) under each profile: session s / evicted, live beside")
    for label, prof in sources.items():
        rows[label] = {}
        for policy in policies:
            live = json.loads((out / policy / "summary.json").read_text())
            st, ev = ensemble(prof, policy)
            rows[label][policy] = {"session_s": st, "evicted": ev, "live_session_s": live["total_session_time_s"],
                                   "live_evicted": live["evicted_blocks"]}
            print(f"  {label:<20} {policy:<14} {st:7.1f} s ({100 * (st / live['total_session_time_s'] - 1):+4.0f}%)"
                  f" {ev:7.0f} ({100 * (ev / max(live['evicted_blocks'], 1) - 1):+4.0f}%)   live "
                  f"{live['total_session_time_s']:.1f} s, {live['evicted_blocks']}", flush=True)
    return rows


def overhead_sweep(out: Path, policies: list[str], profile, trace, pred, overheads: list[float],
                   seeds: int = 8) -> list[dict]:
    """Every policy's replay simulated under ``profile`` with each of ``overheads`` as its
    ``request_overhead_s`` (``seeds`` seeds of 5% step jitter): session time and evicted blocks, beside
    the live ones."""
    from dataclasses import replace

    import numpy as np

    from cwsim.runner import simulate
    from cwsim.steptime import load_profile
    from replay.live_compare import simulation_of

    base = load_profile(profile)
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="cwls-ovh-"))
    print(f"\nsimulated ({seeds} seeds, 5% jitter) with each request overhead: session s / evicted, live beside")
    for ovh in overheads:
        prof = scratch / f"overhead-{1e3 * ovh:g}ms.json"
        prof.write_text(json.dumps(replace(base, request_overhead_s=ovh).to_json(), indent=1) + "\n")
        for policy in policies:
            t, cfg = simulation_of(out / policy, str(prof), trace=trace, **SCHED,
                                   predictor_trace=None if policy == "vllm" else str(pred))
            runs = [simulate(t, replace(cfg, step_jitter=0.05, seed=k)).summary for k in range(seeds)]
            live = json.loads((out / policy / "summary.json").read_text())
            st = float(np.mean([r["total_session_time_s"] for r in runs]))
            ev = float(np.mean([r["evicted_blocks"] for r in runs]))
            rows.append({"request_overhead_s": ovh, "policy": policy, "session_s": st, "evicted": ev,
                         "live_session_s": live["total_session_time_s"], "live_evicted": live["evicted_blocks"]})
            print(f"  {1e3 * ovh:5.1f} ms  {policy:<18} {st:7.1f} s {ev:7.0f}   live {live['total_session_time_s']:.1f} s, "
                  f"{live['evicted_blocks']}", flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _print(policy: str, row: dict) -> None:
    lv, sm = row["live"], row["sim"]
    print(f"\n{policy}: evicted live {lv['evicted']} / sim {sm['evicted']}, sessions {lv['session_s']:.1f} / "
          f"{sm['session_s']:.1f} s, steps {lv['steps']} / {sm['steps']}")
    print(f"  {'kind':<8}{'steps live/sim':>16}{'P/step live/sim':>18}{'D/step live/sim':>18}"
          f"{'time s live/sim':>18}{'live priced s':>15}{'sched ms/step':>15}")
    for kind in ("decode", "prefill", "mixed"):
        a, b = lv["kinds"].get(kind), sm["kinds"].get(kind)
        if a is None and b is None:
            continue
        a = a or dict.fromkeys(("steps", "prefill_tokens_per_step", "decode_seqs_per_step", "time_s", "priced_s"), 0)
        b = b or dict.fromkeys(("steps", "prefill_tokens_per_step", "decode_seqs_per_step", "time_s", "priced_s"), 0)
        print(f"  {kind:<8}{a['steps']:>8}/{b['steps']:<7}{a['prefill_tokens_per_step']:>9.0f}/"
              f"{b['prefill_tokens_per_step']:<8.0f}{a['decode_seqs_per_step']:>9.2f}/{b['decode_seqs_per_step']:<8.2f}"
              f"{a['time_s']:>9.2f}/{b['time_s']:<8.2f}{a['priced_s']:>14.2f}{a.get('schedule_ms_per_step', 0):>15.2f}")
    h, g = lv["held"], sm["held"]
    print(f"  calls held > {1e3 * HELD_S:.0f} ms live / sim: {h['calls']} / {g['calls']} ({h['wait_s']:.1f} / "
          f"{g['wait_s']:.1f} s waiting), their uncached prompt tokens {h['missed_tokens']} / {g['missed_tokens']}, "
          f"the other calls' {h['others_missed_tokens']} / {g['others_missed_tokens']}")
    print("  live steps by prefill tokens: measured / priced ms a step")
    for r in lv["by_prefill"]:
        print(f"    {r['prefill_tokens']:<12}{r['steps']:>6} steps {r['time_ms']:>8.2f} / {r['priced_ms']:<8.2f}")


if __name__ == "__main__":
    raise SystemExit(main())
