"""Continuum (arXiv 2511.02230): tool-call-aware KV pinning with a time-to-live, program-level FCFS.

Eviction (:class:`ContinuumEviction`), exactly:

- When a call *finishes* and its response makes a tool call (the call has
  tools; category ``cat = call_category(call)``), and the session is not
  predicted to end (``predictor.p_continue(cat) >= 0.5``), the blocks it frees
  are *pinned* for ``ttl = predictor.quantile(cat, q)`` seconds (``q`` a
  constructor parameter, default 0.9: the q-quantile of the tool category's
  observed gaps until the next call). No pin when ``ttl <= 0``.
- A pinned release scores ``PINNED`` (1e18): it is evicted only after every
  unpinned free cached block; among pinned releases, LRU.
- Every other release (no tool call, session predicted to end, a preemption,
  no request) scores 0: vLLM's LRU.
- At ``now + ttl`` (:meth:`ContinuumEviction.tick`, which the engine calls
  before each scheduling step) the pin expires: the blocks of that release
  that are still free and not re-released or evicted since are moved back to
  score 0 with the release's original ``seq`` (``BlockPool.requeue``), i.e.
  they become ordinary LRU blocks at the position they would have had had
  they never been pinned. :meth:`next_deadline` (the earliest pending expiry)
  stops the engine's decode jumps before it, so jumps stay exact.

Scheduling (:class:`ProgramFCFS`), exactly: waiting requests are admitted in
order of their session's start time, then their arrival (ties keep queue
order); the preemption victim is the running request whose session started
last (ties: the one admitted last).
"""

from __future__ import annotations

import heapq
import math

import numpy as np

from cwsim.block_pool import FreedBlocks
from cwsim.policies.base import EvictionPolicy, SchedulingPolicy
from cwsim.predict import call_category
from cwsim.request import Request

#: score of a pinned release: after every unpinned block
PINNED = 1e18


class ProgramFCFS(SchedulingPolicy):
    """Program-level FCFS: the session (agent program) that started first goes first."""

    name = "program-fcfs"
    static = False

    def priority(self, req: Request):
        return (req.session.start, req.arrival)

    def preemption_victim(self, running: list[Request]) -> Request:
        victim = running[0]
        for r in running[1:]:
            if r.session.start >= victim.session.start:
                victim = r
        return victim


class ContinuumEviction(EvictionPolicy):
    """Pin a tool-calling session's blocks for a per-tool TTL; then plain LRU."""

    name = "continuum-evict"

    def __init__(self, q: float = 0.9):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        self.q = q
        # pending pins: (expiry, seq, blocks, gens) — gens: the blocks' eviction counts at pin time
        self._pins: list[tuple[float, int, np.ndarray, np.ndarray]] = []
        self.pinned_releases = 0

    @property
    def pool(self):
        return self.ctx.kv.pool

    def ttl(self, req: Request) -> float:
        """Seconds to pin the blocks ``req`` frees when it finishes (0: no pin)."""
        call = req.session.calls[req.turn]
        if not call.tools:
            return 0.0
        pred = self.ctx.predictor
        cat = call_category(call)
        if pred.p_continue(cat) < 0.5:
            return 0.0
        ttl = pred.quantile(cat, self.q)
        return ttl if math.isfinite(ttl) and ttl > 0 else 0.0

    def score(self, freed: FreedBlocks) -> float:
        pool = self.pool
        seq = freed.seq
        blocks = freed.blocks
        req = freed.request
        if req is None or freed.reason != "finish":
            return 0.0
        ttl = self.ttl(req)
        if ttl <= 0:
            return 0.0
        blocks = blocks.copy()
        heapq.heappush(self._pins, (freed.now + ttl, seq, blocks, pool.gen[blocks]))
        self.pinned_releases += 1
        return PINNED

    def _still_pinned(self, seq: int, blocks: np.ndarray, gens: np.ndarray) -> np.ndarray:
        """Which of a pin's blocks are still in that release: free, not re-released, not evicted."""
        return self.pool.in_release(blocks, seq)

    def tick(self, now: float) -> None:
        pins = self._pins
        while pins and pins[0][0] <= now:
            _, seq, blocks, gens = heapq.heappop(pins)
            keep = self._still_pinned(seq, blocks, gens)
            if keep.any():
                self.pool.requeue(blocks[keep], 0.0, seq)

    def next_deadline(self) -> float:
        pins = self._pins
        while pins and not self._still_pinned(*pins[0][1:]).any():
            heapq.heappop(pins)  # nothing left to unpin: not a deadline
        return pins[0][0] if pins else math.inf
