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
from cwsim.policies.base import PolicyContext
from cwsim.policies.cachewise import END_HORIZON_S, PrefixAwareScheduling, ReuseAwareEviction
from cwsim.policies.eviction import LFU
from cwsim.predict import ToolCallPredictor
from cwsim.request import Request
from cwsim.runner import simulate
from cwsim.scheduler import Scheduler
from cwsim.workload import SessionState, SimCall
from tests.conftest import agent_trace
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


_rid = iter(range(10**6))


def request(cat: str, shared_prefix_tokens: int = 0) -> Request:
    """A request (turn 0) of a new session whose response calls a ``cat`` tool."""
    call = SimCall((), 8, 1, 0.0, 0, (ToolCall("bash", cat, 0.0),))
    sess = SessionState(0, f"s-{cat}", [call], None, shared_prefix_tokens)
    return Request(next(_rid), sess, 0, 8, 1, [], 0.0)


def cachewise_pool(num_blocks: int, active_sessions: int = 1, error: float = 0.0):
    policy = ReuseAwareEviction()
    pool = BlockPool(num_blocks, policy.score)
    kv = KVCacheManager(pool, BS)
    workload = SimpleNamespace(active_sessions=active_sessions)
    policy.bind(PolicyContext(now=0.0, kv=kv, workload=workload, predictor=predictor(error)))
    return pool, policy


_hash = iter(range(1000, 10**6))


def hold(pool: BlockPool, n: int, n_hashed: int | None = None) -> np.ndarray:
    """``n`` new blocks, the first ``n_hashed`` (default all) given fresh hashes."""
    blocks = pool.get_new_blocks(n)
    k = n if n_hashed is None else n_hashed
    pool.cache_full_blocks(blocks[:k], [next(_hash) for _ in range(k)])
    return blocks


# ------------------------------------------------------------ ReuseAwareEviction
def test_eviction_follows_the_predicted_next_use_not_the_release_order():
    pool, _ = cachewise_pool(11)
    a, b, c = hold(pool, 3), hold(pool, 3), hold(pool, 3)
    assert (a.tolist(), b.tolist(), c.tolist()) == ([1, 2, 3], [4, 5, 6], [7, 8, 9])
    pool.free_block_table(a, request("read"), 10.0)  # next call ~10.2: score -10.2
    pool.free_block_table(b, request("test"), 10.5)  # ~12.5: -12.5
    pool.free_block_table(c, request("submit"), 11.0)  # predicted to end: -(11 + 24 h)
    # unused block 10 (no hash) first; then the ended session, the long wait, the short wait; each tail first
    assert pool.free_block_ids() == [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]
    pool.check_invariants()

    lru = BlockPool(11)  # the same releases under LRU: release order
    for t in (hold(lru, 3), hold(lru, 3), hold(lru, 3)):
        lru.free_block_table(t)
    assert lru.free_block_ids() == [10, 3, 2, 1, 6, 5, 4, 9, 8, 7]


def test_scores_are_minus_the_predicted_next_use():
    pool, policy = cachewise_pool(11)
    freed = lambda req, t, reason="finish": SimpleNamespace(request=req, now=t, reason=reason, positions=np.arange(3))
    assert policy.score(freed(request("test"), 10.0)) == pytest.approx(-12.0)
    assert policy.score(freed(request("read"), 10.0)) == pytest.approx(-10.2)
    assert policy.score(freed(request("submit"), 10.0)) == -(10.0 + END_HORIZON_S)
    assert policy.score(freed(request("test"), 10.0, "preempt")) == -10.0
    assert policy.score(freed(None, 10.0)) == -10.0


def test_blocks_of_an_ended_session_go_first_even_if_released_later():
    pool, _ = cachewise_pool(9)
    a, b = hold(pool, 3), hold(pool, 3)
    pool.free_block_table(a, request("test"), 10.0)
    pool.free_block_table(b, request("submit"), 20.0)
    assert pool.free_block_ids() == [7, 8, 6, 5, 4, 3, 2, 1]


def test_shared_prefix_blocks_are_kept_when_other_sessions_are_active():
    """Session A's first 9 tokens (2 blocks of 4) are a prefix other sessions share.

    D (test, released 9.5): -11.5.  A (test, 10.0): private -12, shared -(10 + 2/3) with 2 other sessions.
    C (test, 10.2): -12.2.
    """
    def run(active_sessions):
        pool, _ = cachewise_pool(10, active_sessions)
        d, a, c = hold(pool, 2), hold(pool, 4), hold(pool, 2)
        assert (d.tolist(), a.tolist(), c.tolist()) == ([1, 2], [3, 4, 5, 6], [7, 8])
        pool.free_block_table(d, request("test"), 9.5)
        pool.free_block_table(a, request("test", shared_prefix_tokens=9), 10.0)
        pool.free_block_table(c, request("test"), 10.2)
        pool.check_invariants()
        return pool.free_block_ids()

    assert run(3) == [9, 8, 7, 6, 5, 2, 1, 4, 3]  # A's shared blocks 3, 4 after everything
    assert run(1) == [9, 8, 7, 6, 5, 4, 3, 2, 1]  # no other session: A's blocks are all private


def test_preempted_blocks_go_last():
    pool, _ = cachewise_pool(8)
    a, b = hold(pool, 3), hold(pool, 3)
    pool.free_block_table(b, request("test"), 10.0, reason="preempt")  # needed at once: -10
    pool.free_block_table(a, request("read"), 10.0)  # -10.2
    assert pool.free_block_ids() == [7, 3, 2, 1, 6, 5, 4]
    # a release without a request is scored like a preemption: -now
    pool2, _ = cachewise_pool(8)
    a, b = hold(pool2, 3), hold(pool2, 3)
    pool2.free_blocks(b.tolist(), None, now=10.0)
    pool2.free_block_table(a, request("read"), 10.0)
    assert pool2.free_block_ids() == [7, 3, 2, 1, 4, 5, 6]


def test_unhashed_blocks_go_first():
    pool, policy = cachewise_pool(9)
    kv = policy.ctx.kv
    ended, soon = request("submit"), request("read")
    ended.blocks = hold(pool, 3, n_hashed=2)  # [1, 2, 3], 3 is a partial block (no hash)
    ended.num_cached_blocks = 2
    soon.blocks = hold(pool, 3)
    kv.free(ended, 10.0)
    kv.free(soon, 11.0)
    assert pool.free_block_ids() == [3, 7, 8, 2, 1, 6, 5, 4]
    pool.check_invariants()


def test_injected_error_changes_the_predicted_wait_deterministically():
    _, exact = cachewise_pool(4)
    _, noisy = cachewise_pool(4, error=1.0)
    _, noisy2 = cachewise_pool(4, error=1.0)
    reqs = [request("test") for _ in range(5)]
    waits = [noisy.predicted_wait(r) for r in reqs]
    assert waits == [noisy2.predicted_wait(r) for r in reqs]
    assert waits == pytest.approx([2.0 * np.exp(np.random.default_rng((0, r.rid)).normal(0.0, 1.0)) for r in reqs])
    assert [exact.predicted_wait(r) for r in reqs] == pytest.approx([2.0] * 5)
    assert noisy.predicted_wait(request("submit")) == END_HORIZON_S  # an end stays an end


# ---------------------------------------------------------------------------- LFU
def test_lfu_evicts_the_least_used_first_ties_lru():
    lfu = LFU()
    pool = BlockPool(8, lfu.score)
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
    ctx = PolicyContext(now=0.0, kv=kv)
    policy.bind(ctx)
    # 17-token prompts: up to 4 blocks of prefix can be hits
    mk = lambda rid, hashes, arrival: Request(rid, None, 0, 17, 1, hashes, arrival)
    reqs = {
        "one": mk(0, [h[0], 1, 2, 3], 0.0),  # 1 resident block
        "three": mk(1, h + [4], 1.0),  # 3
        "none": mk(2, [5, 6, 7, 8], 2.0),  # 0
        "one_later": mk(3, [h[0], 9, 10, 11], 0.5),  # 1
    }
    waiting = [reqs[k] for k in ("none", "one_later", "three", "one")]
    names = {id(r): k for k, r in reqs.items()}
    return kv, policy, ctx, waiting, names


def test_prefix_aware_order_longest_resident_first_then_arrival():
    kv, policy, ctx, waiting, names = scheduling_setup()
    assert [len(kv.longest_prefix(r)) for r in waiting] == [0, 1, 3, 1]
    order = lambda now: (setattr(ctx, "now", now), [names[id(r)] for r in sorted(waiting, key=policy.priority)])[1]
    # ties (one resident block) by arrival, not queue order
    assert order(5.0) == ["three", "one", "one_later", "none"]
    assert order(30.0) == ["three", "one", "one_later", "none"]  # waited exactly aging_s: not aged yet
    assert order(30.4) == ["one", "three", "one_later", "none"]  # "one" waited 30.4 s > 30: first
    assert order(31.5) == ["one", "one_later", "three", "none"]  # three aged: FCFS among them
    assert order(100.0) == ["one", "one_later", "three", "none"]  # all aged: FCFS


def test_prefix_aware_aging_is_configurable():
    _, policy, ctx, waiting, names = scheduling_setup(aging_s=1.0)
    ctx.now = 1.8  # "one" (1.8 s) and "one_later" (1.3 s) waited longer than 1 s
    assert [names[id(r)] for r in sorted(waiting, key=policy.priority)] == ["one", "one_later", "three", "none"]


def test_the_scheduler_admits_in_the_policys_order():
    kv, policy, ctx, waiting, names = scheduling_setup()
    sched = Scheduler(kv, policy, SimpleNamespace(on_admit=lambda *a: None), max_num_seqs=1, max_num_batched_tokens=8192)
    for r in waiting:
        sched.add(r)
    ctx.now = 5.0
    plan = sched.schedule(5.0)
    assert [(names[id(r)], n) for r, n in plan.scheduled] == [("three", 17 - 12)]  # 3 hit blocks
    assert [names[id(r)] for r in sched.waiting] == ["none", "one_later", "one"]


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
