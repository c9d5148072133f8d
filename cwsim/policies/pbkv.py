"""PBKV (arXiv 2605.06472): reuse potential from predicted future calls, used conservatively.

Eviction, exactly: when cached blocks are freed at time ``now`` by a finishing
call, all of them score

    score = now - c * wait

where ``wait`` is the predicted wait until the session's next call
(``predictor.predicted_wait``: the expected idle time after the response's
tool category, or ``END_HORIZON_S`` when the session is predicted to end) and
``c = predictor.confidence(cat)`` in [0, 1] is how much the predictor trusts
that category. Lower scores are evicted first, ties LRU. With ``c = 0`` every
release scores its release time, which is exactly LRU; the more confident the
prediction, the more a long predicted wait moves the blocks towards the front
of the eviction order. Blocks freed by a preemption (or with no request) score
``now``: plain LRU.

Scheduling: FCFS (vLLM's).
"""

from __future__ import annotations

from cwsim.policies.api import Need, Policy, Release, ReleaseReason


class PBKV(Policy):
    """LRU blended with the predicted next-call wait, weighted by the predictor's confidence."""

    name = "pbkv"
    needs = frozenset({Need.PREDICTOR})

    def score(self, release: Release) -> float:
        now, req = release.now, release.request
        if req is None or release.reason == ReleaseReason.PREEMPT:
            return now
        c = self.env.predictor.confidence(req.category)
        if c <= 0.0:
            return now
        return now - c * self.env.predictor.predicted_wait(req.category, key=req.number)
