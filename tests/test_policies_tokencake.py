"""Tokencake: the time scheduler's offload / prefetch decisions, the space scheduler's critical
sessions (eviction order and admission order), and whole runs with and without a CPU tier."""

from types import SimpleNamespace

import numpy as np
import pytest

from cwsim.block_pool import BlockPool
from cwsim.config import SimConfig
from cwsim.cpu_tier import CpuTier
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies import PolicyContext, get_policy
from cwsim.policies.tokencake import CRITICAL, TokencakeEviction, TokencakeScheduling
from cwsim.predict import ToolCallPredictor
from cwsim.request import Request
from cwsim.runner import simulate
from cwsim.workload import Workload
from tests.conftest import agent_trace
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
    def __init__(self, pred, num_blocks: int = 16, tier_blocks: int = 0, **kw):
        self.policy = TokencakeEviction(**kw)
        self.pool = BlockPool(num_blocks, self.policy.score)
        self.tier = CpuTier(tier_blocks, self.pool, 1000, 1e-5) if tier_blocks else None
        self.sched = SimpleNamespace(running=[], waiting=[])
        self.ctx = PolicyContext(kv=KVCacheManager(self.pool, 4), workload=Workload([]), predictor=pred,
                                 cpu_tier=self.tier, scheduler=self.sched)
        self.policy.bind(self.ctx)
        self.sched_policy = TokencakeScheduling()
        self.sched_policy.bind(self.ctx)
        self._h = 1000
        self._rid = 0

    def finish(self, sess, n_blocks: int, now: float, turn: int = 0) -> Request:
        """A call of ``sess`` that filled ``n_blocks`` cached blocks finishes at ``now``."""
        blocks = self.pool.get_new_blocks(n_blocks)
        hashes = list(range(self._h, self._h + n_blocks))
        self._h += n_blocks
        self.pool.cache_full_blocks(blocks, hashes)
        r = Request(self._rid, sess, turn, 4 * n_blocks, 1, hashes, 0.0)
        self._rid += 1
        r.blocks, r.num_cached_blocks = blocks, n_blocks
        self.pool.free_block_table(blocks, r, now, "finish")
        self.pool.check_invariants()
        return r


def test_registry_entry():
    spec = get_policy("tokencake")
    assert spec.needs_predictor and spec.default_cpu_tier == 1.0
    assert spec.scheduling().static is False
    assert get_policy("vllm").default_cpu_tier == 0.0


# ------------------------------------------------------------ time scheduler
def test_long_tool_call_offloads_own_blocks_and_schedules_the_prefetch(pred):
    s = sessions_for(["slow"])[0]
    s.shared_prefix_tokens = 4  # the first block is shared with other sessions: it stays
    h = Harness(pred, tier_blocks=8)
    r = h.finish(s, 3, now=1.0)
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
    p = h.policy._prefetch[s[0]]
    h.finish(s[0], 2, now=2.0, turn=1)  # the session's next call ended before the prefetch started
    assert p.cancelled and s[0] not in h.policy._prefetch


def test_without_tier_only_the_space_scheduler_runs(pred):
    s = sessions_for(["slow"])[0]
    h = Harness(pred)
    h.finish(s, 3, now=0.0)
    assert h.policy.offloads == 0
    h.policy.tick(0.0)
    assert h.policy.critical == {s}


# ----------------------------------------------------------- space scheduler
def test_critical_sessions_are_evicted_last_and_admitted_first(pred):
    s = sessions_for(["grep", "read", "slow", "submit"])
    h = Harness(pred, reserve_share=0.2)  # k = int(0.2 * 15 usable / 2 blocks) = 1
    pool, pol = h.pool, h.policy
    r0 = h.finish(s[0], 2, now=0.0)  # back at 0.5
    r1 = h.finish(s[1], 2, now=0.0)  # back at 3
    r2 = h.finish(s[2], 2, now=0.0)  # back at 10
    h.finish(s[3], 2, now=0.0)  # predicted to end: never a candidate
    free = pool.free_block_ids()
    assert free[-8:] == [*r0.blocks[::-1], *r1.blocks[::-1], *r2.blocks[::-1], 8, 7]  # plain LRU so far
    pol.tick(0.0)
    assert pol.critical == {s[0]}
    assert pool.free_block_ids()[-2:] == r0.blocks[::-1].tolist()  # evicted last
    assert pool.free_block_ids()[-8:-2] == [*r1.blocks[::-1], *r2.blocks[::-1], 8, 7]
    sp = h.sched_policy
    waiting = [Request(90, s[2], 1, 4, 1, [], 5.0), Request(91, s[0], 1, 4, 1, [], 6.0)]
    assert sorted(waiting, key=sp.priority) == waiting[::-1]
    # s0's next call runs (it hit its blocks): s1 is now the soonest
    pool.touch(r0.blocks)
    h.sched.running = [waiting[1]]
    pol.tick(1.0)
    assert pol.critical == {s[1]}
    assert pool.free_block_ids()[-2:] == r1.blocks[::-1].tolist()
    assert pool.free_block_ids()[-6:-2] == [*r2.blocks[::-1], 8, 7]
    # s1 ends: its blocks lose the mark
    s[1].end = 2.0
    h.sched.running = []
    pol.tick(2.0)
    assert pol.critical == {s[0]}  # s0 (back at 0.5) is a candidate again: its request no longer runs
    assert pool.free_block_ids()[-6:] == [*r1.blocks[::-1], *r2.blocks[::-1], 8, 7]  # s1's back in LRU place
    assert s[1] not in pol._releases and s[1] not in pol._toolcall
    pool.free_blocks(r0.blocks[::-1], None, 2.0)
    pool.check_invariants()


def test_critical_release_scores_critical(pred):
    s = sessions_for(["grep"])[0]
    h = Harness(pred)
    h.finish(s, 2, now=0.0)
    h.policy.tick(0.0)
    assert h.policy.critical == {s}
    b = h.pool.get_new_blocks(1)
    h.pool.cache_full_blocks(b, [5])
    r = Request(50, s, 0, 4, 1, [5], 0.0)
    assert h.policy.score(SimpleNamespace(blocks=b, hashes=np.array([5]), positions=np.array([0]), request=r,
                                          now=1.0, reason="preempt", seq=-1)) == CRITICAL


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
