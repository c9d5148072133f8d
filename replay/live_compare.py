"""A live replay against the simulator: the same run in ``cwsim``, side by side.

``compare_live(run_dir, profile=FILE, ...)`` reads a ``cwreplay run`` folder
(``run.json``, ``summary.json``, the CSVs), runs the same trace, sessions,
pool, block size, arrivals and time scale in ``cwsim`` with the run's policy (``--policy``)
and predictor (``--predictor-trace``) and the given (calibrated) step-time
profile (``run_dir/sim``), and reports: evicted blocks on each side, the
first evicted block that differs (the simulator's hashes mapped to vLLM's,
:func:`replay.compare.hash_map`) and the share of distinct evicted blocks both evicted,
prefix hit rate, preemptions, and the mean absolute percentage error of
per-call latency (finish - arrival), of per-session completion time, and of
the session time less the trace's gaps (what the server and engine take). It
writes ``run_dir/compare.json`` and ``run_dir/compare_sessions.png`` (simulated
against real session times).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cwsim.config import SimConfig
from cwsim.runner import simulate
from replay.compare import hash_map, sim_settings
from replay.live import load_outputs
from replay.report import joined_tables, session_scatter
from traces.files import atomic_write_text
from traces.format import Session, Trace
from traces.reader import load_trace


class CompareError(ValueError):
    """The folder is not a finished live run, or its trace cannot be found."""


def scaled(trace: Trace, time_scale: float) -> Trace:
    """``trace`` with every gap and recorded start times ``time_scale``: what the live run waited."""
    sessions = [Session(s.session_id, tuple(
        replace(c, gap_s=c.next_gap_s * time_scale,
                timestamp_s=None if c.timestamp_s is None else c.timestamp_s * time_scale) for c in s.calls))
        for s in trace.sessions]
    return Trace(sessions, trace.header, trace.source)


def _mape(real: pd.Series, sim: pd.Series) -> float | None:
    ok = real > 0
    return float(np.mean(np.abs(sim[ok] - real[ok]) / real[ok])) if ok.any() else None


def read_run(run: Path) -> tuple[dict, dict]:
    """A finished run's ``run.json`` and ``summary.json``, or ``CompareError``."""
    try:
        state = json.loads((run / "run.json").read_text())
        real = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError) as e:
        raise CompareError(f"{run}: not a cwreplay run folder (run.json / summary.json: {e})") from None
    if real.get("partial"):
        raise CompareError(f"{run}: the run is partial ({real.get('stopped_by')}); finish it with --resume first")
    return state, real


def simulation_of(run_dir: str | Path, profile: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                  trace: str | Path | Trace | None = None,
                  predictor_trace: str | Path | None = None) -> tuple[Trace, SimConfig]:
    """The trace (gaps as the run waited them) and the ``cwsim`` configuration that simulate the live run in
    ``run_dir`` (see :func:`compare_live`)."""
    run = Path(run_dir)
    return _simulation(run, *read_run(run), profile, max_num_seqs, max_num_batched_tokens, trace, predictor_trace)


def _simulation(run: Path, state: dict, real: dict, profile: str, max_num_seqs: int, max_num_batched_tokens: int,
                trace, predictor_trace) -> tuple[Trace, SimConfig]:
    cfg = state["config"]
    if isinstance(trace, Trace):
        tr = trace
    else:
        path = Path(trace if trace is not None else state["trace"])
        if not path.is_file():
            raise CompareError(f"{run}: the run's trace {str(path)!r} is not a file here: give --trace")
        tr = load_trace(path)
    tr = scaled(tr, cfg["time_scale"])
    policy = cfg.get("policy", "vllm")
    pred = predictor_trace if predictor_trace is not None else cfg.get("predictor_trace")
    if pred is not None and not Path(pred).is_file():
        raise CompareError(f"{run}: the predictor trace {str(pred)!r} is not a file here: give --predictor-trace")
    try:
        settings = sim_settings(cfg.get("policy_settings") or ())
    except ValueError as e:
        raise CompareError(f"{run}: {e}") from None
    sim_cfg = SimConfig(policy=policy, predictor_trace=None if pred is None else str(pred), cpu_kv_blocks=0,
                        profile=profile, kv_blocks=real["kv_blocks"], block_size=real["block_size"],
                        max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                        arrivals=cfg["arrivals"], agents=cfg["agents"], max_sessions=cfg["max_sessions"], **settings)
    return tr, sim_cfg


def compare_live(run_dir: str | Path, profile: str, *, max_num_seqs: int, max_num_batched_tokens: int,
                 trace: str | Path | Trace | None = None, predictor_trace: str | Path | None = None) -> dict:
    """See the module docstring; ``trace``: the trace (or its file) when the recorded path does not hold it;
    ``predictor_trace``: what the server's predictor was fitted on, when the run did not record it."""
    run = Path(run_dir)
    state, real = read_run(run)
    cfg = state["config"]
    tr, sim_cfg = _simulation(run, state, real, profile, max_num_seqs, max_num_batched_tokens, trace, predictor_trace)
    policy, pred = sim_cfg.policy, sim_cfg.predictor_trace
    sim = simulate(tr, sim_cfg, run / "sim", eviction_log=True).summary
    calls, sess = joined_tables(run)
    waited = {s.session_id: sum(c.next_gap_s for c in s.calls[:-1]) for s in tr.sessions}
    gaps = sess["session_id"].map(waited).fillna(0.0)
    hmap = hash_map(tr, real["block_size"], load_outputs(run), state["vocab_size"], cfg["max_sessions"])
    ev_real = [int(h) for h in pd.read_csv(run / "evictions.csv", dtype={"block_hash": "uint64"})["block_hash"]]
    ev_sim = [hmap.get(int(h)) for h in pd.read_csv(run / "sim" / "evictions.csv",
                                                      dtype={"block_hash": "int64"})["block_hash"]]
    first = next((i for i in range(max(len(ev_real), len(ev_sim)))
                  if (ev_real[i] if i < len(ev_real) else None) != (ev_sim[i] if i < len(ev_sim) else None)), None)
    rel = lambda a, b: None if not a else (b - a) / a  # noqa: E731
    either = set(ev_real) | set(ev_sim)
    out = {
        "run": str(run), "profile": profile, "policy": policy,
        "predictor_trace": None if pred is None else str(pred),
        "evicted_blocks": {"real": real["evicted_blocks"], "sim": sim["evicted_blocks"],
                           "error": rel(real["evicted_blocks"], sim["evicted_blocks"])},
        "first_differing_eviction": None if first is None else {
            "index": first, "real": ev_real[first] if first < len(ev_real) else None,
            "sim": ev_sim[first] if first < len(ev_sim) else None},
        # distinct blocks evicted by both, over those evicted by either (1: the same blocks, maybe in another order)
        "evicted_in_common": len(set(ev_real) & set(ev_sim)) / len(either) if either else None,
        "preemptions": {"real": real["preemptions"], "sim": sim["preemptions"],
                        "error": rel(real["preemptions"], sim["preemptions"])},
        "prefix_hit_rate": {"real": real["prefix_hit_rate"], "sim": sim["prefix_hit_rate"]},
        "call_latency_mape": _mape(calls["latency_real"], calls["latency_sim"]),
        "session_time_mape": _mape(sess["duration_s_real"], sess["duration_s_sim"]),
        # the same less the trace's gaps (equal on both sides): the time the server and engine account for
        "session_busy_time_mape": _mape(sess["duration_s_real"] - gaps, sess["duration_s_sim"] - gaps),
        "calls_compared": len(calls), "sessions_compared": len(sess),
        "resumed": real.get("attempts", 1) > 1,
    }
    atomic_write_text(run / "compare.json", json.dumps(out, indent=2, default=str) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    session_scatter(sess, out["session_time_mape"], ax)
    fig.tight_layout()
    fig.savefig(run / "compare_sessions.png", dpi=110)
    plt.close(fig)
    return out
