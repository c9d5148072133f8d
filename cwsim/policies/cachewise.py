"""CacheWise: prefix-aware scheduling + reuse-aware eviction guided by tool-call predictions.

Scheduling (:class:`PrefixAwareScheduling`): admit first the waiting request
whose prompt has the longest resident (cached) prefix, ties by arrival; a
request that has waited longer than ``aging_s`` goes before all others (FCFS
among the aged), so none starves.

Eviction (:class:`ReuseAwareEviction`): when a call ends, its blocks are
scored by the predicted time of their next use, from the response's tool-call
metadata only (never the trace's future): the session's next call is expected
``predictor.predicted_wait(category)`` seconds after the response ends (the
expected idle time; ``END_HORIZON_S`` when the session is predicted to end).
Blocks of a session predicted to end, or to stay away long, score lowest and
go first; blocks of a call whose tool returns soon are kept. Blocks that
another session has shared since they were cached (``Release.shared``: a
system prompt, a common task description) are valued by how many sessions
may use them: their predicted wait is the smaller of this session's and a
typical one (the pooled mean gap), divided by the number of active sessions.
Blocks freed by a preemption are needed at once. Blocks without a hash go
first (a pool rule) and equal scores are LRU (the pool's release order).

:class:`CacheWise` is both.
"""

from __future__ import annotations

import numpy as np

from cwsim.policies.api import Need, Policy, Release, ReleaseReason, RequestView


def predicted_wait(policy: Policy, req: RequestView) -> float:
    """Seconds until ``req``'s session calls again, as the policy's predictor sees it when the response ends."""
    return policy.env.predictor.predicted_wait(req.category, key=req.number)


class PrefixAwareScheduling(Policy):
    name = "cachewise-sched"

    def __init__(self, aging_s: float = 30.0):
        if not aging_s >= 0:
            raise ValueError(f"aging_s must be >= 0, got {aging_s}")
        self.aging_s = aging_s

    def priority(self, req: RequestView):
        if self.env.now - req.arrival > self.aging_s:
            return (0, req.arrival, 0)
        return (1, -self.env.cached_prefix_blocks(req), req.arrival)


class ReuseAwareEviction(Policy):
    name = "cachewise-evict"
    needs = frozenset({Need.PREDICTOR})

    def score(self, release: Release) -> float | np.ndarray:
        now, req = release.now, release.request
        if req is None or release.reason == ReleaseReason.PREEMPT:
            return -now
        wait = predicted_wait(self, req)
        others = self.env.active_sessions - 1
        shared = release.shared
        if others <= 0 or not shared.any():
            return -(now + wait)
        # shared blocks wait for whichever session calls next, not for this one:
        # a typical wait (over all categories) divided among the active sessions
        shared_wait = min(wait, self.env.predictor.typical_idle()) / (1 + others)
        scores = np.full(len(shared), -(now + wait))
        scores[shared] = -(now + shared_wait)
        return scores


class CacheWise(PrefixAwareScheduling, ReuseAwareEviction):
    """CacheWise: prefix-aware scheduling with aging and reuse-aware eviction."""

    name = "cachewise"
