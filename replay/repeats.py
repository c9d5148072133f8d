"""Repeated live runs of one configuration against an ensemble of simulations of it.

One live run under pool pressure is one sample: whether a session's blocks are
still cached when its next call comes can turn on a few milliseconds, so two
runs of the same trace on the same server differ (evicted blocks by a few
percent, preemptions by several, session times by 10-20% per session). A
single simulated run is one sample of the same kind. So the figures that the
simulator is held to are compared as means: the mean over ``n`` live runs
(each on a fresh server, ``cwreplay run`` folders) against the mean over an
ensemble of the same configuration simulated under ``seeds`` seeds of step-time
noise (``SimConfig.step_jitter``: every step's time times a lognormal factor of
mean 1).

- :func:`check_repeats` refuses runs that do not share one configuration;
- :func:`live_figures` reads a finished run's figures and per-session times;
- :func:`simulated_ensemble` simulates the configuration of a run
  (:func:`replay.live_compare.simulation_of`) under each seed;
- :func:`compare_repeats` sets the two side by side: per figure (evicted
  blocks, preemptions, prefix hit rate, total session time) each side's mean
  and range, the simulated mean's error against the live one, the live mean's
  bootstrap interval and whether the simulated mean falls inside it; and the
  per-session time MAPE of the means (each session's mean real time against its
  mean simulated time);
- :func:`repeats_report` does all of it for a list of run folders (``cwreplay compare RUN RUN ...``).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cwsim.runner import simulate
from replay.live_compare import CompareError, read_run, simulation_of
from traces.format import Trace

#: the figures compared, as ``summary.json`` names them (the same keys in ``cwsim run`` and ``cwreplay run``)
FIGURES = ("evicted_blocks", "preemptions", "prefix_hit_rate", "total_session_time_s")


def _figures(summary: dict, sessions_csv: Path) -> dict:
    sess = pd.read_csv(sessions_csv, dtype={"session_id": str})
    return {**{k: summary[k] for k in FIGURES},
            "session_times": dict(zip(sess["session_id"], sess["duration_s"].astype(float)))}


#: ``run.json`` configuration fields that differ between repeats (each ran on a server of its own)
PER_SERVER = frozenset({"server", "events", "events_replay"})


def check_repeats(run_dirs) -> None:
    """``CompareError`` (one line, naming both runs and the field) unless every run is finished and shares
    the first one's configuration: its ``run.json`` settings (policy, agents, arrivals, time scale, ...,
    all but :data:`PER_SERVER`), its trace, and the server's pool and block size."""
    first = None
    for run in map(Path, run_dirs):
        state, real = read_run(run)
        key = {**{k: v for k, v in state["config"].items() if k not in PER_SERVER}, "trace": state.get("trace"),
               "kv_blocks": real.get("kv_blocks"), "block_size": real.get("block_size")}
        if first is None:
            first = run, key
            continue
        for k in sorted(set(key) | set(first[1])):
            if key.get(k) != first[1].get(k):
                raise CompareError(f"{run}: {k} is {key.get(k)!r} where {first[0]} has {first[1].get(k)!r}: "
                                   "repeats must share one configuration")


def live_figures(run_dir: str | Path) -> dict:
    """A finished ``cwreplay run`` folder's :data:`FIGURES` and ``session_times`` ({session id: seconds})."""
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    if summary.get("partial"):
        raise ValueError(f"{run}: the run is partial ({summary.get('stopped_by')}); finish it with --resume first")
    return _figures(summary, run / "sessions.csv")


def simulated_ensemble(run_dir: str | Path, profile: str, *, seeds: int, step_jitter: float, max_num_seqs: int,
                       max_num_batched_tokens: int, trace: str | Path | Trace | None = None,
                       predictor_trace: str | Path | None = None, on_seed=None) -> list[dict]:
    """The live run's configuration simulated under seeds ``0 .. seeds - 1`` with ``step_jitter``: each
    seed's :data:`FIGURES` and ``session_times``. ``on_seed(k)`` after each."""
    tr, cfg = simulation_of(run_dir, profile, max_num_seqs=max_num_seqs,
                            max_num_batched_tokens=max_num_batched_tokens, trace=trace,
                            predictor_trace=predictor_trace)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cw-ensemble-") as tmp:
        for seed in range(seeds):
            out = Path(tmp) / str(seed)
            res = simulate(tr, replace(cfg, step_jitter=step_jitter, seed=seed), out)
            rows.append(_figures(res.summary, out / "sessions.csv"))
            if on_seed is not None:
                on_seed(seed)
    return rows


def _interval(xs: np.ndarray, level: float, n: int, seed: int) -> tuple[float, float]:
    """A percentile bootstrap interval of the mean of ``xs`` (seeded: the same runs give the same interval)."""
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, len(xs), (n, len(xs)))].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def compare_repeats(live: list[dict], sim: list[dict], *, level: float = 0.9, n_boot: int = 10_000,
                    seed: int = 0) -> dict:
    """``live`` runs (:func:`live_figures`) against ``sim`` seeds (:func:`simulated_ensemble`).

    Per figure of :data:`FIGURES`: ``live`` / ``sim`` (means), ``live_range`` / ``sim_range`` ([lowest,
    highest]), ``error`` (sim / live - 1; 0 when both are 0, ``None`` when only the live mean is), ``live_interval`` (a ``level``
    bootstrap interval of the live mean) and ``inside`` (the simulated mean falls in it). Then
    ``session_time_mape_of_means``: over the sessions every run and seed finished, the mean absolute
    percentage error of each session's mean simulated time against its mean real time
    (``session_means``: {session id: {real, sim}})."""
    if not live or not sim:
        raise ValueError(f"compare_repeats: {len(live)} live runs and {len(sim)} simulated seeds; need one of each")
    out: dict = {"live_runs": len(live), "sim_seeds": len(sim)}
    for key in FIGURES:
        xs = np.array([r[key] for r in live], dtype=float)
        ys = np.array([r[key] for r in sim], dtype=float)
        lm, sm = float(xs.mean()), float(ys.mean())
        lo, hi = _interval(xs, level, n_boot, seed)
        out[key] = {"live": lm, "sim": sm, "live_range": [float(xs.min()), float(xs.max())],
                    "sim_range": [float(ys.min()), float(ys.max())],
                    "error": sm / lm - 1.0 if lm else (0.0 if sm == 0 else None),
                    "live_interval": [lo, hi], "inside": bool(lo <= sm <= hi)}
    common = set.intersection(*(set(r["session_times"]) for r in live + sim))
    real = {s: np.mean([r["session_times"][s] for r in live]) for s in common}
    simd = {s: np.mean([r["session_times"][s] for r in sim]) for s in common}
    errs = [abs(simd[s] - real[s]) / real[s] for s in sorted(common) if real[s] > 0]
    out["session_means"] = {s: {"real": float(real[s]), "sim": float(simd[s])} for s in sorted(common)}
    out["sessions_compared"] = len(errs)
    out["session_time_mape_of_means"] = float(np.mean(errs)) if errs else None
    return out


def repeats_report(run_dirs, profile: str, *, seeds: int, step_jitter: float, max_num_seqs: int,
                   max_num_batched_tokens: int, trace: str | Path | Trace | None = None,
                   predictor_trace: str | Path | None = None, on_seed=None) -> dict:
    """Finished live runs of one configuration (:func:`check_repeats`) against the ensemble of its
    simulation (:func:`simulated_ensemble`, from the first run's configuration): :func:`compare_repeats`'
    figures, the runs, the profile, and ``session_time_mape_per_run`` (mean and range of the runs' own
    ``compare.json`` figures; ``None`` unless every run was compared)."""
    runs = [Path(r) for r in run_dirs]
    if not runs:
        raise CompareError("no run folders given")
    check_repeats(runs)
    sim = simulated_ensemble(runs[0], profile, seeds=seeds, step_jitter=step_jitter, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, trace=trace,
                             predictor_trace=predictor_trace, on_seed=on_seed)
    out = {"runs": [str(r) for r in runs], "profile": str(profile), "step_jitter": step_jitter,
           **compare_repeats([live_figures(r) for r in runs], sim)}
    per_run = [json.loads((r / "compare.json").read_text()).get("session_time_mape") if (r / "compare.json").is_file()
               else None for r in runs]
    out["session_time_mape_per_run"] = None if None in per_run else {
        "mean": sum(per_run) / len(per_run), "range": [min(per_run), max(per_run)]}
    return out


def format_repeats(c: dict) -> list[str]:
    """``repeats_report``'s figures as lines of a table: each side's mean [range], the live mean's interval,
    the error."""
    lines = [f"{c['live_runs']} live runs against {c['sim_seeds']} simulated seeds",
             f"{'figure':<22}{'live mean [range]':>28}{'live 90% interval':>22}{'simulated mean [range]':>28}"
             f"{'error':>9}"]
    for key in FIGURES:
        f = c[key]
        err = "n/a" if f["error"] is None else f"{100 * f['error']:+.1f}%"
        lines.append(f"{key:<22}{f['live']:>12.4g} [{f['live_range'][0]:.4g}-{f['live_range'][1]:.4g}]"
                     f"{f['live_interval'][0]:>12.4g}-{f['live_interval'][1]:<9.4g}"
                     f"{f['sim']:>12.4g} [{f['sim_range'][0]:.4g}-{f['sim_range'][1]:.4g}]"
                     f"{err:>9} ({'inside' if f['inside'] else 'outside'})")
    m, per = c["session_time_mape_of_means"], c.get("session_time_mape_per_run")
    line = f"session time MAPE of the means: {'n/a' if m is None else f'{100 * m:.1f}%'}"
    if per is not None:
        line += f"; per run {100 * per['mean']:.1f}% [{100 * per['range'][0]:.1f}-{100 * per['range'][1]:.1f}%]"
    lines.append(line)
    return lines
