"""Eviction-only policies: LFU, and Belady (the offline reference). Scores: lower is evicted first."""

from __future__ import annotations

import numpy as np

from cwsim.policies.api import Need, Policy, Release, ReleaseReason


class LFU(Policy):
    """Least frequently used: a block's score is how many requests have used its content so far.

    Each release of a cached block counts as one use; ties (equal counts) are
    LRU. Counts are per content key, so a recomputed block inherits its history.
    """

    name = "lfu"

    def __init__(self) -> None:
        self.uses: dict[int, int] = {}

    def score(self, release: Release) -> np.ndarray:
        uses = self.uses
        out = np.empty(len(release.keys))
        for i, h in enumerate(release.keys.tolist()):
            out[i] = uses[h] = uses.get(h, 0) + 1
        return out


class Belady(Policy):
    """Offline reference: evict the cached block whose next use is farthest away.

    The score of a freed block is minus the time of its next use, read from the
    trace's future (``Environment.future``, the simulator's
    ``cwsim.policy_adapter.TraceFuture``): the same session's next call arrives
    exactly ``gap_s`` after this call ends (the closed loop makes that time
    known), and reuses the blocks that the two calls' token sequences share;
    blocks of a prefix that other sessions share (a system prompt) are needed
    again as soon as any other session calls, scored as "now"; any other block
    is never used again (score -inf, evicted first). Blocks freed by a
    preemption are needed at once. With prefix dependencies and variable
    recompute costs this is a strong heuristic, not a proof of optimum.
    """

    name = "belady"
    needs = frozenset({Need.FUTURE})

    def score(self, release: Release) -> float | np.ndarray:
        now, req = release.now, release.request
        if req is None or release.reason == ReleaseReason.PREEMPT:
            return -now
        fut = self.env.future
        bs = self.env.block_size
        pos = release.positions
        scores = np.full(len(pos), -np.inf)
        nxt = fut.next_call(req)
        if nxt is not None:
            gap_s, next_shared_tokens = nxt
            scores[pos < next_shared_tokens // bs] = -(now + gap_s)
        shared = pos < fut.shared_prefix_tokens(req) // bs
        if shared.any() and fut.active_sessions > 1:
            scores[shared] = -now
        return scores
