"""Exact ordering decisions of the baseline policies on tiny pools: belady's victims, sglang's LPM order."""

import numpy as np
import pytest

from cwsim.block_pool import BlockPool
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies.eviction import Belady
from cwsim.policies.scheduling import LongestPrefixMatch
from cwsim.policy_adapter import SimEnvironment, TraceFuture
from cwsim.request import Request
from cwsim.scheduler import Scheduler
from cwsim.workload import Workload
from tests.policy_harness import arrive, bound_pool, release, tool_session
from traces.format import Call, Session, Trace

BS = 4


def two_call_session(sid: str, gap: float, prefix=()) -> Session:
    """Call 0: prompt (prefix +) 8 tokens, 4-token answer; call 1 re-sends both plus 4 tool tokens."""
    p0 = (*prefix, (sid, 8))
    calls = (Call(sid, 0, p0, 4, f"{sid}0", gap_s=gap), Call(sid, 1, (*p0, (f"{sid}0", 4), (f"{sid}t", 4)), 1))
    return Session(sid, calls)


def setup_belady(trace: Trace, num_blocks: int, active: int):
    """Belady reads the trace's future (``TraceFuture``): next calls, shared prefixes, and the
    workload's own count of started-and-not-ended sessions (offline, unlike ``Environment.active_sessions``)."""
    workload = Workload.from_trace(trace)
    workload.active_sessions = active
    pool, env = bound_pool(Belady(), num_blocks, BS, future=TraceFuture(workload))
    assert env.future.active_sessions == active
    return workload, env


def finish(env: SimEnvironment, sess, turn: int, rid: int, n_blocks: int, now: float) -> np.ndarray:
    """A request of ``sess`` that filled ``n_blocks`` cached blocks, released when it finishes at ``now``."""
    req = arrive(env, rid, sess, turn, prompt=8, output=4)
    blocks = env.pool.get_new_blocks(n_blocks)
    env.pool.cache_full_blocks(blocks, [hash((sess.index, turn, i)) for i in range(n_blocks)])
    release(env, blocks, req, now)
    return blocks


def test_belady_needs_the_trace_future():
    with pytest.raises(ValueError, match="future"):
        SimEnvironment(Belady(), KVCacheManager(BlockPool(4), BS))


def test_belady_evicts_the_farthest_next_use_first():
    """C never comes back, A's next call is 5 s away, B's 1 s: C, then A, then B (each tail first)."""
    trace = Trace([two_call_session("A", 5.0), two_call_session("B", 1.0),
                   Session("C", (Call("C", 0, (("C", 8),), 4, "C0"),))], source="hand")
    workload, env = setup_belady(trace, 12, active=3)
    pool = env.pool
    a, b, c = workload.sessions
    assert [a.calls[0].next_shared_tokens, b.calls[0].next_shared_tokens] == [12, 12]
    assert finish(env, a, 0, 0, 3, 0.0).tolist() == [1, 2, 3]
    assert finish(env, b, 0, 1, 3, 0.0).tolist() == [4, 5, 6]
    assert finish(env, c, 0, 2, 3, 0.0).tolist() == [7, 8, 9]
    # unhashed first (10, 11), then C (never used again), A (t=5), B (t=1)
    assert pool.free_block_ids() == [10, 11, 9, 8, 7, 3, 2, 1, 6, 5, 4]
    pool.check_invariants()


def shared_prefix_case(active: int) -> list[int]:
    """D (next call in 50 s) and E (in 5 s) share a 4-token system segment; both finish at t=10."""
    trace = Trace([two_call_session("D", 50.0, prefix=(("sys", 4),)),
                   two_call_session("E", 5.0, prefix=(("sys", 4),))], source="hand")
    workload, env = setup_belady(trace, 12, active=active)
    pool = env.pool
    d, e = workload.sessions
    assert d.shared_prefix_tokens == e.shared_prefix_tokens == 4
    # each call 0 = sys(4) + own(8) + answer(4) = 4 blocks, all shared with the session's next call
    assert finish(env, d, 0, 0, 4, 10.0).tolist() == [1, 2, 3, 4]
    assert finish(env, e, 0, 1, 4, 10.0).tolist() == [5, 6, 7, 8]
    pool.check_invariants()
    return pool.free_block_ids()


def test_belady_keeps_a_shared_prefix_while_other_sessions_are_active():
    # private blocks: D's at t=60, E's at t=15; the shared first blocks (1, 5) are needed "now" (t=10)
    assert shared_prefix_case(active=2) == [9, 10, 11, 4, 3, 2, 8, 7, 6, 1, 5]


def test_belady_without_other_active_sessions_scores_the_prefix_with_its_session():
    assert shared_prefix_case(active=1) == [9, 10, 11, 4, 3, 2, 1, 8, 7, 6, 5]


def lpm_scheduler(max_queue: int = 128):
    pool = BlockPool(40)
    kv = KVCacheManager(pool, BS)
    policy = LongestPrefixMatch(max_queue=max_queue)
    env = SimEnvironment(policy, kv)
    assert pool.score_fn is None  # LRU eviction: the pool's own order, no scoring call

    class NoMetrics:
        def on_admit(self, *a):
            pass

    sched = Scheduler(kv, env, NoMetrics(), max_num_seqs=1, max_num_batched_tokens=1000)
    env.attach(sched)
    assert not env.static and env.max_queue == max_queue
    return pool, env, sched


def cached_chain(pool: BlockPool, hashes: list[int]) -> None:
    blocks = pool.get_new_blocks(len(hashes))
    pool.cache_full_blocks(blocks, hashes)
    pool.free_block_table(blocks)


def waiting(sched: Scheduler, rid: int, hashes: list[int]) -> Request:
    """A request of its own session, queued and seen arriving by the policy (its view made)."""
    r = Request(rid, tool_session(rid, f"w{rid}"), 0, 4 * len(hashes) + 2, 1, hashes, float(rid))
    sched.add(r)
    sched.note_arrivals()
    return r


def test_lpm_orders_by_longest_cached_prefix_ties_by_queue_order():
    pool, env, sched = lpm_scheduler()
    cached_chain(pool, [11, 12, 13])
    r0 = waiting(sched, 0, [99, 98])  # no hit
    r1 = waiting(sched, 1, [11, 97])  # 1 block
    r2 = waiting(sched, 2, [11, 12, 13, 96])  # 3 blocks
    r3 = waiting(sched, 3, [11, 95])  # 1 block, after r1 in the queue
    assert [env.policy.priority(r.view) for r in (r0, r1, r2, r3)] == [0.0, -1.0, -3.0, -1.0]
    assert [env.priority_key(r) for r in (r0, r1, r2, r3)] == [0.0, -1.0, -3.0, -1.0]
    assert [env.cached_prefix_blocks(r.view) for r in (r0, r1, r2, r3)] == [0, 1, 3, 1]
    assert sched.waiting == [r0, r1, r2, r3]
    plan = sched.schedule(0.0)  # max_num_seqs=1: only the best is admitted
    assert [r.rid for r, _ in plan.scheduled] == [2]
    assert [r.rid for r in sched.waiting] == [0, 1, 3]
    assert plan.scheduled[0][1] == 4 * 4 + 2 - 3 * 4  # prefill shortened by the 3 hit blocks


def test_lpm_falls_back_to_fcfs_on_a_long_queue():
    pool, env, sched = lpm_scheduler(max_queue=2)
    cached_chain(pool, [11, 12, 13])
    for rid, hashes in enumerate([[99, 98], [11, 97], [11, 12, 13, 96]]):
        waiting(sched, rid, hashes)
    plan = sched.schedule(0.0)
    assert [r.rid for r, _ in plan.scheduled] == [0]  # queue longer than max_queue: FCFS
