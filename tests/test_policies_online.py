"""The facts an engine learns online (``cwsim.policies.online``), alone and as the simulator's adapter
feeds them: ``SessionActivity`` (session numbers, starts, which sessions are active) and
``BlockSharing`` (``Release.shared``)."""

from types import SimpleNamespace

import numpy as np
import pytest

from cwsim.block_pool import BlockPool
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies.api import Policy, ReleaseReason
from cwsim.policies.online import DEFAULT_SESSION_IDLE_S, BlockSharing, SessionActivity
from cwsim.policy_adapter import SimEnvironment
from cwsim.request import Request
from cwsim.scheduler import Scheduler
from cwsim.workload import SessionState, SimCall
from tests.policy_harness import arrive, bound_pool, release, tool_session


# ------------------------------------------------------------------ SessionActivity
def test_sessions_are_numbered_in_the_order_first_seen_and_keep_their_start():
    act = SessionActivity()
    assert act.idle_s == DEFAULT_SESSION_IDLE_S == 600.0
    assert act.arrive("b", 1.0) == (0, 1.0)
    assert act.arrive("a", 2.5) == (1, 2.5)
    assert act.arrive("b", 7.0) == (0, 1.0)  # a later request of b: b's number and start stay
    act.finish("a", 3.0)
    assert act.arrive("c", 8.0) == (2, 8.0)
    assert act.count(8.0) == 3
    # a session that went idle and comes back keeps its number and its start
    act.finish("b", 9.0)
    act.finish("b", 9.5)
    assert not act.is_active("a", 1000.0) and not act.is_active("b", 1000.0)
    assert act.arrive("a", 2000.0) == (1, 2.5)
    assert act.is_active("a", 2000.0) and act.count(2000.0) == 2  # a, and c (still in the engine)


def test_activity_expires_exactly_idle_s_after_the_latest_finish():
    act = SessionActivity(idle_s=5.0)
    act.arrive("a", 0.0)
    act.arrive("b", 0.0)
    act.finish("a", 10.0)
    assert act.is_active("a", 10.0) and act.is_active("a", 15.0)  # exactly idle_s later: still active
    assert act.count(15.0) == 2
    assert not act.is_active("a", 15.000001) and act.count(15.000001) == 1  # b is still in the engine
    assert act.is_active("b", 1e9)  # a request in the engine keeps its session active, however long


def test_a_request_in_the_engine_keeps_the_session_active():
    act = SessionActivity(idle_s=5.0)
    act.arrive("a", 0.0)
    act.arrive("a", 1.0)  # two requests of a in the engine
    act.finish("a", 2.0)
    assert act.is_active("a", 100.0)  # the other one is still in: 2 + 5 passed, still active
    act.finish("a", 101.0)
    assert act.is_active("a", 106.0) and not act.is_active("a", 106.5)


def test_only_the_latest_finish_counts():
    """An earlier finish's expiry does not end a session that finished again since."""
    act = SessionActivity(idle_s=5.0)
    act.arrive("a", 0.0)
    act.finish("a", 10.0)
    act.arrive("a", 12.0)
    act.finish("a", 14.0)
    assert act.is_active("a", 15.5)  # 10 + 5 < 15.5, but a finished again at 14
    assert act.is_active("a", 19.0) and not act.is_active("a", 19.01)
    # the same when the check comes only once, late, after both expiries
    late = SessionActivity(idle_s=5.0)
    late.arrive("a", 0.0)
    late.finish("a", 10.0)
    late.arrive("a", 12.0)
    late.finish("a", 14.0)
    assert late.count(30.0) == 0


def test_idle_zero_and_invalid_idle():
    act = SessionActivity(idle_s=0.0)
    act.arrive("a", 0.0)
    act.finish("a", 1.0)
    assert act.is_active("a", 1.0) and not act.is_active("a", 1.0 + 1e-9)
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError):
            SessionActivity(idle_s=bad)


class _Ticking(Policy):
    """A policy of its own (a time hook): the adapter keeps views and session facts for it."""

    def tick(self, now: float) -> None:
        pass


def test_a_policy_that_decides_nothing_of_its_own_gets_no_views():
    pool, env = bound_pool(Policy(), 8)
    r = Request(0, tool_session(0, "A"), 0, 8, 1, [], 0.0)
    env.on_arrival(r)
    assert env.passive and r.view is None and env.sessions.count(0.0) == 0


def test_the_adapter_feeds_session_activity_from_arrivals_finishes_and_its_clock():
    pool, env = bound_pool(_Ticking(), 8, session_idle_s=10.0)
    a, b = tool_session(0, "A", [None, None]), tool_session(1, "B")
    r0 = arrive(env, 0, b, 0, arrival=2.0)
    r1 = arrive(env, 1, a, 0, arrival=3.0)
    assert (r0.view.session_number, r0.view.session_start, r1.view.session_number, r1.view.session_start) \
        == (0, 2.0, 1, 3.0)
    assert (r1.view.number, r1.view.session_id, r1.view.turn, r1.view.arrival, r1.view.prompt_tokens) \
        == (1, "A", 0, 3.0, 8)
    env.now = 3.0
    assert env.active_sessions == 2
    blocks = pool.get_new_blocks(1)
    release(env, blocks, r1, 5.0)  # A finishes at 5
    r2 = arrive(env, 2, a, 1, arrival=6.0)
    assert (r2.view.session_number, r2.view.session_start) == (1, 3.0)
    env.now = 6.0
    release(env, pool.get_new_blocks(1), r2, 7.0)
    env.now = 17.0
    assert env.session_active("A") and env.active_sessions == 2
    env.now = 17.5
    assert not env.session_active("A") and env.session_active("B") and env.active_sessions == 1


def test_the_scheduler_tells_the_adapter_of_arrivals_and_finishes():
    pool = BlockPool(40)
    kv = KVCacheManager(pool, 4)
    env = SimEnvironment(_Ticking(), kv, session_idle_s=1.0)
    sched = Scheduler(kv, env, SimpleNamespace(on_admit=lambda *a: None, on_finish=lambda *a: None),
                      max_num_seqs=8, max_num_batched_tokens=1000)
    env.attach(sched)
    sessions = [SessionState(i, f"S{i}", [SimCall((), 6, n, 0.0, 0)], None) for i, n in enumerate((2, 5))]
    reqs = [Request(i, s, 0, 6, s.calls[0].output_len, [100 * i + k for k in range(3)], 0.0)
            for i, s in enumerate(sessions)]
    for r in reversed(reqs):  # submitted out of session order at one instant: they queue in session order
        sched.add(r)
    assert [r.view for r in reqs] == [None, None]  # the policy sees them arrive at the next step, in queue order
    done = {}
    for step in range(10):  # one step a second
        now = float(step)
        env.now = now
        plan = sched.schedule(now)
        if step == 0:
            assert [(r.view.number, r.view.session_number) for r in reqs] == [(0, 0), (1, 1)]
        for r in sched.update(plan, now):
            done[r.rid] = now
    assert not sched.running and not sched.waiting
    assert done == {0: 1.0, 1: 4.0}
    env.now = 2.0
    assert env.session_active("S0") and env.active_sessions == 2
    env.now = 2.5  # S0 finished at 1.0, more than 1 s ago
    assert not env.session_active("S0") and env.session_active("S1") and env.active_sessions == 1
    assert [v._r for v in env.running] == []


# ---------------------------------------------------------------------- BlockSharing
def rel(sharing, session, blocks, refs_after=None, hashed=None):
    blocks = np.array(blocks, dtype=np.int64)
    n = len(blocks)
    return sharing.release(blocks, np.ones(n, dtype=bool) if hashed is None else np.array(hashed),
                           np.zeros(n, dtype=np.int64) if refs_after is None else np.array(refs_after),
                           session).tolist()


def test_a_block_hit_by_another_session_is_shared_at_either_sessions_release():
    sh = BlockSharing(8)
    assert rel(sh, 0, [1, 2, 3]) == [False, False, False]  # first release: only session 0 held them
    assert rel(sh, 0, [1, 2, 3]) == [False, False, False]  # session 0 again (its next call): still its own
    assert rel(sh, 1, [1, 2]) == [True, True]  # session 1 hit 1, 2 and releases them
    assert rel(sh, 0, [3, 2, 1]) == [False, True, True]  # and session 0's next release of them: shared too
    assert rel(sh, 0, [1]) == [True]  # once shared, shared for the rest of the content's cached life
    assert rel(sh, 2, [3]) == [True]


def test_a_record_from_before_an_eviction_does_not_count():
    sh = BlockSharing(8)
    assert rel(sh, 0, [4]) == [False]
    sh.forget(np.array([4]))  # block 4 is evicted, and filled with other content by session 1
    assert rel(sh, 1, [4]) == [False]  # session 0's record was of the block's earlier life
    assert rel(sh, 0, [4]) == [True]  # now session 1's record is current: 0 shares it
    assert rel(sh, 0, [5, 6]) == [False, False]
    assert rel(sh, 1, [5, 6]) == [True, True]
    sh.forget([5])  # a list of ids, as the vLLM plugin gives them
    assert rel(sh, 1, [5, 6]) == [False, True]  # a shared record of an earlier life does not count either


def test_a_block_still_held_by_another_request_is_shared():
    sh = BlockSharing(8)
    assert rel(sh, 0, [6, 7], refs_after=[1, 0]) == [True, False]  # 6: another request holds it still
    assert rel(sh, 1, [6]) == [True]  # the holder's release: the record says shared
    # the rule counts any other holder (the count of references says nothing about sessions)
    assert rel(sh, 2, [1], refs_after=[2]) == [True]


def test_unhashed_blocks_are_not_recorded():
    sh = BlockSharing(8)
    assert rel(sh, 0, [2], hashed=[False]) == [False]
    assert rel(sh, 1, [2]) == [False]  # no record of session 0: the block had no content then
    assert rel(sh, 0, [3], refs_after=[1], hashed=[False]) == [True]  # still held: shared, not recorded
    assert rel(sh, 0, [3]) == [False]


def test_sharing_grows_with_the_pool():
    sh = BlockSharing(4)
    sh.grow(2)  # never shrinks
    assert rel(sh, 0, [3]) == [False]
    sh.grow(10)
    assert rel(sh, 0, [9]) == [False] and rel(sh, 1, [9, 3]) == [True, True]


class Recording(Policy):
    """Scores 0 (LRU), recording every release it sees."""

    name = "recording"

    def __init__(self):
        self.seen = []

    def score(self, release):
        self.seen.append(release)
        return 0.0


def shared_of(pol) -> list:
    out = [(r.request.session_id if r.request is not None else None, r.blocks.tolist(), r.shared.tolist())
           for r in pol.seen]
    pol.seen.clear()
    return out


def test_the_adapter_computes_release_shared_from_the_pools_releases():
    pol = Recording()
    pool, env = bound_pool(pol, 8)
    assert pool.on_release is not None and env.sharing is not None
    a, b = tool_session(0, "A", [None] * 4), tool_session(1, "B", [None] * 4)
    blocks = pool.get_new_blocks(3)  # 1, 2, 3; 3 stays without a hash
    pool.cache_full_blocks(blocks[:2], [11, 12])
    ra = arrive(env, 0, a, 0)
    va = ra.view
    release(env, blocks, ra, 1.0)
    r, = pol.seen
    assert (r.request is va, r.reason, r.now, r.seq) == (True, ReleaseReason.FINISH, 1.0, r.seq)
    assert ra.view is None and va._r is ra  # the engine drops a finished request's view (no cycle); a policy may keep it
    assert (r.blocks.tolist(), r.keys.tolist(), r.positions.tolist()) == ([2, 1], [12, 11], [1, 0])
    assert shared_of(pol) == [("A", [2, 1], [False, False])]
    # B hits A's two blocks, then releases them
    rb = arrive(env, 1, b, 0, 2.0)
    pool.touch(np.array([1, 2]))
    release(env, np.array([1, 2]), rb, 3.0)
    assert shared_of(pol) == [("B", [2, 1], [True, True])]
    # A's next call hits block 1: shared at A's release as well
    ra1 = arrive(env, 2, a, 1, 4.0)
    pool.touch(np.array([1]))
    release(env, np.array([1]), ra1, 5.0, "preempt")
    assert shared_of(pol) == [("A", [1], [True])] and pol.seen == []
    # B and A hold block 2 at once; B lets go first (nothing freed), A's release: shared
    rb1, ra2 = arrive(env, 3, b, 1, 6.0), arrive(env, 4, a, 2, 6.0)
    pool.touch(np.array([2]))
    pool.touch(np.array([2]))
    release(env, np.array([2]), rb1, 7.0)
    assert pol.seen == []  # still held by A: not freed, not scored
    release(env, np.array([2]), ra2, 7.5)
    assert shared_of(pol) == [("A", [2], [True])]


def test_a_block_evicted_and_cached_again_starts_unshared():
    pol = Recording()
    pool, env = bound_pool(pol, 3)  # 2 usable blocks
    a, b = tool_session(0, "A", [None] * 3), tool_session(1, "B", [None] * 3)
    blk = pool.get_new_blocks(1)
    pool.cache_full_blocks(blk, [21])
    rb = arrive(env, 0, b, 0)
    release(env, blk, rb, 1.0)
    ra = arrive(env, 1, a, 0)
    pool.touch(blk)
    release(env, blk, ra, 2.0)
    assert shared_of(pol) == [("B", [1], [False]), ("A", [1], [True])]
    got = pool.get_new_blocks(2)  # the unused block 2, then block 1: evicted
    assert got.tolist() == [2, 1] and 21 not in pool.cached
    pool.cache_full_blocks(got[1:], [21])  # the same content, recomputed into block 1 by A
    pool.free_blocks(got[:1])
    ra1 = arrive(env, 2, a, 1)
    release(env, got[1:], ra1, 3.0)
    assert shared_of(pol) == [("A", [1], [False])]  # B's and A's records were of the evicted content


def test_releases_without_a_request_are_shared_only_if_still_held():
    pol = Recording()
    pool, env = bound_pool(pol, 6)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks, [31, 32])
    pool.touch(blocks[:1])
    pool.free_blocks(blocks)  # no request: block 1 is still held once
    assert [(r.request, r.reason, r.blocks.tolist(), r.shared.tolist()) for r in pol.seen] \
        == [(None, ReleaseReason.FREE, [2], [False])]
    pol.seen.clear()
    pool.free_blocks(blocks[:1])
    assert shared_of(pol) == [(None, [1], [False])]


def test_a_policy_that_does_not_score_leaves_the_pool_alone():
    pool, env = bound_pool(Policy(), 6)
    assert pool.score_fn is None and pool.on_release is None and env.sharing is None
