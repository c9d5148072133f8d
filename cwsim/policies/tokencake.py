"""Tokencake (arXiv 2510.18586): a time scheduler that moves an idle agent's KV
cache to CPU memory during its tool calls, and a space scheduler that keeps
GPU memory for the agents needed soonest. Simplified; exactly as implemented:

Time scheduler (:class:`TokencakeEviction`, needs a CPU tier,
``cwsim.cpu_tier``). When a call *finishes* and its response makes a tool
call (the call has tools), with ``wait = cachewise.predicted_wait(pred, req)``
(the predictor's ``expected_idle`` of the call's tool category;
``END_HORIZON_S`` when the session is predicted to end):

- if ``offload_threshold_s < wait < END_HORIZON_S``, the blocks of the
  release at positions ``>= shared_prefix_tokens // block_size`` (the
  session's own blocks; a prefix other sessions share stays on the GPU) are
  offloaded: ``n`` blocks, transfer time ``T = tier.transfer_time(n)``;
- the prefetch of the session's prefix (the hashes of the call's cached
  blocks, all of them: those still on the GPU are skipped at the prefetch's
  start) is scheduled to start at ``now + wait - T - prefetch_margin_s``, so
  the blocks are back before the predicted return;
- nothing is offloaded when that start is not after ``now + T`` (no time for
  the round trip) or when the tier has no room (``n > tier.room()``);
- a session's pending prefetch that has not started is cancelled when the
  session's next call finishes.

Space scheduler. A session is a *candidate* while its last finished call
predicted a next call (``wait < END_HORIZON_S``), it has not ended and no
request of it is running (a request of it waiting counts: it is the one due
now). Its predicted return is ``release time + wait`` (fixed at the release);
``blocks`` is its last call's block-table length. At each :meth:`tick`
the *critical* sessions are the ``k`` candidates with the earliest predicted
return (ties: session index), ``k = floor(reserve_share * usable GPU blocks /
mean blocks over the candidates)``. Expressed two ways:

- eviction: a release by a critical session scores ``CRITICAL`` (evicted
  after every other free cached block), any other release 0 (LRU). When a
  session enters or leaves the critical set, its tracked releases (every
  release with its request since its previous finish, including prefetch
  releases) are moved to the new score at their original place in the LRU
  order (``BlockPool.requeue``); blocks reused, re-released or evicted since
  are skipped. Blocks released by an ended session lose the mark;
- scheduling (:class:`TokencakeScheduling`): waiting requests of critical
  sessions are admitted first, then the others, each class in queue order;
  the preemption victim is vLLM's (the last admitted).

The critical set changes only with releases, admissions, submissions and
session ends, never inside a decode jump, so :meth:`next_deadline` is
``inf``; the tier's own deadlines bound the jumps.

Versus the paper: Tokencake partitions GPU memory into a shared pool and a
reserved pool with hard limits, derives criticality from the agent graph and
uses its own function-call time predictor with a sliding window; here the
reservation is soft (eviction order and admission order), critical means
"predicted back soonest", and the predictor is the per-category
``ToolCallPredictor``. Without a CPU tier only the space scheduler runs.
"""

from __future__ import annotations

import numpy as np

from cwsim.block_pool import FreedBlocks
from cwsim.policies.base import EvictionPolicy, SchedulingPolicy
from cwsim.policies.cachewise import END_HORIZON_S, predicted_wait
from cwsim.request import Request

#: score of a critical session's release: after every other free cached block
CRITICAL = 1e17


class TokencakeScheduling(SchedulingPolicy):
    """Critical sessions' requests first (the eviction half decides which are critical)."""

    name = "tokencake-sched"
    static = False

    def priority(self, req: Request):
        return 0 if req.session in getattr(self.ctx.eviction, "critical", ()) else 1


class TokencakeEviction(EvictionPolicy):
    name = "tokencake-evict"

    def __init__(self, offload_threshold_s: float = 2.0, reserve_share: float = 0.25, prefetch_margin_s: float = 0.5):
        if offload_threshold_s < 0 or prefetch_margin_s < 0 or not 0.0 <= reserve_share <= 1.0:
            raise ValueError("offload_threshold_s and prefetch_margin_s must be >= 0, reserve_share in [0, 1]")
        self.offload_threshold_s = offload_threshold_s
        self.reserve_share = reserve_share
        self.prefetch_margin_s = prefetch_margin_s
        self.critical: set = set()
        self._toolcall: dict = {}  # session -> (predicted return, blocks of its last call)
        self._releases: dict = {}  # session -> [(seq, blocks, gens)] tracked releases
        self._prefetch: dict = {}  # session -> its pending cwsim.cpu_tier.Prefetch
        self.offloads = 0

    @property
    def pool(self):
        return self.ctx.kv.pool

    # ------------------------------------------------------------- releases
    def score(self, freed: FreedBlocks) -> float:
        pool = self.pool
        seq = freed.seq
        blocks = freed.blocks
        req = freed.request
        if req is None:
            return 0.0
        sess = req.session
        entry = (seq, blocks.copy(), pool.gen[blocks])
        if freed.reason == "finish":
            tier = self.ctx.cpu_tier
            if tier is not None:
                tier.cancel(self._prefetch.pop(sess, None))
            wait = predicted_wait(self.ctx.predictor, req)
            if wait < END_HORIZON_S:
                self._toolcall[sess] = (freed.now + wait, len(req.blocks))
            else:
                self._toolcall.pop(sess, None)
            self._releases[sess] = [e for e in self._releases.get(sess, ()) if self._live(*e).any()] + [entry]
            call = sess.calls[req.turn]
            if tier is not None and call.tools and self.offload_threshold_s < wait < END_HORIZON_S:
                self._offload(tier, freed, req, wait)
        else:
            self._releases.setdefault(sess, []).append(entry)
        return CRITICAL if sess in self.critical else 0.0

    def _offload(self, tier, freed: FreedBlocks, req: Request, wait: float) -> None:
        shared = req.session.shared_prefix_tokens // self.ctx.kv.block_size
        own = freed.positions >= shared
        n = int(own.sum())
        if n == 0:
            return
        transfer = tier.transfer_time(n)
        start = freed.now + wait - transfer - self.prefetch_margin_s
        if start <= freed.now + transfer:
            return
        if not tier.offload(freed.blocks[own], freed.hashes[own].tolist(), freed.now):
            return
        self.offloads += 1
        self._prefetch[req.session] = tier.prefetch(req.hashes[: req.num_cached_blocks], start, owner=req)

    def _live(self, seq: int, blocks: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """Which blocks are still in that release: free, not re-released, not evicted."""
        return self.pool.in_release(blocks, seq)

    def _requeue(self, sess, score: float) -> None:
        for seq, blocks, gens in self._releases.get(sess, ()):
            keep = self._live(seq, blocks, gens)
            if keep.any():
                self.pool.requeue(blocks[keep], score, seq)

    # ---------------------------------------------------------------- time
    def tick(self, now: float) -> None:
        toolcall = self._toolcall
        ended = [s for s in self._releases if s.end >= 0]  # every tracked session has releases
        for s in ended:
            toolcall.pop(s, None)
        running = {id(r.session) for r in self.ctx.scheduler.running} if self.ctx.scheduler is not None else set()
        cand = sorted((t, s.index, s, nb) for s, (t, nb) in toolcall.items() if id(s) not in running)
        new: set = set()
        if cand:
            mean = sum(c[3] for c in cand) / len(cand)
            k = int(self.reserve_share * self.pool.num_usable_blocks / mean) if mean > 0 else len(cand)
            new = {c[2] for c in cand[:k]}
        if new != self.critical:
            entering = sorted(new - self.critical, key=lambda s: s.index)
            leaving = sorted(self.critical - new, key=lambda s: s.index)
            self.critical = new
            for s in leaving:
                self._requeue(s, 0.0)
            for s in entering:
                self._requeue(s, CRITICAL)
        for s in ended:
            self._releases.pop(s, None)
            self._prefetch.pop(s, None)
