"""PBKV (arXiv 2605.06472): reuse potential from predicted future calls, used conservatively.

Eviction (:class:`PBKVEviction`), exactly: when cached blocks are freed at
time ``now`` by a finishing call, all of them score

    score = now - c * wait

where ``wait`` is the predicted wait until the session's next call
(``cachewise.predicted_wait``: the predictor's expected idle time after the
call's tool category, or ``END_HORIZON_S`` when the session is predicted to
end) and ``c = predictor.confidence(cat)`` in [0, 1] is how much the
predictor trusts that category. Lower scores are evicted first, ties LRU.
With ``c = 0`` every release scores its release time, which is exactly LRU;
the more confident the prediction, the more a long predicted wait moves the
blocks towards the front of the eviction order. Blocks freed by a preemption
(or outside the engine, with no request) score ``now``: plain LRU.

Scheduling: FCFS (vLLM's).
"""

from __future__ import annotations

from cwsim.block_pool import FreedBlocks
from cwsim.policies.base import EvictionPolicy
from cwsim.policies.cachewise import predicted_wait
from cwsim.predict import call_category


class PBKVEviction(EvictionPolicy):
    """LRU blended with the predicted next-call wait, weighted by the predictor's confidence."""

    name = "pbkv-evict"

    def score(self, freed: FreedBlocks) -> float:
        now, req = freed.now, freed.request
        if req is None or freed.reason == "preempt":
            return now
        pred = self.ctx.predictor
        c = pred.confidence(call_category(req.session.calls[req.turn]))
        if c <= 0.0:
            return now
        return now - c * predicted_wait(pred, req)
