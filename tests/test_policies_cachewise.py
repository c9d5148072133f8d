"""CacheWise and LFU: exact eviction and admission orders on tiny pools, and end-to-end runs.

The predictor used by the unit tests is fitted on a hand-made trace:
``test`` gaps 1 2 3 (expected idle 2 s), ``read`` gaps 0.1 0.2 0.3 (0.2 s),
``submit`` always a session's last call (p_continue 0: predicted to end).
"""

from types import SimpleNamespace

import numpy as np
import pytest

import cwsim.runner
from cwsim.block_pool import BlockPool
from cwsim.config import SimConfig
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies.api import Release, ReleaseReason
from cwsim.policies.cachewise import CacheWise, PrefixAwareScheduling, ReuseAwareEviction, predicted_wait
from cwsim.policies.eviction import LFU
from cwsim.policy_adapter import SimEnvironment
from cwsim.predict import END_HORIZON_S, ToolCallPredictor
from cwsim.request import Request
from cwsim.runner import simulate
from cwsim.scheduler import Scheduler
from tests.conftest import agent_trace
from tests.policy_harness import arrive, bound_pool, release, tool_session
from traces.format import Call, Session, ToolCall, Trace
from traces.reader import write_trace

BS = 4


def _trace_session(sid, steps):
    calls = [Call(sid, t, (("sys", 8),), 2, None, (ToolCall("bash", cat, 0.0),), gap) for t, (cat, gap) in enumerate(steps)]
    return Session(sid, tuple(calls))


PRED_TRACE = Trace([_trace_session(f"h{i}", [("test", g), ("read", g / 10), ("submit", 0)]) for i, g in enumerate((1, 2, 3))])


def predictor(error: float = 0.0) -> ToolCallPredictor:
    return ToolCallPredictor.fit(PRED_TRACE, min_samples=3, error=error)


def test_the_unit_test_predictor():
    p = predictor()
    assert p.expected_idle("test") == pytest.approx(2.0)
    assert p.expected_idle("read") == pytest.approx(0.2)
    assert p.p_continue("submit") == 0.0
    assert p.typical_idle() == pytest.approx(1.1)  # (1 + 2 + 3 + 0.1 + 0.2 + 0.3) / 6


_rid = iter(range(10**6))
_sess = iter(range(10**6))


def request(env: SimEnvironment, cat: str, sess=None, arrival: float = 0.0) -> Request:
    """A request (turn 0) of a new session (or of ``sess``) whose response calls a ``cat`` tool,
    arrived in ``env``'s engine at ``arrival``."""
    if sess is None:
        i = next(_sess)
        sess = tool_session(i, f"s{i}-{cat}", [cat])
    return arrive(env, next(_rid), sess, 0, arrival)


def cachewise_pool(num_blocks: int, error: float = 0.0, **env_kw):
    policy = ReuseAwareEviction()
    pool, env = bound_pool(policy, num_blocks, BS, predictor=predictor(error), **env_kw)
    return pool, env


_hash = iter(range(1000, 10**6))


def hold(pool: BlockPool, n: int, n_hashed: int | None = None) -> np.ndarray:
    """``n`` new blocks, the first ``n_hashed`` (default all) given fresh hashes."""
    blocks = pool.get_new_blocks(n)
    k = n if n_hashed is None else n_hashed
    pool.cache_full_blocks(blocks[:k], [next(_hash) for _ in range(k)])
    return blocks


def test_the_evicting_half_needs_a_predictor():
    with pytest.raises(ValueError, match="predictor"):
        SimEnvironment(ReuseAwareEviction(), KVCacheManager(BlockPool(4), BS))
    SimEnvironment(PrefixAwareScheduling(), KVCacheManager(BlockPool(4), BS))  # the scheduling half does not


# ------------------------------------------------------------ ReuseAwareEviction
def test_eviction_follows_the_predicted_next_use_not_the_release_order():
    pool, env = cachewise_pool(11)
    a, b, c = hold(pool, 3), hold(pool, 3), hold(pool, 3)
    assert (a.tolist(), b.tolist(), c.tolist()) == ([1, 2, 3], [4, 5, 6], [7, 8, 9])
    release(env, a, request(env, "read"), 10.0)  # next call ~10.2: score -10.2
    release(env, b, request(env, "test"), 10.5)  # ~12.5: -12.5
    release(env, c, request(env, "submit"), 11.0)  # predicted to end: -(11 + 24 h)
    # unused block 10 (no hash) first; then the ended session, the long wait, the short wait; each tail first
    assert pool.free_block_ids() == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    pool.check_invariants()

    lru = BlockPool(11)  # the same releases under LRU: release order
    for t in (hold(lru, 3), hold(lru, 3), hold(lru, 3)):
        lru.free_block_table(t)
    assert lru.free_block_ids() == [10, 3, 2, 1, 6, 5, 4, 9, 8, 7]


def finished(env: SimEnvironment, cat: str, now: float):
    """The view of a request whose response (category ``cat``) ended at ``now``."""
    r = request(env, cat)
    r.finish = now
    return r.view


def test_scores_are_minus_the_predicted_next_use():
    pool, env = cachewise_pool(11)
    policy = env.policy

    def freed(view, t, reason=ReleaseReason.FINISH, shared=(False, False, False)):
        return Release(view, reason, t, np.arange(3), np.arange(3) + 50, np.array(shared), np.arange(1, 4), -1)

    assert policy.score(freed(finished(env, "test", 10.0), 10.0)) == pytest.approx(-12.0)
    assert policy.score(freed(finished(env, "read", 10.0), 10.0)) == pytest.approx(-10.2)
    assert policy.score(freed(finished(env, "submit", 10.0), 10.0)) == -(10.0 + END_HORIZON_S)
    assert policy.score(freed(finished(env, "test", 10.0), 10.0, ReleaseReason.PREEMPT)) == -10.0
    assert policy.score(freed(None, 10.0)) == -10.0
    # shared blocks: every request here is of its own session, arrived in the engine (none told
    # finished), so 5 sessions are active, 4 others: min(2, typical 1.1) / 5; private ones keep their wait
    view = finished(env, "test", 10.0)
    assert env.active_sessions == 5
    scores = policy.score(freed(view, 10.0, shared=(False, True, True)))
    assert scores == pytest.approx([-12.0, -(10.0 + 1.1 / 5), -(10.0 + 1.1 / 5)])


def test_the_predicted_wait_is_read_from_the_response_when_it_has_ended():
    """A request's tool calls are known once its response has ended (``RequestView.tool_calls``)."""
    _, env = cachewise_pool(4)
    r = request(env, "test")
    assert r.view.tool_calls == () and r.view.category == "none"  # not finished: no tool call known yet
    r.finish = 3.0
    assert [(t.name, t.category) for t in r.view.tool_calls] == [("t", "test")] and r.view.category == "test"
    assert predicted_wait(env.policy, r.view) == pytest.approx(2.0)


def test_blocks_of_an_ended_session_go_first_even_if_released_later():
    pool, env = cachewise_pool(9)
    a, b = hold(pool, 3), hold(pool, 3)
    release(env, a, request(env, "test"), 10.0)
    release(env, b, request(env, "submit"), 20.0)
    assert pool.free_block_ids() == [7, 8, 6, 5, 4, 3, 2, 1]


@pytest.mark.parametrize("sharer, idle_s, expect", [
    ("other", 600.0, [9, 8, 7, 6, 5, 2, 1, 4, 3]),  # A's shared blocks 3, 4 after everything
    ("other", 0.1, [9, 8, 7, 6, 5, 4, 3, 2, 1]),  # no other session active: A's blocks are all private
    ("own", 600.0, [9, 8, 7, 6, 5, 4, 3, 2, 1]),  # reused by A's own session only: not shared
])
def test_shared_prefix_blocks_are_kept_when_other_sessions_are_active(sharer, idle_s, expect):
    """Session A's first 2 blocks are a prefix another session shares.

    Was: ``SessionState.shared_prefix_tokens = 9`` (offline) and the workload's active-session count
    (3 or 1). Now both are online (``Release.shared``, ``Environment.active_sessions``), and the
    expected orders are the old ones:

    - ``other``: B (another session) hits A's blocks 3, 4 while A runs and finishes at 9.0; D
      finishes at 9.5, A at 10.0; C arrives at 10.1 and finishes at 10.2. With ``session_idle_s``
      600 s, B and D are active at A's release (2 other sessions); with 0.1 s they went idle.
    - ``own``: A's own earlier call (turn 0) held blocks 3, 4 and finished at 8.0; A's next call hits
      them: a session reusing its own blocks shares nothing.

    D (test, released 9.5): -11.5.  A (test, 10.0): private -12; shared -(10 + min(2, 1.1) / 3).
    C (test, 10.2): -12.2.
    """
    pool, env = cachewise_pool(10, session_idle_s=idle_s)
    pol = env.policy
    d_req = request(env, "test")
    if sharer == "other":
        a_req, b_req = request(env, "test"), request(env, "test")
        d, a = hold(pool, 2), hold(pool, 4)
        pool.touch(a[:2])  # B hits A's first two blocks
        release(env, a[:2], b_req, 9.0)  # still held by A: nothing is freed, but the blocks are now shared
        assert pool.free_block_ids() == [7, 8, 9]
    else:
        a0 = request(env, "test", sess=tool_session(next(_sess), "A", ["test", "test"]))
        d, first = hold(pool, 2), hold(pool, 2)
        release(env, first, a0, 8.0)  # A's turn 0: blocks 3, 4 free (cached), score -10
        a_req = arrive(env, next(_rid), a0.session, 1, 8.5)  # A's next call hits them
        pool.touch(first)
        a = np.concatenate([first, hold(pool, 2)])
    release(env, d, d_req, 9.5)
    seen = []

    def spy(rel):  # what the policy sees at A's release, and what it answers
        seen.append((rel.shared.tolist(), env.active_sessions, ReuseAwareEviction.score(pol, rel)))
        return seen[-1][2]

    pol.score = spy
    release(env, a, a_req, 10.0)
    del pol.score
    (shared, active, got), = seen
    if sharer == "other":
        assert shared == [False, False, True, True] and active == (3 if idle_s == 600.0 else 1)
    else:
        assert shared == [False] * 4 and active == 2  # A and D
    if expect[-2:] == [4, 3]:
        assert got == pytest.approx([-12.0, -12.0, -(10 + 1.1 / 3), -(10 + 1.1 / 3)])
    else:
        assert got == pytest.approx(-12.0)
    c_req = request(env, "test", arrival=10.1)
    c = hold(pool, 2)
    assert (d.tolist(), a.tolist(), c.tolist()) == ([1, 2], [3, 4, 5, 6], [7, 8])
    release(env, c, c_req, 10.2)
    pool.check_invariants()
    assert pool.free_block_ids() == expect


def test_preempted_blocks_go_last():
    pool, env = cachewise_pool(8)
    a, b = hold(pool, 3), hold(pool, 3)
    release(env, b, request(env, "test"), 10.0, reason="preempt")  # needed at once: -10
    release(env, a, request(env, "read"), 10.0)  # -10.2
    assert pool.free_block_ids() == [7, 3, 2, 1, 6, 5, 4]
    # a release without a request is scored like a preemption: -now
    pool2, env2 = cachewise_pool(8)
    a, b = hold(pool2, 3), hold(pool2, 3)
    pool2.free_blocks(b.tolist(), None, now=10.0)
    release(env2, a, request(env2, "read"), 10.0)
    assert pool2.free_block_ids() == [7, 3, 2, 1, 4, 5, 6]


def test_unhashed_blocks_go_first():
    pool, env = cachewise_pool(9)
    kv = env.kv
    ended, soon = request(env, "submit"), request(env, "read")
    ended.blocks = hold(pool, 3, n_hashed=2)  # [1, 2, 3], 3 is a partial block (no hash)
    ended.num_cached_blocks = 2
    soon.blocks = hold(pool, 3)
    ended.finish = 10.0
    kv.free(ended, 10.0)
    soon.finish = 11.0
    kv.free(soon, 11.0)
    assert pool.free_block_ids() == [3, 7, 8, 2, 1, 6, 5, 4]
    pool.check_invariants()


def test_injected_error_changes_the_predicted_wait_deterministically():
    _, exact = cachewise_pool(4)
    _, noisy = cachewise_pool(4, error=1.0)
    _, noisy2 = cachewise_pool(4, error=1.0)
    reqs = [finished(noisy, "test", 1.0) for _ in range(5)]
    waits = [predicted_wait(noisy.policy, r) for r in reqs]
    assert waits == [predicted_wait(noisy2.policy, r) for r in reqs]
    # the error is seeded by the request's number (the order in which the engine saw requests arrive)
    assert waits == pytest.approx([2.0 * np.exp(np.random.default_rng((0, r.number)).normal(0.0, 1.0)) for r in reqs])
    assert [predicted_wait(exact.policy, r) for r in reqs] == pytest.approx([2.0] * 5)
    assert predicted_wait(noisy.policy, finished(noisy, "submit", 1.0)) == END_HORIZON_S  # an end stays an end


# ---------------------------------------------------------------------------- LFU
def test_lfu_evicts_the_least_used_first_ties_lru():
    lfu = LFU()
    pool, _ = bound_pool(lfu, 8, BS)
    blocks = hold(pool, 4)  # [1, 2, 3, 4]
    h = dict(zip(blocks.tolist(), pool.hash_of[blocks].tolist()))
    partial = hold(pool, 1, n_hashed=0)  # [5]
    pool.free_blocks(blocks.tolist())  # one use each
    pool.free_blocks(partial.tolist())
    for b in (1, 1, 4, 2):  # a prefix hit, then its release: one more use
        pool.touch(np.array([b]))
        pool.free_blocks([b])
    assert lfu.uses == {h[1]: 3, h[2]: 2, h[3]: 1, h[4]: 2}
    # unhashed (5 prepended, then the unused 6, 7); 3 (1 use); 4, 2 (2 uses, LRU); 1 (3 uses)
    assert pool.free_block_ids() == [5, 6, 7, 3, 4, 2, 1]
    pool.check_invariants()

    # a hash recomputed into another block keeps its count
    got = pool.get_new_blocks(4)
    assert got.tolist() == [5, 6, 7, 3]  # evicts 3
    pool.cache_full_blocks(got[:1], [h[3]])
    pool.free_blocks([5])
    assert lfu.uses[h[3]] == 2
    assert pool.free_block_ids() == [4, 2, 5, 1]
    pool.check_invariants()


# ----------------------------------------------------------- PrefixAwareScheduling
def scheduling_setup(aging_s: float = 30.0):
    pool = BlockPool(16)
    kv = KVCacheManager(pool, BS)
    resident = hold(pool, 3)  # 3 cached blocks, then free (still cached)
    h = pool.hash_of[resident].tolist()
    pool.free_block_table(resident)
    policy = PrefixAwareScheduling(aging_s)
    env = SimEnvironment(policy, kv)
    assert not env.static and pool.score_fn is None  # scheduling only: LRU eviction
    # 17-token prompts: up to 4 blocks of prefix can be hits
    mk = lambda rid, hashes, arrival: arrive(env, rid, tool_session(100 + rid, f"q{rid}"), 0, arrival, 17, 1, hashes)
    reqs = {
        "one": mk(0, [h[0], 1, 2, 3], 0.0),  # 1 resident block
        "three": mk(1, h + [4], 1.0),  # 3
        "none": mk(2, [5, 6, 7, 8], 2.0),  # 0
        "one_later": mk(3, [h[0], 9, 10, 11], 0.5),  # 1
    }
    waiting = [reqs[k] for k in ("none", "one_later", "three", "one")]
    names = {id(r): k for k, r in reqs.items()}
    return kv, policy, env, waiting, names


def test_prefix_aware_order_longest_resident_first_then_arrival():
    kv, policy, env, waiting, names = scheduling_setup()
    assert [len(kv.longest_prefix(r)) for r in waiting] == [0, 1, 3, 1]
    assert [env.cached_prefix_blocks(r.view) for r in waiting] == [0, 1, 3, 1]

    def order(now):
        env.now = now
        return [names[id(r)] for r in sorted(waiting, key=lambda r: policy.priority(r.view))]

    # ties (one resident block) by arrival, not queue order
    assert order(5.0) == ["three", "one", "one_later", "none"]
    assert order(30.0) == ["three", "one", "one_later", "none"]  # waited exactly aging_s: not aged yet
    assert order(30.4) == ["one", "three", "one_later", "none"]  # "one" waited 30.4 s > 30: first
    assert order(31.5) == ["one", "one_later", "three", "none"]  # three aged: FCFS among them
    assert order(100.0) == ["one", "one_later", "three", "none"]  # all aged: FCFS


def test_prefix_aware_aging_is_configurable():
    _, policy, env, waiting, names = scheduling_setup(aging_s=1.0)
    env.now = 1.8  # "one" (1.8 s) and "one_later" (1.3 s) waited longer than 1 s
    assert [names[id(r)] for r in sorted(waiting, key=env.priority_key)] == ["one", "one_later", "three", "none"]
    with pytest.raises(ValueError, match="aging_s"):
        PrefixAwareScheduling(-1.0)


def test_the_scheduler_admits_in_the_policys_order():
    kv, policy, env, waiting, names = scheduling_setup()
    sched = Scheduler(kv, env, SimpleNamespace(on_admit=lambda *a: None), max_num_seqs=1, max_num_batched_tokens=8192)
    env.attach(sched)
    views = [r.view for r in waiting]
    for r in waiting:
        sched.add(r)
    assert [r.view for r in waiting] == views  # a request keeps the view it got at arrival
    env.now = 5.0
    plan = sched.schedule(5.0)
    assert [(names[id(r)], n) for r, n in plan.scheduled] == [("three", 17 - 12)]  # 3 hit blocks
    assert [names[id(r)] for r in sched.waiting] == ["none", "one_later", "one"]
    assert [names[id(v._r)] for v in env.running] == ["three"]


def test_cachewise_is_both_halves():
    pol = CacheWise(aging_s=5.0)
    assert pol.aging_s == 5.0 and pol.overrides("priority") and pol.overrides("score")
    pool, env = bound_pool(pol, 8, BS, predictor=predictor())
    assert not env.static and pool.score_fn is not None


# ------------------------------------------------------------------- end to end
PRESSURED = dict(kv_blocks=650, agents=6)


@pytest.fixture(scope="module")
def pressured_trace():
    return agent_trace(6, 6, seed=2)


def _same(a: dict, b: dict) -> bool:
    """Equal results: every summary field but host time and the configuration."""
    return {k: v for k, v in a.items() if k not in ("wall_s", "config")} == {k: v for k, v in b.items() if k not in ("wall_s", "config")}


@pytest.mark.parametrize("policy", ["cachewise", "cachewise-sched", "cachewise-evict", "lfu"])
def test_policies_complete_a_pressured_trace(pressured_trace, policy):
    s = simulate(pressured_trace, SimConfig(policy=policy, **PRESSURED)).summary
    assert s["sessions"] == 6 and s["requests"] == 36
    assert s["evicted_blocks"] > 0
    assert s["kv_blocks_peak_in_use"] <= 699


def test_cachewise_injected_error_changes_the_run_deterministically(pressured_trace):
    run = lambda err: simulate(pressured_trace, SimConfig(policy="cachewise", predictor_error=err, **PRESSURED)).summary
    exact, noisy, noisy2 = run(0.0), run(1.0), run(1.0)
    assert _same(noisy, noisy2)
    assert not _same(exact, noisy)
    assert noisy["requests"] == 36


def test_predictor_trace_is_the_one_fitted(tmp_path, pressured_trace, monkeypatch):
    same = tmp_path / "same.jsonl"
    write_trace(same, pressured_trace.calls())
    # every session ends after one call: every category is predicted to end
    ends = tmp_path / "ends.jsonl"
    write_trace(ends, [Call(f"x{c.session_id}-{c.turn}", 0, c.prompt, c.output_tokens, None, c.tools, c.gap_s)
                       for c in pressured_trace.calls()])

    fitted = []

    class Spy(ToolCallPredictor):
        @classmethod
        def fit(cls, trace, **kw):
            fitted.append((trace.source, len(trace.sessions), kw))
            return ToolCallPredictor.fit(trace, **kw)

    monkeypatch.setattr(cwsim.runner, "ToolCallPredictor", Spy)
    run = lambda path: simulate(pressured_trace, SimConfig(policy="cachewise", predictor_trace=path, predictor_error=0.25,
                                                           seed=3, **PRESSURED)).summary
    own, from_same, from_ends = run(None), run(str(same)), run(str(ends))
    assert fitted == [("synthetic", 6, {"error": 0.25, "seed": 3}),
                      (str(same), 6, {"error": 0.25, "seed": 3}),
                      (str(ends), 36, {"error": 0.25, "seed": 3})]
    assert _same(own, from_same)
    assert not _same(own, from_ends)
