"""Tokencake: the time scheduler's offload / prefetch decisions, the space scheduler's critical
sessions (eviction order and admission order), and whole runs with and without a CPU tier."""

from types import SimpleNamespace

import numpy as np
import pytest

from cwsim.block_pool import BlockPool
from cwsim.config import SimConfig
from cwsim.cpu_tier import CpuTier
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies import get_policy, make_policy
from cwsim.policies.api import Need, Release, ReleaseReason
from cwsim.policies.tokencake import CRITICAL, Tokencake
from cwsim.policy_adapter import SimEnvironment
from cwsim.predict import ToolCallPredictor
from cwsim.request import Request
from cwsim.runner import simulate
from cwsim.workload import Workload
from tests.conftest import agent_trace
from tests.policy_harness import release
from traces.format import Call, Session, ToolCall, Trace

BT = 0.1  # seconds per block: 1000-byte blocks at 1e-5 GB/s


@pytest.fixture(scope="module")
def pred() -> ToolCallPredictor:
    """Mean gap to the next call: grep 0.5 s, read 3 s, slow 10 s; submit ends a session."""
    sessions, k = [], 0
    for cat, gap in [("grep", 0.5), ("read", 3.0), ("slow", 10.0)]:
        for _ in range(5):
            sid = f"fit{k}"
            k += 1
            sessions.append(Session(sid, (Call(sid, 0, (("p", 4),), 1, None, (ToolCall("t", cat),), gap_s=gap),
                                          Call(sid, 1, (("p", 4),), 1, None, (ToolCall("t", "submit"),)))))
    return ToolCallPredictor.fit(Trace(sessions, source="fit"), min_samples=1)


def sessions_for(cats: list[str]):
    """One session per category: call 0 ends with that tool (None: no tool call), then a call without tools."""
    sess = []
    for i, c in enumerate(cats):
        calls = (Call(f"s{i}", 0, ((f"s{i}", 4),), 1, None, (ToolCall("t", c),) if c else ()),
                 Call(f"s{i}", 1, ((f"s{i}", 4),), 1, None, ()))
        sess.append(Session(f"s{i}", calls))
    return Workload.from_trace(Trace(sess, source="hand")).sessions


class Harness:
    """One ``Tokencake`` bound to a pool (and a CPU tier of ``tier_blocks``) through the simulator's
    adapter; ``sched.running`` stands for the scheduler's running requests."""

    def __init__(self, pred, num_blocks: int = 16, tier_blocks: int = 0, session_idle_s: float = 600.0, **kw):
        self.policy = Tokencake(**kw)
        self.pool = BlockPool(num_blocks)
        self.tier = CpuTier(tier_blocks, self.pool, 1000, 1e-5) if tier_blocks else None
        self.sched = SimpleNamespace(running=[], waiting=[])
        self.env = SimEnvironment(self.policy, KVCacheManager(self.pool, 4), predictor=pred, cpu_tier=self.tier,
                                  session_idle_s=session_idle_s)
        self.env.attach(self.sched)
        assert (self.env.cpu_tier is None) == (self.tier is None)
        self._h = 1000
        self._rid = 0

    def arrive(self, sess, turn: int = 0, arrival: float = 0.0, prompt: int = 4, hashes=()) -> Request:
        r = Request(self._rid, sess, turn, prompt, 1, list(hashes), arrival)
        self._rid += 1
        self.env.on_arrival(r)
        return r

    def start(self, sess, n_blocks: int, turn: int = 0, arrival: float = 0.0) -> Request:
        """A call of ``sess`` that arrived at ``arrival`` and filled ``n_blocks`` cached blocks (it holds them)."""
        blocks = self.pool.get_new_blocks(n_blocks)
        hashes = list(range(self._h, self._h + n_blocks))
        self._h += n_blocks
        self.pool.cache_full_blocks(blocks, hashes)
        r = self.arrive(sess, turn, arrival, 4 * n_blocks, hashes)
        r.blocks, r.num_cached_blocks = blocks, n_blocks
        return r

    def end(self, r: Request, now: float) -> Request:
        """``r`` finishes at ``now``: its table is released (scored), then the adapter is told."""
        release(self.env, r.blocks, r, now)
        self.pool.check_invariants()
        return r

    def finish(self, sess, n_blocks: int, now: float, turn: int = 0) -> Request:
        """A call of ``sess`` that filled ``n_blocks`` cached blocks finishes at ``now``."""
        return self.end(self.start(sess, n_blocks, turn, arrival=now), now)


def test_registry_entry():
    spec = get_policy("tokencake")
    assert spec.needs_predictor and spec.default_cpu_tier == 1.0 and spec.offloads
    assert spec.needs == {Need.PREDICTOR, Need.CPU_TIER}
    # one object: priority, preemption (vLLM's), score and tick
    assert spec.cls is Tokencake and isinstance(spec.make(), Tokencake)
    assert [Tokencake.overrides(m) for m in ("priority", "preemption_victim", "score", "tick", "next_deadline")] \
        == [True, False, True, True, False]
    pol = make_policy("tokencake", offload_threshold_s=1.5, aging_s=3.0)  # aging_s is not Tokencake's: dropped
    assert (pol.offload_threshold_s, pol.reserve_share, pol.prefetch_margin_s) == (1.5, 0.25, 0.5)
    assert get_policy("vllm").default_cpu_tier == 0.0


def test_settings_are_checked():
    for bad in (dict(offload_threshold_s=-1.0), dict(prefetch_margin_s=-0.1), dict(reserve_share=1.5)):
        with pytest.raises(ValueError):
            Tokencake(**bad)


def test_the_adapter_wires_every_decision(pred):
    h = Harness(pred, tier_blocks=4)
    assert not h.env.static and h.env.ticks and h.pool.score_fn is not None and h.pool.on_release is not None
    with pytest.raises(ValueError, match="predictor"):
        SimEnvironment(Tokencake(), KVCacheManager(BlockPool(4), 4))
    SimEnvironment(Tokencake(), KVCacheManager(BlockPool(4), 4), predictor=pred)  # a CPU tier is optional


# ------------------------------------------------------------ time scheduler
def test_long_tool_call_offloads_own_blocks_and_schedules_the_prefetch(pred):
    """The first block is a prefix another session shares: it stays.

    Was: ``SessionState.shared_prefix_tokens = 4`` (offline); now ``Release.shared`` (online): a
    request of another session hits the block while s runs."""
    s, other = sessions_for(["slow", "read"])
    h = Harness(pred, tier_blocks=8)
    r = h.start(s, 3)
    o = h.arrive(other, hashes=r.hashes[:1], arrival=0.2)
    h.pool.touch(r.blocks[:1])  # the other session's request hits s's first block ...
    release(h.env, r.blocks[:1], o, 0.5)  # ... and finishes first (s still holds the block)
    assert h.policy.offloads == 0  # nothing was freed: no score, no offload
    h.end(r, 1.0)
    assert h.policy.offloads == 1 and h.tier.reserved == 2
    (at, _, p), = h.tier._pending
    assert at == pytest.approx(1.0 + 10.0 - 2 * BT - 0.5)  # predicted return - transfer - margin
    assert p.hashes == r.hashes and p.owner is r
    h.tier.tick(1.0)
    assert (h.pool.ref[r.blocks[1:]] == 1).all() and h.pool.ref[r.blocks[0]] == 0
    h.tier.tick(1.0 + 2 * BT + 1e-9)
    assert h.tier.offloaded_blocks == 2 and r.hashes[0] in h.pool.cached and r.hashes[1] not in h.pool.cached
    h.tier.tick(at)
    h.tier.tick(at + 2 * BT + 1e-9)
    assert h.tier.prefetched_blocks == 2 and all(x in h.pool.cached for x in r.hashes)  # back before 11.0
    h.pool.check_invariants()


def test_a_session_reusing_its_own_blocks_offloads_them_all(pred):
    """Blocks the session's own earlier call held are its own, not shared: all of them go to the tier."""
    sess = Session("own", (Call("own", 0, (("own", 8),), 1, None, (ToolCall("t", "grep"),), gap_s=0.5),
                           Call("own", 1, (("own", 12),), 1, None, (ToolCall("t", "slow"),), gap_s=10.0),
                           Call("own", 2, (("own", 12),), 1, None)))
    s, = Workload.from_trace(Trace([sess], source="hand")).sessions
    h = Harness(pred, tier_blocks=8)
    first = h.finish(s, 2, now=0.0)  # grep: 0.5 s, no offload
    assert h.policy.offloads == 0
    nxt = h.arrive(s, 1, 0.5, 12, first.hashes + [h._h])
    hits = h.env.kv.longest_prefix(nxt)
    assert hits.tolist() == first.blocks.tolist()
    h.pool.touch(hits)  # the session's next call hits its own blocks, and fills one more
    more = h.pool.get_new_blocks(1)
    h.pool.cache_full_blocks(more, [h._h])
    nxt.blocks, nxt.num_cached_blocks = np.concatenate([hits, more]), 3
    h.end(nxt, 1.0)  # slow: offloaded, all three
    assert h.policy.offloads == 1 and h.tier.reserved == 3


@pytest.mark.parametrize("cat", ["grep", "submit", None])  # 0.5 s < 2 s; predicted end; no tool call
def test_no_offload_for_short_tool_calls_ends_or_no_tool(pred, cat):
    s = sessions_for([cat])[0]
    h = Harness(pred, tier_blocks=8)
    h.finish(s, 3, now=1.0)
    assert h.policy.offloads == 0 and h.tier.reserved == 0 and not h.tier._pending


def test_threshold_is_a_parameter_and_no_round_trip_no_offload(pred):
    s = sessions_for(["read", "read"])
    h = Harness(pred, tier_blocks=100, offload_threshold_s=1.0)
    h.finish(s[0], 3, now=0.0)  # 3 s > 1 s: offloaded
    assert h.policy.offloads == 1
    h.finish(s[1], 12, now=0.0)  # prefetch at 3 - 1.2 - 0.5 = 1.3, after the offload's end (1.2): offloaded
    assert h.policy.offloads == 2
    h2 = Harness(pred, num_blocks=40, tier_blocks=100, offload_threshold_s=1.0)
    h2.finish(s[1], 13, now=0.0)  # start 3 - 1.3 - 0.5 = 1.2 <= 1.3: no time for the round trip
    assert h2.policy.offloads == 0


def test_no_room_no_offload_and_next_finish_cancels_the_pending_prefetch(pred):
    s = sessions_for(["slow", "slow"])
    h = Harness(pred, num_blocks=24, tier_blocks=4)
    h.finish(s[0], 3, now=0.0)
    h.finish(s[1], 3, now=0.0)  # 3 > 4 - 3 reserved
    assert h.policy.offloads == 1
    h.tier.tick(1.0)
    p = h.policy._prefetch[s[0].session_id]
    assert s[1].session_id not in h.policy._prefetch
    h.finish(s[0], 2, now=2.0, turn=1)  # the session's next call ended before the prefetch started
    assert p.cancelled and s[0].session_id not in h.policy._prefetch


def test_without_tier_only_the_space_scheduler_runs(pred):
    s = sessions_for(["slow"])[0]
    h = Harness(pred)
    h.finish(s, 3, now=0.0)
    assert h.policy.offloads == 0
    h.policy.tick(0.0)
    assert h.policy.critical == {s.session_id}


# ----------------------------------------------------------- space scheduler
def test_critical_sessions_are_evicted_last_and_admitted_first(pred):
    """As before, with "s1 ends" now online: s1 has no request in the engine and finished more
    than ``session_idle_s`` (here 1.5 s) ago (was: ``SessionState.end`` set by the workload)."""
    s = sessions_for(["grep", "read", "slow", "submit"])
    h = Harness(pred, reserve_share=0.2, session_idle_s=1.5)  # k = int(0.2 * 15 usable / 2 blocks) = 1
    pool, pol, env = h.pool, h.policy, h.env
    r0 = h.finish(s[0], 2, now=0.0)  # back at 0.5
    r1 = h.finish(s[1], 2, now=0.0)  # back at 3
    r2 = h.finish(s[2], 2, now=0.0)  # back at 10
    h.finish(s[3], 2, now=0.0)  # predicted to end: never a candidate
    free = pool.free_block_ids()
    assert free[-8:] == [*r0.blocks[::-1], *r1.blocks[::-1], *r2.blocks[::-1], 8, 7]  # plain LRU so far
    env.tick(0.0)
    assert pol.critical == {s[0].session_id}
    assert pool.free_block_ids()[-2:] == r0.blocks[::-1].tolist()  # evicted last
    assert pool.free_block_ids()[-8:-2] == [*r1.blocks[::-1], *r2.blocks[::-1], 8, 7]
    # the sessions' next calls arrive (they wait: s2's keeps s2 active)
    waiting = [h.arrive(s[2], 1, 0.5), h.arrive(s[0], 1, 0.6)]
    assert sorted(waiting, key=env.priority_key) == waiting[::-1]
    assert [pol.priority(r.view) for r in waiting] == [1, 0]
    # s0's next call runs (it hit its blocks): s1 is now the soonest
    pool.touch(r0.blocks)
    h.sched.running = [waiting[1]]
    env.tick(1.0)
    assert pol.critical == {s[1].session_id}
    assert pool.free_block_ids()[-2:] == r1.blocks[::-1].tolist()
    assert pool.free_block_ids()[-6:-2] == [*r2.blocks[::-1], 8, 7]
    # s1 (and s3) went idle at 1.5 s: s1's blocks lose the mark
    assert env.session_active(s[1].session_id) and env.active_sessions == 4
    h.sched.running = []
    env.tick(2.0)
    assert not env.session_active(s[1].session_id) and env.active_sessions == 2  # s0, s2: a request each
    assert pol.critical == {s[0].session_id}  # s0 (back at 0.5) is a candidate again: its request no longer runs
    assert pool.free_block_ids()[-6:] == [*r1.blocks[::-1], *r2.blocks[::-1], 8, 7]  # s1's back in LRU place
    assert s[1].session_id not in pol._releases and s[1].session_id not in pol._toolcall
    assert s[3].session_id not in pol._releases
    assert s[2].session_id in pol._releases and s[2].session_id in pol._toolcall  # waiting: still active
    pool.free_blocks(r0.blocks[::-1], None, 2.0)
    pool.check_invariants()


def test_critical_ties_go_in_the_order_the_engine_first_saw_the_sessions(pred):
    """Two sessions predicted back at the same time, k = 1: the one the engine saw first is critical
    (was: the trace's session index; now ``RequestView.session_number``)."""
    s = sessions_for(["read", "read"])
    h = Harness(pred, reserve_share=0.2)  # k = int(0.2 * 15 / 2) = 1
    late = h.start(s[1], 2)  # the engine sees s1 first
    early = h.start(s[0], 2)
    assert (late.view.session_number, early.view.session_number) == (0, 1)
    h.end(early, 1.0)
    h.end(late, 1.0)
    h.env.tick(1.0)
    assert h.policy.critical == {s[1].session_id}


def test_critical_release_scores_critical(pred):
    s = sessions_for(["grep"])[0]
    h = Harness(pred)
    h.finish(s, 2, now=0.0)
    h.policy.tick(0.0)
    assert h.policy.critical == {s.session_id}
    b = h.pool.get_new_blocks(1)
    h.pool.cache_full_blocks(b, [5])
    r = h.arrive(s, 0, 0.5, hashes=[5])
    rel = Release(r.view, ReleaseReason.PREEMPT, 1.0, np.array([0]), np.array([5]), np.zeros(1, dtype=bool), b, -1)
    assert h.policy.score(rel) == CRITICAL
    assert h.policy.score(Release(None, ReleaseReason.FREE, 1.0, np.array([0]), np.array([5]),
                                  np.zeros(1, dtype=bool), b, -1)) == 0.0


# ---------------------------------------------------------------- whole runs
@pytest.fixture(scope="module")
def pressured_trace():
    return agent_trace(n_sessions=8, turns=12, seed=3)  # tool times 0.1-3 s


def test_tokencake_end_to_end_under_pressure(pressured_trace):
    n_req = sum(len(x.calls) for x in pressured_trace.sessions)
    s = simulate(pressured_trace, SimConfig(policy="tokencake", kv_blocks=1300, agents=4, offload_threshold_s=0.5)).summary
    assert s["sessions"] == 8 and s["requests"] == n_req
    assert s["cpu_kv_blocks"] == 1299
    assert s["offloaded_blocks"] > 0 and s["prefetched_blocks"] > 0 and s["swap_in_hits"] > 0
    assert s["swapped_in_tokens"] == 16 * s["swap_in_hits"]
    no_tier = simulate(pressured_trace, SimConfig(policy="tokencake", kv_blocks=1300, agents=4, cpu_kv_blocks=0,
                                                  offload_threshold_s=0.5)).summary
    assert no_tier["requests"] == n_req and no_tier["offloaded_blocks"] == 0 and no_tier["cpu_kv_blocks"] == 0
    assert s["evicted_blocks"] < no_tier["evicted_blocks"]  # offloaded blocks are reused without evicting


def _summary(trace, **kw):
    s = simulate(trace, SimConfig(**kw)).summary
    return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in s.items()
            if k not in ("wall_s", "config", "decode_jumps")}, s["decode_jumps"]


@pytest.mark.parametrize("extra", [{"offload_threshold_s": 0.5}, {"offload_threshold_s": 0.2, "cpu_kv_blocks": 300}])
def test_decode_jumps_on_and_off_agree_with_a_tier(pressured_trace, extra):
    kw = dict(policy="tokencake", kv_blocks=1300, agents=4, **extra)
    jumped, n_jumps = _summary(pressured_trace, **kw)
    stepwise, n0 = _summary(pressured_trace, decode_jumps=False, **kw)
    assert n0 == 0 and n_jumps > 50
    assert jumped["offloaded_blocks"] > 0 and jumped["prefetched_blocks"] > 0
    if "cpu_kv_blocks" in extra:
        assert jumped["cpu_evicted_blocks"] > 0  # the small tier is full: LRU at work
    assert jumped == stepwise
