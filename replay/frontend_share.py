"""A server's frontend share (a profile's ``frontend_step_share``): measured through its API, fitted by simulation.

On a few-core server the frontend's work on requests slows the engine's steps (``cwsim.frontend``).
:func:`probe_contention` measures it: the time of one decode step of a batch (the batch's time
for ``n2`` output tokens less its time for ``n1``, per step: the request and prefill costs cancel)
with nothing else in flight ("quiet"), and while a side client sends, one after another, a fully
cached prompt of ``side_prompt`` tokens asking for one token ("loaded": next to no engine work,
all the frontend's). Modes alternate, ``rounds`` of each; the ratio is taken between the modes'
medians over the rounds, and the probe says whether its rounds agree (most of a mode's rounds
within 1.5x of its median; else the machine was not steady). :func:`fit_share` then runs the same two
workloads in cwsim with the fitted profile for shares 0-1 and returns the share whose simulated
loaded / quiet ratio matches the measured one (0 when the server shows no more slow-down than the
side requests' own one-token steps explain, 1 at most).

Measured on the 2-core CPU machine (``experiments/probe_frontend_contention.py``, a batch of 8,
2,000-token side prompts): steps 1.4-2.2x as long loaded, a share of 0.88 for the mean ratio 1.64.
"""

from __future__ import annotations

import asyncio
import csv
import json
import statistics
import tempfile
import time
from pathlib import Path

__all__ = ["contention_ratio", "fit_share", "probe_contention", "probe_workload", "simulated_steps"]

#: the batch's prompts and output lengths (short, long run) of a probe
BATCH_PROMPT = 64
DECODE_N = (8, 72)
_GRID = tuple(k / 10 for k in range(11))


#: a round this far from its mode's median (either way) is one the machine threw off
ROUND_TOLERANCE = 1.5


def contention_ratio(quiet_ms: list[float], loaded_ms: list[float]) -> tuple[float, bool]:
    """(loaded / quiet step time, whether the rounds agree): the ratio of the modes' medians over
    their rounds, so that one round thrown off by the machine (a quiet round at 17 ms beside 3.9 and
    4.1) does not decide it; the rounds agree when, in each mode, most of them lie within
    :data:`ROUND_TOLERANCE` of its median (two rounds at 3.9 and 17 ms do not)."""
    ratio = statistics.median(loaded_ms) / statistics.median(quiet_ms)
    consistent = True
    for ts in (quiet_ms, loaded_ms):
        m = statistics.median(ts)
        near = sum(m / ROUND_TOLERANCE <= t <= m * ROUND_TOLERANCE for t in ts)
        consistent &= 2 * near > len(ts)
    return ratio, consistent


async def probe_contention(prober, batch: int, side_prompt: int, repeats: int, rounds: int = 3) -> dict:
    """Decode-step times of a batch of ``batch``, quiet and loaded (``prober``: a
    ``replay.calibrate_server._Prober``); the median of ``repeats`` per mode and round, and
    :func:`contention_ratio` over the rounds."""
    n1, n2 = DECODE_N
    long = prober.fresh(side_prompt)
    await prober.complete(long, 1)  # cached from now on

    async def batch_s(n: int) -> float:
        prompts = [prober.fresh(BATCH_PROMPT) for _ in range(batch)]
        for pr in prompts:  # cached first: the batch joins one small prefill step
            await prober.complete(pr, 1)
        t = time.perf_counter()
        await asyncio.gather(*(prober.complete(pr, n) for pr in prompts))
        return time.perf_counter() - t

    out = {"batch": batch, "side_prompt": side_prompt, "quiet_ms": [], "loaded_ms": [], "side_requests": 0}
    side: list[float] = []
    for mode in ("quiet", "loaded") * rounds:
        per = []
        for _ in range(repeats):
            stop = asyncio.Event()

            async def loader() -> None:
                while not stop.is_set():
                    side.append((await prober.complete(long, 1))[0])
            task = asyncio.create_task(loader()) if mode == "loaded" else None
            short, longer = await batch_s(n1), await batch_s(n2)
            if task is not None:
                stop.set()
                await task
            per.append((longer - short) / (n2 - n1))
        out[f"{mode}_ms"].append(1e3 * statistics.median(per))
    out["side_requests"] = len(side)
    out["side_request_ms"] = 1e3 * statistics.median(side) if side else None
    out["ratio"], out["consistent"] = contention_ratio(out["quiet_ms"], out["loaded_ms"])
    return out


def probe_workload(n_out: int, loaded: bool, batch: int, side_prompt: int, start_s: float, side_calls: int):
    """The probe as a trace: ``batch`` one-call sessions starting together at ``start_s``; loaded, a side
    session sending the same ``side_prompt`` tokens ``side_calls`` times (one output token, no gap) from 0."""
    from traces.format import Call, Session, Trace

    sessions = [Session(f"q{i}", (Call(f"q{i}", 0, ((f"q{i}:p", BATCH_PROMPT),), n_out, None, (),
                                       timestamp_s=start_s),)) for i in range(batch)]
    if loaded:
        side = tuple(Call("side", t, (("side:p", side_prompt),), 1, None, (), gap_s=0.0,
                          timestamp_s=0.0 if t == 0 else None) for t in range(side_calls))
        sessions.append(Session("side", side))
    return Trace(sessions, {"source": "replay.frontend_share probe"})


def simulated_steps(profile: dict, share: float, *, batch: int, side_prompt: int, block_size: int,
                    max_num_batched_tokens: int) -> tuple[float, float]:
    """cwsim's (quiet, loaded) decode-step times in ms for the probe, under ``profile`` (a profile's
    JSON) with ``frontend_step_share = share``. The batch starts well after the side client's first
    (uncached) call, and the side client goes on until after the batch's last answer."""
    from cwsim.config import SimConfig
    from cwsim.runner import simulate
    from cwsim.steptime import StepTimeProfile, prefill_attn_pairs

    n1, n2 = DECODE_N
    prof = StepTimeProfile.from_json(profile)
    chunks = -(-side_prompt // max_num_batched_tokens)
    first_side_s = (prof.request_overhead_s + chunks * prof.step_overhead_s
                    + prof.step_time(side_prompt, prefill_attn_pairs(side_prompt, 0), 0, 0))
    start_s = 4 * first_side_s + 0.1
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "profile.json"
        path.write_text(json.dumps({**profile, "frontend_step_share": share}))
        blocks = 4 * (-(-side_prompt // block_size) + batch * -(-(BATCH_PROMPT + n2) // block_size)) + 16
        cfg = SimConfig(profile=str(path), kv_blocks=blocks, block_size=block_size, max_num_seqs=batch + 1,
                        max_num_batched_tokens=max_num_batched_tokens, arrivals="trace")
        steps = []
        for loaded in (False, True):
            t = {}
            for n in (n1, n2):
                side_calls = 200
                while True:
                    out = Path(tmp) / f"{loaded}-{n}"
                    simulate(probe_workload(n, loaded, batch, side_prompt, start_s, side_calls), cfg, out_dir=out)
                    ends = {r["session_id"]: float(r["end_s"]) for r in csv.DictReader(open(out / "sessions.csv"))}
                    t[n] = max(v for k, v in ends.items() if k.startswith("q")) - start_s
                    if not loaded or ends["side"] > t[n] + start_s:
                        break
                    side_calls *= 4  # the side client stopped before the batch's end: again, longer
            steps.append(1e3 * (t[n2] - t[n1]) / (n2 - n1))
    return steps[0], steps[1]


def fit_share(profile: dict, measured_ratio: float, **shape) -> tuple[float, list[dict]]:
    """The share (0-1) whose simulated loaded / quiet step ratio is ``measured_ratio`` (linear
    between grid points), and the grid (``shape``: :func:`simulated_steps`' keywords)."""
    rows = []
    for share in _GRID:
        quiet, loaded = simulated_steps(profile, share, **shape)
        rows.append({"share": share, "quiet_ms": quiet, "loaded_ms": loaded, "ratio": loaded / quiet})
    if measured_ratio <= rows[0]["ratio"]:
        return 0.0, rows
    for a, b in zip(rows, rows[1:]):
        if a["ratio"] <= measured_ratio <= b["ratio"] and b["ratio"] > a["ratio"]:
            return a["share"] + (measured_ratio - a["ratio"]) * (b["share"] - a["share"]) / (b["ratio"] - a["ratio"]), rows
    return 1.0, rows
