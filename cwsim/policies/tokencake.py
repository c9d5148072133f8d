"""Tokencake (arXiv 2510.18586): a time scheduler that moves an idle agent's KV
cache to CPU memory during its tool calls, and a space scheduler that keeps
GPU memory for the agents needed soonest. Simplified; exactly as implemented:

One object, :class:`Tokencake`.

Time scheduler (uses a CPU tier where the engine has one, ``cwsim.cpu_tier``).
When a call *finishes* and its response makes a tool call, with ``wait =
predictor.predicted_wait(category)`` (the predictor's ``expected_idle`` of the
response's tool category; ``END_HORIZON_S`` when the session is predicted to
end):

- if ``offload_threshold_s < wait < END_HORIZON_S``, the blocks of the
  release that no other session has shared (``Release.shared``: the
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
predicted a next call (``wait < END_HORIZON_S``), it is active
(``Environment.session_active``) and no request of it is running (a request
of it waiting counts: it is the one due now). Its predicted return is
``release time + wait`` (fixed at the release); ``blocks`` is its last call's
block-table length. At each :meth:`tick` the *critical* sessions are the
``k`` candidates with the earliest predicted return (ties: the order in which
the engine first saw the sessions), ``k = floor(reserve_share * usable GPU blocks /
mean blocks over the candidates)``. Expressed two ways:

- eviction: a release by a critical session scores ``CRITICAL`` (evicted
  after every other free cached block), any other release 0 (LRU). When a
  session enters or leaves the critical set, its tracked releases (every
  release with its request since its previous finish, including prefetch
  releases) are moved to the new score at their original place in the LRU
  order (``Environment.rescore``); blocks reused, re-released or evicted
  since are skipped. Blocks released by a session no longer active lose the
  mark;
- scheduling: waiting requests of critical
  sessions are admitted first, then the others, each class in queue order;
  the preemption victim is vLLM's (the last admitted).

The critical set changes only at ticks, with releases, admissions,
submissions and sessions going idle, never inside a decode jump, so
:meth:`next_deadline` is ``inf``; the tier's own deadlines bound the jumps.

Versus the paper: Tokencake partitions GPU memory into a shared pool and a
reserved pool with hard limits, derives criticality from the agent graph and
uses its own function-call time predictor with a sliding window; here the
reservation is soft (eviction order and admission order), critical means
"predicted back soonest", and the predictor is the per-category
``ToolCallPredictor``. Without a CPU tier only the space scheduler runs.
"""

from __future__ import annotations

import numpy as np

from cwsim.policies.api import Need, Policy, Release, ReleaseReason, RequestView
from cwsim.predict import END_HORIZON_S

#: score of a critical session's release: after every other free cached block
CRITICAL = 1e17


class Tokencake(Policy):
    """Offload during long tool calls, prefetch before the predicted return; critical sessions first."""

    name = "tokencake"
    needs = frozenset({Need.PREDICTOR, Need.CPU_TIER})

    def __init__(self, offload_threshold_s: float = 2.0, reserve_share: float = 0.25, prefetch_margin_s: float = 0.5):
        if offload_threshold_s < 0 or prefetch_margin_s < 0 or not 0.0 <= reserve_share <= 1.0:
            raise ValueError("offload_threshold_s and prefetch_margin_s must be >= 0, reserve_share in [0, 1]")
        self.offload_threshold_s = offload_threshold_s
        self.reserve_share = reserve_share
        self.prefetch_margin_s = prefetch_margin_s
        #: the critical sessions (ids)
        self.critical: set[str] = set()
        self._toolcall: dict[str, tuple[float, int, int]] = {}  # session -> (predicted return, session number, blocks)
        self._releases: dict[str, list[tuple[int, np.ndarray]]] = {}  # session -> tracked releases (seq, blocks)
        self._prefetch: dict = {}  # session -> its pending prefetch
        self._number: dict[str, int] = {}  # session -> the order the engine first saw it in (a total order)
        self.offloads = 0

    # ----------------------------------------------------------- scheduling
    def priority(self, req: RequestView):
        return 0 if req.session_id in self.critical else 1

    # ------------------------------------------------------------- releases
    def score(self, release: Release) -> float:
        req = release.request
        if req is None:
            return 0.0
        env, sid = self.env, req.session_id
        self._number[sid] = req.session_number
        entry = (release.seq, release.blocks.copy())
        if release.reason == ReleaseReason.FINISH:
            tier = env.cpu_tier
            if tier is not None:
                tier.cancel(self._prefetch.pop(sid, None))
            wait = env.predictor.predicted_wait(req.category, key=req.number)
            if wait < END_HORIZON_S:
                self._toolcall[sid] = (release.now + wait, req.session_number, req.num_blocks)
            else:
                self._toolcall.pop(sid, None)
            self._releases[sid] = [e for e in self._releases.get(sid, ()) if env.still_free(*e).any()] + [entry]
            if tier is not None and req.tool_calls and self.offload_threshold_s < wait < END_HORIZON_S:
                self._offload(tier, release, req, wait)
        else:
            self._releases.setdefault(sid, []).append(entry)
        return CRITICAL if sid in self.critical else 0.0

    def _offload(self, tier, release: Release, req: RequestView, wait: float) -> None:
        own = ~release.shared
        n = int(own.sum())
        if n == 0:
            return
        transfer = tier.transfer_time(n)
        start = release.now + wait - transfer - self.prefetch_margin_s
        if start <= release.now + transfer:
            return
        if not tier.offload(release, own):
            return
        self.offloads += 1
        self._prefetch[req.session_id] = tier.prefetch(req, start)

    def _requeue(self, sid: str, score: float) -> None:
        for seq, blocks in self._releases.get(sid, ()):
            self.env.rescore(seq, blocks, score)

    # ---------------------------------------------------------------- time
    def tick(self, now: float) -> None:
        env, toolcall = self.env, self._toolcall
        gone = [s for s in self._releases if not env.session_active(s)]  # every tracked session has releases
        for s in gone:
            toolcall.pop(s, None)
        running = {r.session_id for r in env.running}
        cand = sorted((t, num, s, nb) for s, (t, num, nb) in toolcall.items() if s not in running)
        new: set[str] = set()
        if cand:
            mean = sum(c[3] for c in cand) / len(cand)
            k = int(self.reserve_share * env.usable_blocks / mean) if mean > 0 else len(cand)
            new = {c[2] for c in cand[:k]}
        if new != self.critical:
            number = self._number.__getitem__
            entering = sorted(new - self.critical, key=number)
            leaving = sorted(self.critical - new, key=number)
            self.critical = new
            for s in leaving:
                self._requeue(s, 0.0)
            for s in entering:
                self._requeue(s, CRITICAL)
        for s in gone:
            self._releases.pop(s, None)
            self._prefetch.pop(s, None)
            self._number.pop(s, None)
