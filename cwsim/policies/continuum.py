"""Continuum (arXiv 2511.02230): tool-call-aware KV pinning with a time-to-live, program-level FCFS.

Eviction, exactly:

- When a call *finishes* and its response makes a tool call (category ``cat``
  of its last tool), and the session is not predicted to end
  (``predictor.p_continue(cat) >= 0.5``), the blocks it frees are *pinned*
  for ``ttl = predictor.quantile(cat, q)`` seconds (``q`` a constructor
  parameter, default 0.9: the q-quantile of the tool category's observed gaps
  until the next call). No pin when ``ttl <= 0``.
- A pinned release scores ``PINNED`` (1e18): it is evicted only after every
  unpinned free cached block; among pinned releases, LRU.
- Every other release (no tool call, session predicted to end, a preemption,
  no request) scores 0: vLLM's LRU.
- At ``now + ttl`` (:meth:`Continuum.tick`, called before each scheduling
  step) the pin expires: the blocks of that release that are still free in it
  are moved back to score 0 at the release's place (``Environment.rescore``),
  i.e. they become ordinary LRU blocks at the position they would have had,
  had they never been pinned. :meth:`next_deadline` (the earliest pending
  expiry) stops the simulator's decode jumps before it, so jumps stay exact.

Scheduling, exactly: waiting requests are admitted in order of their
session's start time, then their arrival (ties keep queue order); the
preemption victim is the running request whose session started last (ties:
the one admitted last).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import numpy as np

from cwsim.policies.api import Need, Policy, Release, ReleaseReason, RequestView

#: score of a pinned release: after every unpinned block
PINNED = 1e18


class ProgramFCFS(Policy):
    """Program-level FCFS: the session (agent program) that started first goes first."""

    name = "program-fcfs"

    def priority(self, req: RequestView):
        return (req.session_start, req.arrival)

    def preemption_victim(self, running: Sequence[RequestView]) -> RequestView:
        victim = running[0]
        for r in running[1:]:
            if r.session_start >= victim.session_start:
                victim = r
        return victim


class Continuum(ProgramFCFS):
    """Pin a tool-calling session's blocks for a per-tool TTL; then plain LRU. Program-level FCFS."""

    name = "continuum"
    needs = frozenset({Need.PREDICTOR})

    def __init__(self, q: float = 0.9):
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q}")
        self.q = q
        self._pins: list[tuple[float, int, np.ndarray]] = []  # (expiry, release seq, blocks)
        self.pinned_releases = 0

    def ttl(self, req: RequestView) -> float:
        """Seconds to pin the blocks ``req`` frees when it finishes (0: no pin)."""
        if not req.tool_calls:
            return 0.0
        pred = self.env.predictor
        cat = req.category
        if pred.p_continue(cat) < 0.5:
            return 0.0
        ttl = pred.quantile(cat, self.q)
        return ttl if math.isfinite(ttl) and ttl > 0 else 0.0

    def score(self, release: Release) -> float:
        req = release.request
        if req is None or release.reason != ReleaseReason.FINISH:
            return 0.0
        ttl = self.ttl(req)
        if ttl <= 0:
            return 0.0
        heapq.heappush(self._pins, (release.now + ttl, release.seq, release.blocks.copy()))
        self.pinned_releases += 1
        return PINNED

    def tick(self, now: float) -> None:
        pins = self._pins
        while pins and pins[0][0] <= now:
            _, seq, blocks = heapq.heappop(pins)
            self.env.rescore(seq, blocks, 0.0)

    def next_deadline(self) -> float:
        pins = self._pins
        while pins and not self.env.still_free(pins[0][1], pins[0][2]).any():
            heapq.heappop(pins)  # nothing left to unpin: not a deadline
        return pins[0][0] if pins else math.inf
