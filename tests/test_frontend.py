"""The shared frontend core (cwsim.frontend): processor sharing, and the engine's steps sharing it."""

import csv
import json

import pytest
import simpy

from cwsim.config import SimConfig
from cwsim.frontend import SharedCore
from cwsim.runner import simulate
from cwsim.steptime import StepTimeProfile
from traces.format import Call, Session, Trace


def test_work_on_the_core_is_processor_shared():
    env = simpy.Environment()
    core = SharedCore(env)
    done = []

    def job(name, at, work):
        yield env.timeout(at)
        yield core.run(work)
        done.append((name, env.now))

    env.process(job("a", 0.0, 3.0))
    env.process(job("b", 1.0, 1.0))  # a has 2 left: both at half speed until b is done
    env.process(job("c", 10.0, 0.0))
    env.run()
    assert done == [("b", 3.0), ("a", 4.0), ("c", 10.0)]
    assert not core.busy


def _profile(tmp_path, share: float) -> str:
    """Every step takes 1 s; every request brings 1 s of frontend work."""
    p = dict(name="unit", model="m", gpu="g", step_overhead_s=1.0, prefill_token_s=0.0, decode_seq_s=0.0,
             prefill_attn_pair_s=0.0, decode_ctx_token_s=0.0, kv_bytes_per_token=1, weights_bytes=0,
             gpu_mem_bytes=0, request_overhead_s=1.0, frontend_step_share=share)
    path = tmp_path / f"p{share}.json"
    path.write_text(json.dumps(StepTimeProfile.from_json(p).to_json()))
    return str(path)


def _ends(tmp_path, share: float, starts) -> list[float]:
    sessions = [Session(f"s{i}", (Call(f"s{i}", 0, ((f"s{i}:p", 32),), 2, None, (), timestamp_s=t),))
                for i, t in enumerate(starts)]
    cfg = SimConfig(profile=_profile(tmp_path, share), kv_blocks=64, block_size=16, arrivals="trace")
    out = tmp_path / f"out{share}"
    simulate(Trace(sessions, {"source": "unit"}), cfg, out_dir=out)
    return [float(r["end_s"]) for r in csv.DictReader(open(out / "sessions.csv"))]


def test_steps_share_the_core_with_the_requests_work(tmp_path):
    # additive (share 0): a is seen at 1, steps 1-2 and 2-3; b (sent 1.2, seen 2.2) joins at 3: steps 3-4, 4-5
    assert _ends(tmp_path, 0.0, [0.0, 1.2]) == [3.0, 5.0]
    # shared: a's first step's half on the core (1.0-1.5) meets b's work at 1.2 and both go at half speed:
    # a's half is done at 1.8 (its step at 2.3); b's work, 0.7 left, runs alone until a's second step's
    # half starts at 2.3 (0.2 left), then shares again: b's work is done at 2.7, a's half at 3.0, its step
    # at 3.5; b, seen at 2.7, runs 3.5-4.5 and 4.5-5.5
    assert _ends(tmp_path, 0.5, [0.0, 1.2]) == [3.5, 5.5]


def test_a_lone_session_is_not_slowed(tmp_path):
    """With nothing to share with (the request's work is done before its steps), the times are the additive
    model's."""
    assert _ends(tmp_path, 0.5, [0.0]) == _ends(tmp_path, 0.0, [0.0]) == [3.0]


def test_the_share_is_a_fraction():
    base = dict(name="unit", model="m", gpu="g", step_overhead_s=1.0, prefill_token_s=0.0, decode_seq_s=0.0,
                prefill_attn_pair_s=0.0, decode_ctx_token_s=0.0, kv_bytes_per_token=1, weights_bytes=0,
                gpu_mem_bytes=0)
    with pytest.raises(ValueError, match="frontend_step_share"):
        StepTimeProfile.from_json({**base, "frontend_step_share": 1.5})
    assert "frontend_step_share" not in StepTimeProfile.from_json(base).to_json()  # 0: left out, as before


def test_the_share_is_fitted_to_the_probes_ratio():
    """replay.frontend_share simulates the probe (a decode batch, quiet and while cached prompts arrive) for
    shares 0-1: the 2-core machine's measured ratio gives its share; no slow-down gives 0, an extreme one 1."""
    from pathlib import Path

    from replay.frontend_share import fit_share

    path = Path(__file__).resolve().parents[1] / "experiments/results/live-miniswe-2026-12-03-warmed/server-profile.json"
    profile = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    shape = dict(batch=8, side_prompt=2000, block_size=32, max_num_batched_tokens=512)
    share, grid = fit_share(profile, 12.65 / 7.70, **shape)
    assert share == pytest.approx(0.88, abs=0.01)
    ratios = [g["ratio"] for g in grid]
    assert ratios == sorted(ratios) and ratios[0] > 1.0  # even at 0 the side calls' own steps slow the batch
    assert all(g["quiet_ms"] == pytest.approx(grid[0]["quiet_ms"], rel=1e-4) for g in grid)  # nothing to share with
    assert fit_share(profile, 1.0, **shape)[0] == 0.0 and fit_share(profile, 5.0, **shape)[0] == 1.0


def test_the_fit_does_not_depend_on_the_machines_speed():
    """The simulated probe keeps its side client going until the batch's end however fast the profile: a
    profile 20x faster in every term gives the same ratios (a fixed number of side calls ran out first)."""
    from pathlib import Path

    from replay.frontend_share import simulated_steps

    path = Path(__file__).resolve().parents[1] / "experiments/results/live-miniswe-2026-12-03-warmed/server-profile.json"
    slow = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
    terms = ("step_overhead_s", "prefill_token_s", "decode_seq_s", "prefill_attn_pair_s", "decode_ctx_token_s",
             "request_overhead_s")
    fast = {**slow, **{k: slow[k] / 20 for k in terms}}
    shape = dict(batch=8, side_prompt=2000, block_size=32, max_num_batched_tokens=512)
    for share in (0.0, 1.0):
        (qs, ls), (qf, lf) = simulated_steps(slow, share, **shape), simulated_steps(fast, share, **shape)
        assert lf / qf == pytest.approx(ls / qs, rel=0.02)
    assert lf / qf > 1.5


def test_without_request_work_there_is_nothing_to_share(tmp_path):
    """A share with no request_overhead_s is the additive model exactly (no shared core is made)."""
    def ends(share):
        p = dict(name="unit", model="m", gpu="g", step_overhead_s=0.3, prefill_token_s=0.001, decode_seq_s=0.01,
                 prefill_attn_pair_s=0.0, decode_ctx_token_s=0.0, kv_bytes_per_token=1, weights_bytes=0,
                 gpu_mem_bytes=0, frontend_step_share=share)
        path = tmp_path / f"q{share}.json"
        path.write_text(json.dumps(p))
        sessions = [Session(f"s{i}", (Call(f"s{i}", 0, ((f"s{i}:p", 40),), 3, None, (), timestamp_s=0.1 * i),))
                    for i in range(3)]
        out = tmp_path / f"o{share}"
        simulate(Trace(sessions, {"source": "unit"}), SimConfig(profile=str(path), kv_blocks=64, block_size=16,
                                                                 arrivals="trace"), out_dir=out)
        return (out / "requests.csv").read_text()
    assert ends(0.7) == ends(0.0)


def test_the_probe_ratio_is_the_medians_and_says_when_rounds_disagree():
    """A round the machine threw off does not decide the ratio (medians over the rounds), and the
    probe says when most rounds of a mode are not near its median."""
    from replay.frontend_share import contention_ratio

    # this study's failed probe: two quiet rounds 4x apart
    ratio, ok = contention_ratio([3.93, 17.01], [7.91, 6.96])
    assert ratio == pytest.approx(7.435 / 10.47) and not ok
    # one outlier among five: the median holds, the rounds agree
    ratio, ok = contention_ratio([2.72, 2.83, 2.08, 3.18, 1.87], [5.32, 4.71, 11.08, 4.97, 4.63])
    assert ratio == pytest.approx(4.97 / 2.72) and ok
    assert contention_ratio([3.9, 17.0, 4.1], [7.0, 7.2, 7.1]) == (pytest.approx(7.1 / 4.1), True)
    # two of three far apart in the loaded mode
    assert contention_ratio([4.0, 4.1, 4.2], [5.0, 12.0, 30.0])[1] is False
