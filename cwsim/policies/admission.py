"""Session-aware admission: admit a new session only while the resident sessions' contexts fit.

Under pressure, vLLM admits every call that fits *now*, and a call of a session whose context
was evicted recomputes it, evicting another idle session's context in turn: the pool thrashes
(Denning's working-set argument for virtual memory, 1968). :class:`WorkingSetAdmission` keeps
a set of *resident* sessions whose contexts fit the pool together, and admits a call of any
other session only when its context fits beside them; otherwise that call waits (its session
runs later, with its prefix cached from then on).

Resident sessions, from what an engine sees online:

- a session with a running request;
- a session whose latest request finished and that is expected back: the tool-call predictor
  says the response's tool category continues (``p_continue >= 0.5``), for up to
  ``idle_factor`` times the expected idle time of that category (at least ``min_idle_s``): a
  horizon learnt from the workload's own tool times, so it scales with them; after that, or
  when the response ends the session (``submit``), it stops being resident.

A resident session's size is its last known context (its running request's block table, or
the blocks its latest request held when it finished); a candidate's is its prompt. A call of
a non-resident session is admitted when the resident sizes plus its own fit in
``(1 - headroom)`` of the pool (room for the residents' growth), or when nothing runs.
Calls of resident sessions go first (then arrival order); eviction is vLLM's LRU, or that of a
policy class this one is combined with (``class X(WorkingSetAdmission, ReuseAwareEviction)``:
``score`` keeps its bookkeeping and returns the other class's score).
"""

from __future__ import annotations

import math

from cwsim.policies.api import Need, Policy, Release, ReleaseReason, RequestView


class WorkingSetAdmission(Policy):
    name = "working-set"
    needs = frozenset({Need.PREDICTOR})

    def __init__(self, headroom: float = 0.2, idle_factor: float = 4.0, min_idle_s: float = 0.0):
        if not 0 <= headroom < 1:
            raise ValueError(f"headroom must be in [0, 1), got {headroom}")
        self.headroom = headroom
        self.idle_factor = idle_factor
        self.min_idle_s = min_idle_s
        #: resident sessions between calls: session -> (blocks of its latest finished context, time it stops
        #: being resident); ``tick`` drops the expired ones before every step, so all of these are resident
        self._idle: dict[str, tuple[int, float]] = {}
        self._next_expiry = math.inf  # the earliest of those times

    # -------------------------------------------------------------- decisions
    def priority(self, req: RequestView):
        return (0 if req.session_id in self._idle else 1, req.number)

    def admit(self, req: RequestView) -> bool:
        running = self.env.running
        if not running:  # an idle engine admits (a held call would wait on nothing)
            return True
        sizes = {s: n for s, (n, _) in self._idle.items()}
        for r in running:
            sizes[r.session_id] = max(r.num_blocks, 1)
        if req.session_id in sizes:
            return True
        need = -(-req.prompt_tokens // self.env.block_size)
        return sum(sizes.values()) + need <= (1.0 - self.headroom) * self.env.usable_blocks

    def score(self, release: Release) -> float:
        req = release.request
        if req is not None and release.reason is ReleaseReason.FINISH:
            pred = self.env.predictor
            cat = req.category
            if pred.p_continue(cat) < 0.5:
                self._idle.pop(req.session_id, None)  # the session is expected to end: not resident
            else:
                idle = pred.expected_idle(cat, 0.0)
                hold = max(self.min_idle_s, self.idle_factor * idle) if math.isfinite(idle) else self.min_idle_s
                until = release.now + hold
                self._idle[req.session_id] = (req.num_blocks, until)
                self._next_expiry = min(self._next_expiry, until)
        return super().score(release)  # the eviction order of the class combined with this one (Policy: LRU)

    def tick(self, now: float) -> None:
        if now < self._next_expiry:  # (most steps: nothing expires)
            return
        self._idle = {s: v for s, v in self._idle.items() if v[1] > now}
        self._next_expiry = min((until for _, until in self._idle.values()), default=math.inf)

    def next_deadline(self) -> float:
        return self._next_expiry
