"""The engine end to end: exact timelines, determinism, decode jumps, policy bounds."""

import csv

import pytest

from cwsim.config import SimConfig
from cwsim.runner import simulate
from cwsim.scheduler import SimulationError
from tests.conftest import agent_trace
from traces.format import Call, Session, ToolCall, Trace

def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_exact_timeline_of_one_session(tmp_path, round_profile):
    """Arrival, prefill, decode, tool gap, next call: every time computed by hand.

    call 0: 32-token prompt, 3 output tokens, then a 1.0 s tool call.
      prefill step: 0.01 + 32*0.001                      = 0.042  -> first token at 0.042
      2 decode steps (one jump), contexts 32 and 33:
        (0.01 + 0.002 + 0.0032) + (0.01 + 0.002 + 0.0033) = 0.0305 -> finish at 0.0725
    call 1 arrives at 1.0725: prompt = call 0's prompt + its 3-token answer + 13 tool tokens = 48.
      The 2 full blocks of call 0 hit (32 tokens; the 3rd block is the prompt's last and is recomputed).
      prefill of 16 tokens: 0.01 + 16*0.001 = 0.026        -> first token at 1.0985
      1 decode step at context 48: 0.01 + 0.002 + 0.0048 = 0.0168 -> finish at 1.1153
    """
    calls = (
        Call("s", 0, (("sys", 32),), 3, "a0", (ToolCall("bash", "test", 1.0),)),
        Call("s", 1, (("sys", 32), ("a0", 3), ("t0", 13)), 2, "a1"),
    )
    trace = Trace([Session("s", calls)], source="hand")
    res = simulate(trace, SimConfig(kv_blocks=100, profile=round_profile), tmp_path)
    rows = read_rows(tmp_path / "requests.csv")
    timeline = [(int(r["turn"]), float(r["arrival_s"]), float(r["first_token_s"]), float(r["finish_s"]), int(r["cached_tokens"]))
                for r in rows]
    assert timeline == [
        (0, 0.0, pytest.approx(0.042), pytest.approx(0.0725), 0),
        (1, pytest.approx(1.0725), pytest.approx(1.0985), pytest.approx(1.1153), 32),
    ]
    s = res.summary
    assert s["total_session_time_s"] == pytest.approx(1.1153)
    assert s["prefix_hit_rate"] == pytest.approx(32 / 80)
    assert s["evicted_blocks"] == 0 and s["preemptions"] == 0
    assert s["steps"] == 5 and s["decode_jumps"] == 1
    sess = read_rows(tmp_path / "sessions.csv")
    assert [(r["session_id"], int(r["calls"]), float(r["duration_s"])) for r in sess] == [("s", 2, pytest.approx(1.1153))]


def test_the_step_log_is_the_timeline_step_by_step(tmp_path, round_profile):
    """``simulate(step_log=True)``: each engine iteration of the one-session timeline above, with the
    composition its time was charged for (a decode jump is one row of its steps)."""
    calls = (
        Call("s", 0, (("sys", 32),), 3, "a0", (ToolCall("bash", "test", 1.0),)),
        Call("s", 1, (("sys", 32), ("a0", 3), ("t0", 13)), 2, "a1"),
    )
    res = simulate(Trace([Session("s", calls)], source="hand"), SimConfig(kv_blocks=100, profile=round_profile),
                   tmp_path, step_log=True)
    rows = [tuple(float(v) for v in r.values()) for r in read_rows(tmp_path / "steps.csv")]
    assert rows == [  # start, end, steps, prefill tokens, attention pairs, decoding seqs, their context, running, waiting
        (0.0, pytest.approx(0.042), 1, 32, 32 * 33 / 2, 0, 0, 1, 0),
        (pytest.approx(0.042), pytest.approx(0.0725), 2, 0, 0, 1, 32, 1, 0),
        (pytest.approx(1.0725), pytest.approx(1.0985), 1, 16, 16 * 32 + 16 * 17 / 2, 0, 0, 1, 0),
        (pytest.approx(1.0985), pytest.approx(1.1153), 1, 0, 0, 1, 48, 1, 0),
    ]
    assert sum(r[2] for r in rows) == res.summary["steps"]
    assert not (tmp_path / "evictions.csv").exists()
    simulate(Trace([Session("s", calls)], source="hand"), SimConfig(kv_blocks=100, profile=round_profile), tmp_path)
    assert not (tmp_path / "steps.csv").exists()  # an earlier run's log does not pass for this one's


def test_chunked_prefill_and_batching(round_profile):
    """Two sessions arriving together share steps; a 10-token budget chunks prefills."""
    calls_a = (Call("a", 0, (("x", 12),), 1),)
    calls_b = (Call("b", 0, (("y", 6),), 1),)
    trace = Trace([Session("a", calls_a), Session("b", calls_b)], source="hand")
    res = simulate(trace, SimConfig(kv_blocks=100, profile=round_profile, max_num_batched_tokens=10, block_size=4))
    # step 1: a prefills 10 of 12 (budget spent); step 2: a's last 2 + b's 6 -> both finish (1 output token each)
    step1 = 0.01 + 10 * 0.001
    step2 = 0.01 + 8 * 0.001
    assert res.summary["steps"] == 2
    assert res.summary["makespan_s"] == pytest.approx(step1 + step2)


def test_determinism(tmp_path):
    trace = agent_trace(10, 10, seed=3)
    cfg = SimConfig(kv_blocks=2500, agents=6)
    a = simulate(trace, cfg, tmp_path / "a").summary
    b = simulate(trace, cfg, tmp_path / "b").summary
    assert a["evicted_blocks"] > 0  # the case is pressured
    for key in a:
        if key != "wall_s":
            assert a[key] == b[key], key
    for name in ("requests.csv", "sessions.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_poisson_arrivals_depend_on_seed_only():
    trace = agent_trace(6, 4, seed=1)
    run = lambda seed: simulate(trace, SimConfig(kv_blocks=4000, arrivals="poisson", rate=0.5, seed=seed)).summary
    assert run(7)["makespan_s"] == run(7)["makespan_s"]
    assert run(7)["makespan_s"] != run(8)["makespan_s"]


@pytest.mark.parametrize("policy", ["vllm", "sglang", "belady"])
def test_decode_jumps_change_nothing_but_speed(policy):
    """Jumping over decode-only steps gives the same evictions and (to rounding) the same times."""
    trace = agent_trace(8, 8, seed=5)
    kw = dict(kv_blocks=1800, agents=8, policy=policy)
    jump = simulate(trace, SimConfig(**kw)).summary
    step = simulate(trace, SimConfig(decode_jumps=False, **kw)).summary
    assert jump["decode_jumps"] > 0 and step["decode_jumps"] == 0
    assert jump["steps"] == step["steps"]
    for key in ("evicted_blocks", "harmful_evictions", "preemptions", "recomputed_prompt_tokens", "requests"):
        assert jump[key] == step[key], key
    for key in ("total_session_time_s", "makespan_s", "p99_session_time_s"):
        assert jump[key] == pytest.approx(step[key], rel=1e-9), key


def test_preemption_under_heavy_pressure_completes_everything():
    trace = agent_trace(6, 6, seed=2)
    # admission checking only the first chunk (vLLM with scheduler_reserve_full_isl off) over-admits
    s = simulate(trace, SimConfig(kv_blocks=700, agents=6, scheduler_reserve_full_isl=False)).summary
    assert s["preemptions"] > 0
    assert s["requests"] == 36 and s["sessions"] == 6
    assert s["recomputed_prompt_tokens"] > 0
    # vLLM's default full-sequence admission check keeps the same load from preempting
    assert simulate(trace, SimConfig(kv_blocks=700, agents=6)).summary["preemptions"] == 0


@pytest.fixture(scope="module")
def pressured_results():
    """Every baseline policy on a pressured agent trace."""
    trace = agent_trace(12, 12, seed=11)
    return {p: simulate(trace, SimConfig(policy=p, kv_blocks=3000, agents=12)).summary
            for p in ("vllm", "sglang", "belady", "infinite")}


def test_infinite_never_evicts_and_is_fastest(pressured_results):
    r = pressured_results
    assert r["infinite"]["evicted_blocks"] == 0 and r["infinite"]["preemptions"] == 0
    assert r["vllm"]["evicted_blocks"] > 0
    for p in ("vllm", "sglang", "belady"):
        assert r["infinite"]["total_session_time_s"] < r[p]["total_session_time_s"], p


def test_belady_evicts_no_more_than_vllm(pressured_results):
    r = pressured_results
    assert r["belady"]["evicted_blocks"] <= r["vllm"]["evicted_blocks"]
    assert r["belady"]["harmful_evictions"] <= r["vllm"]["harmful_evictions"]


def test_belady_evicts_no_more_than_vllm_on_the_real_trace():
    kw = dict(kv_blocks=6000, agents=8, max_sessions=12)
    vllm = simulate(None, SimConfig(policy="vllm", **kw)).summary
    belady = simulate(None, SimConfig(policy="belady", **kw)).summary
    assert vllm["evicted_blocks"] > 0
    assert belady["evicted_blocks"] <= vllm["evicted_blocks"]


def test_a_prompt_larger_than_the_pool_is_a_clear_error():
    trace = Trace([Session("big", (Call("big", 0, (("x", 1000),), 1),))], source="hand")
    with pytest.raises(SimulationError, match=r"session 'big' turn 0 needs 63 blocks .* 9 usable blocks"):
        simulate(trace, SimConfig(kv_blocks=10))


def test_trace_arrivals_need_timestamps():
    with pytest.raises(ValueError, match="--arrivals trace needs recorded timestamps"):
        simulate(agent_trace(2, 2), SimConfig(arrivals="trace"))


def test_recorded_arrivals_start_sessions_at_their_offsets():
    calls = lambda sid, t0: (Call(sid, 0, (("p" + sid, 64),), 1, timestamp_s=t0),)
    trace = Trace([Session("a", calls("a", 100.0)), Session("b", calls("b", 130.0))], source="hand")
    s = simulate(trace, SimConfig(kv_blocks=100, arrivals="trace")).summary
    assert s["makespan_s"] > 30.0
    assert s["total_session_time_s"] < 1.0


def test_infinite_grows_from_a_tiny_pool_without_preempting():
    s = simulate(agent_trace(6, 6, seed=2), SimConfig(policy="infinite", kv_blocks=10, agents=6)).summary
    assert s["preemptions"] == 0 and s["evicted_blocks"] == 0 and s["requests"] == 36
    assert s["kv_blocks"] is None and s["kv_blocks_peak_in_use"] > 10


def test_exact_timeline_with_an_arrival_during_decode(tmp_path, round_profile):
    """A decodes; B arrives mid-run and shares a mixed step with A's last decode.

    A: 16-token prompt, 4 outputs, starts at 0; B: 8-token prompt, 2 outputs, arrives at 0.05.
      A prefill: 0.01 + 16*0.001 = 0.026 (first token)
      A decodes at contexts 16 and 17 as one jump: steps start at 0.026 and 0.0396 (< 0.05);
        the next would start at 0.0533 >= 0.05, so the jump stops there.
      mixed step at 0.0533: B's 8-token prefill + A's decode at context 18:
        0.01 + 8*0.001 + 0.002 + 18*0.0001 = 0.0218 -> A finishes, B's first token at 0.0751
      B decodes at context 8: 0.01 + 0.002 + 0.0008 = 0.0128 -> B finishes at 0.0879
    """
    a = (Call("A", 0, (("a", 16),), 4, timestamp_s=100.0),)
    b = (Call("B", 0, (("b", 8),), 2, timestamp_s=100.05),)
    trace = Trace([Session("A", a), Session("B", b)], source="hand")
    res = simulate(trace, SimConfig(kv_blocks=100, profile=round_profile, arrivals="trace"), tmp_path)
    rows = {r["session_id"]: r for r in read_rows(tmp_path / "requests.csv")}
    got = {k: (float(r["arrival_s"]), float(r["first_token_s"]), float(r["finish_s"])) for k, r in rows.items()}
    assert got == {
        "A": (0.0, pytest.approx(0.026), pytest.approx(0.0751)),
        "B": (pytest.approx(0.05), pytest.approx(0.0751), pytest.approx(0.0879)),
    }
    assert res.summary["steps"] == 5 and res.summary["decode_jumps"] == 1


def test_a_profiles_request_overhead_delays_each_call_into_the_engine(tmp_path):
    """With ``request_overhead_s`` 0.005 the session of the first test runs 5 ms later per call.

    call 0 is sent at 0 and reaches the engine at 0.005: first token 0.047, finish 0.0775;
    call 1 is sent at 1.0775 (the 1.0 s tool call), reaches the engine at 1.0825: first token
    1.1085, finish 1.1253. Each call's arrival is when it was sent: its latency holds the overhead.
    """
    import json

    from tests.conftest import ROUND_PROFILE

    path = tmp_path / "p.json"
    path.write_text(json.dumps({**ROUND_PROFILE.to_json(), "request_overhead_s": 0.005}))
    calls = (
        Call("s", 0, (("sys", 32),), 3, "a0", (ToolCall("bash", "test", 1.0),)),
        Call("s", 1, (("sys", 32), ("a0", 3), ("t0", 13)), 2, "a1"),
    )
    res = simulate(Trace([Session("s", calls)], source="hand"), SimConfig(kv_blocks=100, profile=str(path)),
                   tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "requests.csv")
    assert [(float(r["arrival_s"]), float(r["first_scheduled_s"]), float(r["first_token_s"]), float(r["finish_s"]))
            for r in rows] == [
        (0.0, pytest.approx(0.005), pytest.approx(0.047), pytest.approx(0.0775)),
        (pytest.approx(1.0775), pytest.approx(1.0825), pytest.approx(1.1085), pytest.approx(1.1253)),
    ]
    assert res.summary["total_session_time_s"] == pytest.approx(1.1253)
    assert res.summary["steps"] == 5


# ------------------------------------------------------------------ timing noise (step_jitter)
def test_step_jitter_is_seeded_noise_of_mean_one_on_every_step():
    from dataclasses import replace

    from cwsim.config import ConfigError

    tr = agent_trace(n_sessions=4, turns=4, seed=3, system_tokens=200)
    cfg = SimConfig(policy="vllm", kv_blocks=2000, agents=4)
    plain = simulate(tr, cfg).summary
    zero = simulate(tr, replace(cfg, step_jitter=0.0)).summary
    assert {k: v for k, v in zero.items() if k != "wall_s"} == {k: v for k, v in plain.items() if k != "wall_s"}
    runs = {seed: simulate(tr, replace(cfg, step_jitter=0.1, seed=seed)).summary for seed in (0, 1)}
    again = simulate(tr, replace(cfg, step_jitter=0.1, seed=0)).summary
    key = ("total_session_time_s", "makespan_s", "steps", "evicted_blocks", "decode_jumps")
    assert [again[k] for k in key] == [runs[0][k] for k in key]  # the same seed: the same run, bit for bit
    assert runs[1]["total_session_time_s"] != runs[0]["total_session_time_s"]  # another seed: other step times
    assert runs[0]["decode_jumps"] == 0 and plain["decode_jumps"] > 0  # every step drawn, one by one
    # mean one: over some hundred steps the busy time moves by little
    assert runs[0]["makespan_s"] == pytest.approx(plain["makespan_s"], rel=0.03)
    assert runs[0]["makespan_s"] != plain["makespan_s"]
    with pytest.raises(ConfigError, match="--step-jitter must be in \\[0, 1\\], got -0.1"):
        SimConfig(step_jitter=-0.1)


# ----------------------------------------------------------- session starts
def _eager_start_sessions(env, engine, workload, arrivals, seed, metrics):
    """The launcher's reference: every session's process made at time 0, each a timeout to its start."""
    from cwsim.engine import session_process

    def delayed(t, i):
        if t > 0:
            yield env.timeout(t)
        yield from session_process(env, engine, workload.session(i), workload, metrics)

    for i, t in enumerate(arrivals.start_times(workload, seed)):
        env.process(delayed(t, i))


def _dyadic_trace(n: int = 24, seed: int = 5) -> Trace:
    """Sessions whose starts and tool gaps are multiples of 1/8 s, several starting together, out of
    trace order: with steps of 1/8 s, starts fall exactly on the ends of steps."""
    import random

    rng = random.Random(seed)
    sessions = []
    for s in range(n):
        t = 100.0 + rng.randrange(0, 40) / 8
        calls, ctx = [], 0
        for turn in range(rng.randrange(1, 4)):
            ctx += rng.randrange(16, 200)
            calls.append(Call(f"s{s}", turn, (("sys", 32), (f"s{s}/{turn}", ctx)), rng.randrange(1, 9),
                              timestamp_s=t))
            t += rng.randrange(1, 16) / 8
        sessions.append(Session(f"s{s}", tuple(calls)))
    return Trace(sessions, source="dyadic")


#: every step 1/8 s: the engine's steps end on the grid of the starts
DYADIC = {"step_overhead_s": 0.125, "prefill_token_s": 0.0, "decode_seq_s": 0.0,
          "prefill_attn_pair_s": 0.0, "decode_ctx_token_s": 0.0}


@pytest.mark.parametrize("arrivals", ["trace", "poisson"])
def test_the_session_launcher_starts_sessions_as_timeouts_made_at_time_zero_would(tmp_path, monkeypatch, arrivals):
    """The lazy launcher (one process, URGENT wake-ups at exact start times) gives the same run as a
    process per session from time 0, byte for byte, also where starts tie with each other and with
    the ends of steps."""
    import dataclasses
    import json

    import cwsim.runner
    from tests.conftest import ROUND_PROFILE

    prof = tmp_path / "dyadic.json"
    prof.write_text(json.dumps(dataclasses.replace(ROUND_PROFILE, name="dyadic", **DYADIC).to_json()))
    cfg = SimConfig(kv_blocks=48, profile=str(prof), arrivals=arrivals, rate=2.0, max_num_seqs=4)
    lazy = simulate(_dyadic_trace(), cfg, tmp_path / "lazy", step_log=True)
    monkeypatch.setattr(cwsim.runner, "start_sessions", _eager_start_sessions)
    eager = simulate(_dyadic_trace(), cfg, tmp_path / "eager", step_log=True)
    for name in ("requests.csv", "sessions.csv", "steps.csv"):
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "eager" / name).read_bytes(), name
    drop = ("wall_s",)
    assert {k: v for k, v in lazy.summary.items() if k not in drop} == \
           {k: v for k, v in eager.summary.items() if k not in drop}
    assert lazy.summary["evicted_blocks"] > 0 and lazy.summary["sessions"] == 24
    if arrivals == "trace":  # the case is there: starts that tie, and starts on the end of a step
        starts = [float(r["start_s"]) for r in read_rows(tmp_path / "lazy" / "sessions.csv")]
        ends = {float(r["end_s"]) for r in read_rows(tmp_path / "lazy" / "steps.csv")}
        assert len(set(starts)) < len(starts) and len(ends.intersection(starts)) >= 3


def test_a_launch_lands_on_its_instant_exactly_and_before_its_normal_events():
    """``_UrgentAt``: the launcher's wake-up at ``t`` exactly, also where no delay from its last
    wake-up reaches ``t`` in floating point (for ``1.7367775827442529`` and ``131073.77575104052``
    none does), and before a NORMAL event of that instant scheduled earlier."""
    import simpy

    from cwsim.engine import _UrgentAt

    starts = [0.1, 0.3, 1.7367775827442529, 131073.77575104052]
    assert starts[2] + (starts[3] - starts[2]) != starts[3]  # (a delay from the last wake-up misses it)
    env, seen = simpy.Environment(), []

    def launcher():
        for t in starts:
            yield _UrgentAt(env, t)
            seen.append(("start", env.now))

    def other():
        yield env.timeout(0.3)  # scheduled at 0, before the launcher's wake-up for 0.3
        seen.append(("other", env.now))

    env.process(other())
    env.process(launcher())
    env.run()
    assert seen == [("start", 0.1), ("start", 0.3), ("other", 0.3), ("start", 1.7367775827442529),
                    ("start", 131073.77575104052)]


@pytest.mark.parametrize("policy", ["vllm", "cachewise", "sglang"])
def test_single_call_sessions_cached_unlisted_run_as_listed(tmp_path, monkeypatch, policy):
    """A single-call session's own blocks cached unlisted (no hash map) give the run they give listed,
    byte for byte: under pressure, with preemptions (a re-admission hits its own blocks through its
    hint) and agent sessions beside them that share the system prompt."""
    import cwsim.runner
    from cwsim.engine import Engine

    agents = agent_trace(4, 6, seed=3, system_tokens=512).sessions
    single = [Session(f"one{i}", (Call(f"one{i}", 0, (("sys", 512), (f"own{i}", 900 + 297 * i)), 600 + 13 * i),))
              for i in range(10)]
    trace = Trace([s for pair in zip(single, agents) for s in pair] + single[4:], source="mixed")
    cfg = SimConfig(policy=policy, kv_blocks=500, agents=6, max_num_seqs=8)
    unlisted = []  # per request submitted: are its own blocks to be cached unlisted
    real = Engine.submit

    def submit(self, *args, **kwargs):
        req = real(self, *args, **kwargs)
        unlisted.append(req.unlisted_from < (req.prompt_len + req.output_len) // cfg.block_size)
        return req

    monkeypatch.setattr(Engine, "submit", submit)
    fast = simulate(trace, cfg, tmp_path / "unlisted")

    class Listed(Engine):
        unlist_own = property(lambda self: False, lambda self, v: None)

    monkeypatch.setattr(cwsim.runner, "Engine", Listed)
    n = len(unlisted)
    slow = simulate(trace, cfg, tmp_path / "listed")
    # (the first run cached the single-call sessions' own blocks unlisted; the second none)
    assert sum(unlisted[:n]) == len(single) and not any(unlisted[n:]) and len(unlisted) == 2 * n
    assert fast.summary["evicted_blocks"] > 0
    # a single-call session was preempted: its re-admission looked its own (unlisted) blocks up
    assert any(r["session_id"].startswith("one") and int(r["preemptions"])
               for r in read_rows(tmp_path / "unlisted" / "requests.csv"))
    for name in ("requests.csv", "sessions.csv"):
        assert (tmp_path / "unlisted" / name).read_bytes() == (tmp_path / "listed" / name).read_bytes(), name
    drop = ("wall_s",)
    assert {k: v for k, v in fast.summary.items() if k not in drop} == \
           {k: v for k, v in slow.summary.items() if k not in drop}
