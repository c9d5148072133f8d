"""Block-eviction policies (scores: lower is evicted first)."""

from __future__ import annotations

import numpy as np

from cwsim.block_pool import FreedBlocks
from cwsim.policies.base import EvictionPolicy


class LRU(EvictionPolicy):
    """vLLM's order: every block scores 0, so the least recently freed goes first."""

    name = "lru"


class LFU(EvictionPolicy):
    """Least frequently used: a block's score is how many requests have used its hash so far.

    Each release of a cached block counts as one use; ties (equal counts) are
    LRU. Counts are per hash, so a recomputed block inherits its history.
    """

    name = "lfu"

    def __init__(self) -> None:
        self.uses: dict[int, int] = {}

    def score(self, freed: FreedBlocks) -> np.ndarray:
        uses = self.uses
        out = np.empty(len(freed.hashes))
        for i, h in enumerate(freed.hashes.tolist()):
            out[i] = uses[h] = uses.get(h, 0) + 1
        return out


class Belady(EvictionPolicy):
    """Offline reference: evict the cached block whose next use is farthest away.

    The score of a freed block is minus the time of its next use, read from the
    trace's future: the same session's next call arrives exactly ``gap_s``
    after this call ends (the closed loop makes that time known), and reuses
    the blocks that the two calls' token sequences share; blocks of a prefix
    that other sessions share (a system prompt) are needed again as soon as any
    other session calls, scored as "now"; any other block is never used again
    (score -inf, evicted first). Blocks freed by a preemption are needed at
    once. With prefix dependencies and variable recompute costs this is a
    strong heuristic, not a proof of optimum.
    """

    name = "belady"

    def score(self, freed: FreedBlocks) -> float | np.ndarray:
        now = freed.now
        req = freed.request
        if req is None or freed.reason == "preempt":
            return -now
        sess = req.session
        bs = self.ctx.kv.block_size
        call = sess.calls[req.turn]
        pos = freed.positions
        scores = np.full(len(pos), -np.inf)
        if req.turn + 1 < len(sess.calls):
            reused = pos < call.next_shared_tokens // bs
            scores[reused] = -(now + call.gap_s)
        shared = pos < sess.shared_prefix_tokens // bs
        if shared.any() and self.ctx.workload.active_sessions > 1:
            scores[shared] = -now
        return scores
