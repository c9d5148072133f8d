"""A step-time profile fitted on a live server's own steps under load (``cwreplay calibrate --step-log``).

``cwreplay calibrate --server`` times requests one at a time on a quiet server. Under a replay's
load the same server's steps take longer (``experiments/results/live-steps-2026-12-06``: decode
steps 1.3-1.6x, steps with a small prefill chunk 2.0-2.3x what such a profile prices them at, on a
2-core CPU machine), and the simulated sessions come out 37-38% short. The server's step log
(``cwreplay serve --step-log``, ``replay.vllm_plugin.scheduler.StepLog``) holds every step's
composition and when it was scheduled; here the profile's step terms are fitted on those steps:

- a step's time is from its scheduling to the next step's (everything the engine's loop did for
  it: scheduling, the forward pass, the outputs, the requests that came in), taken only while the
  engine is busy: the next step began within :data:`BUSY_GAP_S` of this one's output (on the
  2-core machine 95% of those gaps are under 0.75 ms; an engine with nothing to do waits for
  the next call, milliseconds to seconds);
- the slowest ``trim`` share of those steps is left out (a collector pause, an input flood);
- least squares on the error in seconds (not relative): the fitted steps then sum to about the
  measured time, which is what a session's time is made of;
- the other fields (``request_overhead_s``, the KV sizes, the model) come from a ``base`` profile
  (the server calibration), and ``frontend_step_share`` is 0: the frontend's effect on the steps
  is in their measured times already;
- ``request_overhead_s`` may be given as measured under the same load instead
  (:func:`measured_request_overhead`: a replay's ``summary.json`` has the client's latency less
  vLLM's queue and inference time, ``outside_engine_s``; its server's step log says how long the
  calls waited for the step in progress, which vLLM does not count as queueing and ``cwsim``
  models itself). A policy that holds calls back for a horizon of a few tens of milliseconds
  (``working-set`` with gaps x 0.05) turns on a few milliseconds of it
  (``experiments/results/live-steps-2026-12-07-costly``).

Fit it on a replay that is not the one it will be judged on (another policy, other sessions): on
the 2026-12-06 log, fitted on ``working-set``'s steps it puts ``vllm``'s simulated sessions 8% off
the live ones, against 38% for the quiet calibration.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from replay.calibrate import TERMS, fit

__all__ = ["BUSY_GAP_S", "busy_steps", "calibrate_from_steps", "measured_request_overhead", "step_in_progress_wait",
           "step_kinds"]

#: the most time between a step's output and the next step's scheduling for the engine to count as busy
BUSY_GAP_S = 0.002


def step_kinds(steps):
    """Each row's kind of a step log (a DataFrame): ``decode`` (no prefill), ``prefill`` (no decoding
    sequence) or ``mixed``."""
    import numpy as np

    return np.where(steps.prefill_tokens == 0, "decode", np.where(steps.decode_seqs == 0, "prefill", "mixed"))


def busy_steps(log: str | os.PathLike, trim: float = 0.02, *, min_steps: int = 2 * len(TERMS)) -> list[dict]:
    """The log's steps as fit points (``kind`` decode / prefill / mixed; counts ``P``, ``A``, ``D``,
    ``C``; time ``t`` to the next step's scheduling), busy ones only, the slowest ``trim`` left out.
    ``ValueError`` (one line naming the file) for a file that is not a step log or has fewer than
    ``min_steps`` busy steps."""
    import numpy as np
    import pandas as pd

    from cwsim.runner import STEP_FIELDS

    try:
        s = pd.read_csv(log)
    except (OSError, ValueError) as e:
        raise ValueError(f"--step-log {log}: cannot read it as a CSV ({str(e).strip().splitlines()[0]})") from None
    missing = [c for c in STEP_FIELDS if c not in s.columns]
    if missing:
        raise ValueError(f"--step-log {log}: not a step log (no column {missing[0]!r}; "
                         "cwreplay serve --step-log writes one)")
    if not 0 <= trim < 0.5:
        raise ValueError(f"--trim must be in [0, 0.5), got {trim}")
    s = s.sort_values("start_s", kind="stable").reset_index(drop=True)
    nxt = s.start_s.shift(-1)
    s["t"] = nxt - s.start_s
    s = s[(nxt - s.end_s <= BUSY_GAP_S) & (s.steps == 1) & (s.t > 0)]  # (the last step has no next: NaN, out)
    if len(s) and trim:
        s = s[s.t <= np.quantile(s.t, 1.0 - trim)]
    if len(s) < min_steps:
        raise ValueError(f"--step-log {log}: {len(s)} busy steps, too few to fit {len(TERMS)} terms")
    return [{"kind": k, "P": int(r.prefill_tokens), "A": float(r.attn_pairs), "D": int(r.decode_seqs),
             "C": int(r.decode_ctx), "t": float(r.t)} for k, r in zip(step_kinds(s), s.itertuples())]


def step_in_progress_wait(run: str | os.PathLike, log: str | os.PathLike) -> float:
    """The mean wait of a replay's calls for the engine step in progress when they were sent: a call sent
    while a step ran (between its scheduling and its output, in the server's step log ``log``) is queued
    by vLLM when that step's output is back, one sent between steps at once. The client's send times
    (``requests.csv`` ``sent_s``) and the log's wall clock are aligned by the run's ``t0_unix``. A resumed
    run (several attempts, each timing its calls from its own start) is refused."""
    import numpy as np
    import pandas as pd

    run = Path(run)
    try:
        reqs = pd.read_csv(run / "requests.csv")
        attempts = json.loads((run / "run.json").read_text())["attempts"]
        t0 = attempts[-1]["t0_unix"]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"--request-overhead-from {run}: not a finished cwreplay run ({e})") from None
    if len(attempts) > 1:
        raise ValueError(f"--request-overhead-from {run}: a resumed run ({len(attempts)} attempts): its calls' "
                         "send times count from different starts; use a run made in one go")
    steps = pd.read_csv(log).sort_values("start_s", kind="stable")
    start, end = steps.start_s.to_numpy() - t0, steps.end_s.to_numpy() - t0
    sent = reqs.sent_s.to_numpy(dtype=float)
    k = np.searchsorted(start, sent, side="right") - 1  # the last step scheduled by then
    kk = np.clip(k, 0, None)
    wait = np.where((k >= 0) & (sent <= end[kk]), end[kk] - sent, 0.0)
    return float(wait.mean()) if len(wait) else 0.0


def measured_request_overhead(runs: Sequence[str | os.PathLike], logs: Sequence[str | os.PathLike]) -> float:
    """The request overhead under load of finished replays (``cwreplay run`` folders, each with its server's
    step log, in the same order): their ``summary.json`` ``outside_engine_s`` (the client's latency less
    vLLM's queue and inference time) less the wait for the step in progress
    (:func:`step_in_progress_wait`), weighted by their calls. ``ValueError`` (one line naming the folder)
    for a folder without the figure (not a run, or one whose server did not export it)."""
    if len(runs) != len(logs):
        raise ValueError(f"--request-overhead-from: {len(runs)} run(s) for {len(logs)} step log(s): give each "
                         "run's own step log, in the same order")
    total = calls = 0.0
    for run, log in zip(runs, logs):
        try:
            s = json.loads((Path(run) / "summary.json").read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"--request-overhead-from {run}: not a finished cwreplay run ({e})") from None
        outside, n = s.get("outside_engine_s"), s.get("requests") or 0
        if outside is None or not n:
            raise ValueError(f"--request-overhead-from {run}: its summary.json has no outside_engine_s (a run "
                             "before it was measured, or a server without vLLM's queue and inference histograms)")
        overhead = outside - step_in_progress_wait(run, log)
        if overhead < 0:
            raise ValueError(f"--request-overhead-from {run}: its calls waited {1e3 * (outside - overhead):.1f} ms "
                             f"for the step in progress, more than the {1e3 * outside:.1f} ms they spent outside "
                             f"vLLM's queue and steps: is {log} that run's own step log?")
        total += overhead * n
        calls += n
    if not calls:
        raise ValueError("--request-overhead-from: no run given")
    return total / calls


def calibrate_from_steps(log: str | os.PathLike | Sequence[str | os.PathLike], base: str | os.PathLike,
                         out_file: str | os.PathLike, *, name: str | None = None, trim: float = 0.02,
                         request_overhead_s: float | None = None):
    """Fit the step terms on ``log`` (:func:`busy_steps`; several logs: their busy steps pooled, each
    log trimmed on its own), the rest from the profile ``base``; write the profile to ``out_file``
    (atomically, with its fit under ``_fit``) and return it.

    Pool the logs of runs whose steps differ in kind (a policy that recomputes evicted contexts has
    prefill-heavy steps, one that hits has small prefills and decodes): a fit on one kind of mix
    prices the other from terms it barely saw. ``request_overhead_s``: the request overhead measured under
    the same load (:func:`measured_request_overhead`) instead of the base profile's."""
    from cwsim.steptime import load_profile
    from traces.files import atomic_write_text, ensure_parent

    out = ensure_parent(out_file)
    wall0 = time.perf_counter()
    try:
        base_profile = load_profile(str(base))
    except ValueError as e:
        raise ValueError(f"--base-profile {base}: {e}") from None
    if request_overhead_s is not None and not request_overhead_s >= 0:
        raise ValueError(f"--request-overhead-from: a request overhead must be >= 0 s, got {request_overhead_s}")
    logs = [log] if isinstance(log, (str, os.PathLike)) else list(log)
    if not logs:
        raise ValueError("--step-log: no step log given")
    points = [p for one in logs for p in busy_steps(one, trim, min_steps=0)]
    if len(points) < 2 * len(TERMS):
        raise ValueError(f"--step-log {', '.join(map(str, logs))}: {len(points)} busy steps, too few to fit "
                         f"{len(TERMS)} terms")
    names = ", ".join(Path(one).name for one in logs)
    coef, err, mape = fit(points, TERMS, relative=False)
    fitted_terms = replace(base_profile, **coef)
    measured = sum(p["t"] for p in points)
    fitted = sum(fitted_terms.step_time(p["P"], p["A"], p["D"], p["C"]) for p in points)
    profile = replace(
        fitted_terms, frontend_step_share=0.0, name=name or f"{base_profile.name}-steps",
        request_overhead_s=(base_profile.request_overhead_s if request_overhead_s is None else request_overhead_s),
        source=(f"step terms fitted on {len(points)} busy steps of a live server's step "
                f"log{'s' if len(logs) > 1 else ''} {names} "
                f"(time to the next step's scheduling, the slowest {100 * trim:.0f}% left out; least squares in "
                f"seconds: fitted {fitted:.2f} s against {measured:.2f} s measured; MAPE "
                f"{100 * mape['all']:.0f}%), by replay.calibrate_steps; "
                + ("" if request_overhead_s is None else
                   f"request_overhead_s {1e3 * request_overhead_s:.1f} ms as measured under the replays' load; ")
                + f"the rest from {base_profile.name} ({base_profile.source})"),
        notes="terms " + ", ".join(f"{k} = {coef[k]:.4g} +- {err[k]:.2g}" for k in TERMS)
              + "; frontend_step_share 0: the steps were timed under the frontend's load")
    d = profile.to_json()
    d["_fit"] = {"step_log": str(logs[0]) if len(logs) == 1 else [str(one) for one in logs], "base": str(base),
                 "trim": trim, "steps": len(points), "request_overhead_s": request_overhead_s,
                 "kinds": {k: sum(p["kind"] == k for p in points) for k in ("decode", "prefill", "mixed")},
                 "stderr": err, "mape": mape, "measured_s": measured, "fitted_s": fitted,
                 "wall_s": time.perf_counter() - wall0}
    atomic_write_text(out, json.dumps(d, indent=1) + "\n")
    return profile
