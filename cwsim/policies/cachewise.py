"""CacheWise: prefix-aware scheduling + reuse-aware eviction guided by tool-call predictions.

Scheduling: admit first the waiting request whose prompt has the longest
resident (cached) prefix, ties by arrival; a request that has waited longer
than ``aging_s`` goes before all others (FCFS among the aged), so none starves.

Eviction: when a call ends, its blocks are scored by the predicted time of
their next use, from the response's tool-call metadata only (never the
trace's future): the session's next call is expected ``expected_idle`` seconds
after the tool call starts (``ToolCallPredictor``). Blocks of a session
predicted to end, or to stay away long, score lowest and go first; blocks of a
call whose tool returns soon are kept. Blocks of a prefix other sessions share
(a system prompt) are valued by how many sessions may use them: their
predicted wait is the smaller of this session's and a typical one (the
pooled mean gap), divided by the number of other active sessions. Blocks freed by a
preemption are needed at once. Blocks without a hash go first (a pool rule)
and equal scores are LRU (the pool's release order).
"""

from __future__ import annotations

import math

import numpy as np

from cwsim.block_pool import FreedBlocks
from cwsim.policies.base import EvictionPolicy, SchedulingPolicy
from cwsim.predict import call_category
from cwsim.request import Request

#: predicted wait given to a session that is predicted to end (s)
END_HORIZON_S = 24 * 3600.0


def predicted_wait(pred, req: Request) -> float:
    """Seconds until ``req``'s session calls again, as ``pred`` (a ``ToolCallPredictor``) sees it
    when the response ends: ``END_HORIZON_S`` when the session is predicted to end
    (``p_continue < 0.5``) or no gap that long was ever seen, else the expected idle time."""
    cat = call_category(req.session.calls[req.turn])
    if pred.p_continue(cat) < 0.5:
        return END_HORIZON_S
    idle = pred.expected_idle(cat, key=req.rid)
    return idle if math.isfinite(idle) else END_HORIZON_S


class PrefixAwareScheduling(SchedulingPolicy):
    name = "cachewise-sched"
    static = False

    def __init__(self, aging_s: float = 30.0):
        self.aging_s = aging_s

    def priority(self, req: Request):
        if self.ctx.now - req.arrival > self.aging_s:
            return (0, req.arrival, 0)
        return (1, -len(self.ctx.kv.longest_prefix(req)), req.arrival)


class ReuseAwareEviction(EvictionPolicy):
    name = "cachewise-evict"

    def predicted_wait(self, req: Request) -> float:
        """Seconds until the session's next call, as the predictor sees it at the response's end."""
        return predicted_wait(self.ctx.predictor, req)

    def score(self, freed: FreedBlocks) -> float | np.ndarray:
        now, req = freed.now, freed.request
        if req is None or freed.reason == "preempt":
            return -now
        wait = self.predicted_wait(req)
        sess = req.session
        shared_blocks = sess.shared_prefix_tokens // self.ctx.kv.block_size
        others = self.ctx.workload.active_sessions - 1
        if shared_blocks == 0 or others <= 0 or not (freed.positions < shared_blocks).any():
            return -(now + wait)
        # shared blocks wait for whichever session calls next, not for this one:
        # a typical wait (over all categories) divided among the other active sessions
        shared_wait = min(wait, self.ctx.predictor.typical_idle()) / (1 + others)
        scores = np.full(len(freed.positions), -(now + wait))
        scores[freed.positions < shared_blocks] = -(now + shared_wait)
        return scores
