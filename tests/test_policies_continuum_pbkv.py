"""Continuum (TTL pinning, program-level FCFS) and PBKV (confidence-weighted prediction) on tiny pools.

Exact free-queue orders (front = evicted first) on pools of a few blocks, with
hand-built requests and a predictor fitted on a hand-made trace, plus the
engine's decode jumps stopping at a Continuum pin's expiry.
"""

import json

import numpy as np
import pytest

from cwsim.block_pool import BlockPool
from cwsim.config import SimConfig
from cwsim.policies import get_policy
from cwsim.policies.api import Release, ReleaseReason
from cwsim.policies.continuum import PINNED, Continuum, ProgramFCFS
from cwsim.policies.pbkv import PBKV
from cwsim.predict import ToolCallPredictor
from cwsim.request import Request
from cwsim.runner import DEFAULT_TRACE, simulate
from cwsim.workload import Workload
from tests.conftest import ROUND_PROFILE
from tests.policy_harness import bound_pool, release
from traces.format import Call, Session, ToolCall, Trace, header_line
from traces.reader import load_trace


def fit_trace() -> Trace:
    """Per tool category, the gaps until the next call:

    - ``read``: 1, 2, 3, 4, 5 s (then the session goes on): quantile(0.9) = 4.6, mean 3
    - ``grep``: 0.5 s five times: mean 0.5, no spread
    - ``slow``: 100 s five times: mean 100, no spread
    - ``submit``: always a session's last call: p_continue = 0
    """
    sessions = []
    k = 0
    for cat, gaps in [("read", [1.0, 2.0, 3.0, 4.0, 5.0]), ("grep", [0.5] * 5), ("slow", [100.0] * 5)]:
        for g in gaps:
            sid = f"fit{k}"
            k += 1
            calls = (Call(sid, 0, (("p", 4),), 1, None, (ToolCall("t", cat),), gap_s=g),
                     Call(sid, 1, (("p", 4),), 1, None, (ToolCall("t", "submit"),)))
            sessions.append(Session(sid, calls))
    return Trace(sessions, source="fit")


@pytest.fixture
def pred() -> ToolCallPredictor:
    p = ToolCallPredictor.fit(fit_trace(), min_samples=1)
    assert p.quantile("read", 0.9) == pytest.approx(4.6)
    assert p.p_continue("read") == 1.0 and p.p_continue("submit") == 0.0
    return p


def sessions_for(cats: list[list[str]]):
    """SessionStates whose call k's last tool has category cats[i][k] (None: no tool call)."""
    sess = []
    for i, cs in enumerate(cats):
        calls = tuple(Call(f"s{i}", k, ((f"s{i}", 4),), 1, None, (ToolCall("t", c),) if c else ())
                      for k, c in enumerate(cs))
        sess.append(Session(f"s{i}", calls))
    return Workload.from_trace(Trace(sess, source="hand")).sessions


class Harness:
    """A bare pool scored by ``policy``, bound to the simulator's adapter with ``pred``."""

    def __init__(self, policy, num_blocks: int, pred):
        self.policy = policy
        self.pool, self.env = bound_pool(policy, num_blocks, 4, predictor=pred)
        self._h = 1000

    def req(self, rid: int, sess, turn: int = 0, arrival: float = 0.0) -> Request:
        """A request that arrives in the engine (it gets its view)."""
        r = Request(rid, sess, turn, 4, 1, [], arrival)
        self.env.on_arrival(r)
        return r

    def use(self, n: int) -> np.ndarray:
        """Allocate ``n`` blocks and give them fresh hashes (full, cached blocks)."""
        blocks = self.pool.get_new_blocks(n)
        self.pool.cache_full_blocks(blocks, list(range(self._h, self._h + n)))
        self._h += n
        return blocks

    def finish(self, blocks: np.ndarray, r: Request, now: float, reason: str = "finish") -> None:
        release(self.env, blocks, r, now, reason)  # tail first, as vLLM frees
        self.pool.check_invariants()


# ---------------------------------------------------------------- Continuum
def test_continuum_pin_is_evicted_after_unpinned_then_rejoins_lru_at_expiry(pred):
    s = sessions_for([["read", "submit"], ["read", "submit"], [None]])
    h = Harness(Continuum(q=0.9), 7, pred)
    pool, pol = h.pool, h.policy
    a, b, c = h.use(2), h.use(2), h.use(2)
    assert (a.tolist(), b.tolist(), c.tolist()) == ([1, 2], [3, 4], [5, 6])
    h.finish(a, h.req(0, s[0], 0), now=10.0)  # a tool call (read): pinned until 14.6
    h.finish(b, h.req(1, s[1], 1), now=11.0)  # submit: the session is predicted to end, not pinned
    h.finish(c, h.req(2, s[2], 0), now=12.0)  # no tool call: not pinned
    assert pool.free_block_ids() == [4, 3, 6, 5, 2, 1]
    assert pol.next_deadline() == pytest.approx(14.6)
    pol.tick(14.5)
    assert pool.free_block_ids() == [4, 3, 6, 5, 2, 1]
    pol.tick(14.6)  # expired: back to where its release (the oldest) would be in LRU order
    assert pool.free_block_ids() == [2, 1, 4, 3, 6, 5]
    assert pol.next_deadline() == np.inf
    pool.check_invariants()
    assert pool.get_new_blocks(3).tolist() == [2, 1, 4]
    pool.check_invariants()


def test_continuum_pins_are_lru_among_themselves_and_expire_separately(pred):
    s = sessions_for([["read"], ["grep"]])
    h = Harness(Continuum(q=0.9), 5, pred)
    pool, pol = h.pool, h.policy
    a, b = h.use(2), h.use(2)
    h.finish(a, h.req(0, s[0]), now=0.0)  # read: expires at 4.6
    h.finish(b, h.req(1, s[1]), now=1.0)  # grep: expires at 1.5
    assert pool.free_block_ids() == [2, 1, 4, 3]
    assert pol.next_deadline() == pytest.approx(1.5)
    pol.tick(2.0)  # b's pin expired, a's not
    assert pool.free_block_ids() == [4, 3, 2, 1]
    assert pol.next_deadline() == pytest.approx(4.6)
    pol.tick(5.0)  # both plain LRU: a was released first
    assert pool.free_block_ids() == [2, 1, 4, 3]
    pool.check_invariants()


def test_continuum_session_predicted_to_end_is_not_pinned(pred):
    s = sessions_for([["submit"], [None], ["read"]])
    h = Harness(Continuum(), 5, pred)
    blocks = h.use(2)

    def fb(r, reason=ReleaseReason.FINISH):
        view = None
        if r is not None:
            r.finish = 3.0  # the response has ended: its tool calls are known
            view = r.view
        return Release(view, reason, 3.0, np.arange(2), h.pool.hash_of[blocks], np.zeros(2, dtype=bool), blocks, -1)

    assert h.policy.score(fb(h.req(0, s[0]))) == 0.0
    assert h.policy.score(fb(h.req(1, s[1]))) == 0.0
    assert h.policy.score(fb(None)) == 0.0
    assert h.policy.score(fb(h.req(2, s[2]), ReleaseReason.PREFETCH)) == 0.0  # only a finish pins
    assert h.policy.next_deadline() == np.inf and h.policy.pinned_releases == 0
    assert h.policy.ttl(h.req(3, s[2]).view) == 0.0  # before the response has ended: no tool call known
    assert h.policy.score(fb(h.req(4, s[2]))) == PINNED  # a tool call that continues: pinned
    assert h.policy.pinned_releases == 1


def test_continuum_preemption_is_not_pinned(pred):
    s = sessions_for([["read"]])
    h = Harness(Continuum(), 5, pred)
    a, b = h.use(2), h.use(2)
    h.finish(a, h.req(0, s[0]), now=0.0, reason="preempt")
    h.finish(b, h.req(1, s[0]), now=1.0, reason="finish")
    assert h.pool.free_block_ids() == [2, 1, 4, 3]
    assert h.policy.next_deadline() == pytest.approx(1.0 + 4.6)  # only the finish pinned


def test_continuum_expiry_skips_blocks_reused_or_evicted_since(pred):
    s = sessions_for([["read", "read"], [None], [None]])
    h = Harness(Continuum(), 8, pred)
    pool, pol = h.pool, h.policy
    a = h.use(3)  # 1, 2, 3
    b = h.use(2)  # 4, 5
    h.finish(a, h.req(0, s[0]), now=0.0)  # pinned until 4.6
    h.finish(b, h.req(1, s[1]), now=1.0)
    assert pool.free_block_ids() == [6, 7, 5, 4, 3, 2, 1]
    pool.touch(np.array([1]))  # the session's next call hits block 1 ...
    pool.free_blocks(np.array([1]), h.req(2, s[2]), 2.0)  # ... and frees it again, unpinned
    assert pool.free_block_ids() == [6, 7, 5, 4, 1, 3, 2]
    pool.touch(np.array([2]))  # block 2 is in use at the expiry
    pol.tick(5.0)  # only block 3 is still in the pinned release
    assert pool.free_block_ids() == [6, 7, 3, 5, 4, 1]
    pool.check_invariants()


def test_continuum_expiry_skips_blocks_evicted_and_freed_unhashed(pred):
    s = sessions_for([["read"], [None]])
    h = Harness(Continuum(), 5, pred)
    pool, pol = h.pool, h.policy
    a = h.use(2)  # 1, 2
    h.finish(a, h.req(0, s[0]), now=0.0)  # pinned
    got = pool.get_new_blocks(3)  # 3, 4 (never used), then evicts 2 (pinned goes last, but nothing else is left)
    assert got.tolist() == [3, 4, 2]
    pool.free_blocks(got[:2])
    pool.free_blocks(got[2:])  # freed without hashes: tier 0, newest release first
    assert pool.free_block_ids() == [2, 3, 4, 1]
    pol.tick(10.0)  # block 1 is unpinned; block 2 (evicted since) stays where it is
    assert pool.free_block_ids() == [2, 3, 4, 1]
    assert not pool.has_hash[2] and pool.has_hash[1]
    pool.check_invariants()


def test_requeue_moves_free_cached_blocks_keeping_order():
    pool = BlockPool(9)
    blocks = pool.get_new_blocks(8)
    pool.cache_full_blocks(blocks[:6], [11, 12, 13, 14, 15, 16])
    pool.free_blocks([1, 2, 3])
    pool.free_blocks([4, 5, 6])
    pool.free_blocks([7])  # no hash: tier 0
    assert pool.free_block_ids() == [7, 1, 2, 3, 4, 5, 6]
    pool.touch(np.array([2]))  # in use: skipped
    free, hashed = pool.num_free, pool.num_free_hashed
    pool.requeue(np.array([3, 2, 1, 7, 8, 3]), -1.0, 0)  # 7: no hash; 8: in use; 3 twice
    assert pool.free_block_ids() == [7, 3, 1, 4, 5, 6]
    assert (pool.num_free, pool.num_free_hashed) == (free, hashed)
    pool.check_invariants()
    pool.requeue(np.array([5]), 0.0, 1)  # seq 1 = the first release's: between 3, 1 (score -1) and 4, 6 (seq 2)
    assert pool.free_block_ids() == [7, 3, 1, 5, 4, 6]
    pool.requeue(np.empty(0, dtype=np.int64), 0.0, 0)
    pool.check_invariants()
    assert pool.get_new_blocks(6).tolist() == [7, 3, 1, 5, 4, 6]
    assert pool.num_free == 0 and pool.num_evicted == 5
    pool.check_invariants()


def test_requeue_many_blocks_after_partial_hits_keeps_invariants():
    pool = BlockPool(1201)
    blocks = pool.get_new_blocks(1200)
    pool.cache_full_blocks(blocks, list(range(5000, 6200)))
    pool.free_blocks(blocks[:600])
    pool.free_blocks(blocks[600:])
    pool.touch(blocks[100:500])  # most of the first run leaves the queue (compaction)
    pool.requeue(blocks[:700], 5.0, 10**6)  # last: after the second release
    expect = [*range(701, 1201), *range(1, 101), *range(501, 701)]
    assert pool.free_block_ids() == expect
    pool.check_invariants()


def test_program_fcfs_orders_by_session_start_and_preempts_the_latest_program(pred):
    """Session starts 5, 1, 3 (was: set on ``SessionState.start``; now the arrival of the session's
    first request in the engine, ``RequestView.session_start``)."""
    s = sessions_for([["read"] * 3, ["read"] * 3, ["read"] * 3])
    pol = ProgramFCFS()
    pool, env = bound_pool(pol, 4)
    assert not env.static and pool.score_fn is None  # scheduling only: LRU eviction

    def req(rid, sess, turn, arrival):
        r = Request(rid, sess, turn, 4, 1, [], arrival)
        env.on_arrival(r)
        return r

    firsts = [req(10, s[0], 0, 5.0), req(11, s[1], 0, 1.0), req(12, s[2], 0, 3.0)]
    r0 = req(0, s[0], 1, arrival=6.0)  # old session, arrived first
    r1 = req(1, s[1], 2, arrival=9.0)
    r2 = req(2, s[2], 1, arrival=7.0)
    r3 = req(3, s[1], 1, arrival=8.0)  # same session as r1, arrived earlier
    assert [r.view.session_start for r in (*firsts, r0, r1, r2, r3)] == [5.0, 1.0, 3.0, 5.0, 1.0, 3.0, 1.0]
    assert [r.view.session_number for r in (*firsts, r0, r1, r2, r3)] == [0, 1, 2, 0, 1, 2, 1]
    waiting = [r0, r1, r2, r3]
    assert sorted(waiting, key=env.priority_key) == [r3, r1, r2, r0]
    assert pol.preemption_victim([r.view for r in (r1, r0, r2)]) is r0.view
    assert env.preemption_victim([r1, r0, r2]) is r0  # the adapter hands back the request
    assert env.preemption_victim([r1, r2]) is r2
    r4 = req(4, s[2], 2, arrival=9.5)  # tie on session start: the one admitted last
    assert env.preemption_victim([r2, r4, r1]) is r4


# --------------------------------------------------- engine: jumps stop at an expiry
@pytest.fixture
def expiry_setup(tmp_path):
    """A's call 0 is pinned for 0.2 s (``read``); B's long decode evicts across the expiry.

    Before the expiry B's allocations would evict B's own older unpinned
    blocks; after it A's blocks (released first) go first, so A's next call
    (1 s later) misses. The whole decode run has no other event: only the
    Continuum deadline splits the jump.
    """
    prof = tmp_path / "round.json"
    prof.write_text(json.dumps(ROUND_PROFILE.to_json()))
    ptrace = tmp_path / "pred.jsonl"
    lines = [header_line()]
    for k in range(20):  # read: always 0.2 s, then a call without tool (p_continue 0)
        lines.append(Call(f"p{k}", 0, (("x", 4),), 1, None, (ToolCall("t", "read"),), gap_s=0.2).to_line())
        lines.append(Call(f"p{k}", 1, (("x", 4),), 1).to_line())
    ptrace.write_text("\n".join(lines) + "\n")
    trace = Trace([
        Session("A", (Call("A", 0, (("a", 8),), 1, "a0", (ToolCall("t", "read"),), gap_s=1.0),
                      Call("A", 1, (("a", 8), ("a0", 1), ("at", 3)), 1, "a1"))),
        Session("B", (Call("B", 0, (("b", 8),), 3, "b0"),
                      Call("B", 1, (("b1", 8),), 41, "b1"))),
    ], source="hand")
    cfg = dict(policy="continuum", kv_blocks=15, block_size=4, profile=str(prof), agents=2,
               predictor_trace=str(ptrace))
    return trace, cfg


def run_summary(trace, cfg, **kw):
    s = simulate(trace, SimConfig(**cfg, **kw)).summary
    return {k: (round(v, 9) if isinstance(v, float) else v) for k, v in s.items()
            if k not in ("wall_s", "config", "decode_jumps")}, s["decode_jumps"]


def test_decode_jump_stops_at_continuum_expiry(expiry_setup):
    trace, cfg = expiry_setup
    stepwise, n0 = run_summary(trace, cfg, decode_jumps=False)
    jumped, n1 = run_summary(trace, cfg, decode_jumps=True)
    assert n0 == 0 and n1 >= 2
    assert jumped == stepwise
    # A's pinned blocks were evicted after the expiry, so A's next call misses its prefix
    assert stepwise["cached_prompt_tokens"] == 0 and stepwise["evicted_blocks"] >= 2


def test_decode_jump_without_the_deadline_would_differ(expiry_setup, monkeypatch):
    """The case is sensitive: ignoring the deadline, the jump evicts in the pre-expiry order."""
    trace, cfg = expiry_setup
    stepwise, _ = run_summary(trace, cfg, decode_jumps=False)
    monkeypatch.setattr(Continuum, "next_deadline", lambda self: np.inf)
    jumped, _ = run_summary(trace, cfg, decode_jumps=True)
    assert jumped["cached_prompt_tokens"] > stepwise["cached_prompt_tokens"]


# --------------------------------------------------------------------- PBKV
def test_pbkv_with_zero_confidence_is_exactly_lru(pred):
    s = sessions_for([["slow"], ["grep"], ["submit"], ["read"]])
    pred.confidence = lambda cat: 0.0
    h = Harness(PBKV(), 9, pred)
    lru = BlockPool(9)
    for i, (sess, t) in enumerate([(s[0], 1.0), (s[1], 2.0), (s[2], 3.0), (s[3], 4.0)]):
        blocks = h.use(2)
        lb = lru.get_new_blocks(2)
        lru.cache_full_blocks(lb, [i * 2, i * 2 + 1])
        h.finish(blocks, h.req(i, sess), now=t)
        lru.free_block_table(lb)
    assert h.pool.free_block_ids() == lru.free_block_ids() == [2, 1, 4, 3, 6, 5, 8, 7]


def test_pbkv_confident_long_wait_is_evicted_before_older_short_wait(pred):
    s = sessions_for([["grep"], ["slow"], ["read"]])
    assert pred.confidence("slow") == pytest.approx(5 / 6) and pred.confidence("grep") == pytest.approx(5 / 6)
    h = Harness(PBKV(), 7, pred)
    a, b, c = h.use(2), h.use(2), h.use(2)
    h.finish(a, h.req(0, s[0]), now=0.0)  # older, back in 0.5 s: score 0 - 5/6 * 0.5
    h.finish(b, h.req(1, s[1]), now=10.0)  # recent, away 100 s: score 10 - 5/6 * 100
    h.finish(c, h.req(2, s[2]), now=11.0, reason="preempt")  # needed at once: score 11
    assert h.pool.free_block_ids() == [4, 3, 2, 1, 6, 5]
    read_c = pred.confidence("read")
    assert 0 < read_c < 5 / 6  # spread lowers the confidence


def test_pbkv_category_never_seen_continuing_stays_lru(pred):
    """``submit`` has no observed gap: confidence 0, so its predicted end (a 24 h wait) is not used."""
    s = sessions_for([["grep"], ["submit"]])
    assert pred.confidence("submit") == 0.0
    h = Harness(PBKV(), 5, pred)
    a, b = h.use(2), h.use(2)
    h.finish(a, h.req(0, s[0]), now=0.0)  # score 0 - 5/6 * 0.5
    h.finish(b, h.req(1, s[1]), now=1.0)  # score 1
    assert h.pool.free_block_ids() == [2, 1, 4, 3]


# ------------------------------------------------------------ end to end
@pytest.mark.parametrize("policy", ["continuum", "pbkv"])
def test_full_simulation_completes(policy):
    spec = get_policy(policy)
    assert spec.needs_predictor
    res = simulate(None, SimConfig(policy=policy, kv_blocks=8000, max_sessions=8, agents=8))
    s = res.summary
    assert s["sessions"] == 8
    assert s["requests"] == sum(len(x.calls) for x in load_trace(DEFAULT_TRACE).sessions[:8])
