"""The simulator's side of the policy contract (``cwsim.policies.api``).

:class:`SimEnvironment` builds a policy's views from the simulator's
``Request``, ``SessionState``, ``BlockPool`` and ``Scheduler``, and gives the
generic loops (the scheduler's admission and preemption, the pool's free
queue, the engine's clock) the policy's decisions. It is the only module that
knows both: policies see views, the loops see :class:`SimEnvironment`.
The vLLM plugin (``replay.vllm_plugin``) is the same adapter for vLLM.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cwsim.block_pool import FreedBlocks
from cwsim.free_queue import count_nonzero
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies.api import CpuTierAccess, Environment, Need, Policy, Release, ReleaseReason, RequestView, ToolCall
from cwsim.policies.online import DEFAULT_SESSION_IDLE_S, BlockSharing, SessionActivity, SessionFacts
from cwsim.predict import NO_TOOL, call_category
from cwsim.request import Request

_REASONS = {r.value: r for r in ReleaseReason}


class SimRequestView(RequestView):
    """A simulator ``Request`` as a policy sees it."""

    __slots__ = ("_r", "_sched", "_tools")

    def __init__(self, req: Request, number: int, session_number: int, session_start: float, sched):
        super().__init__(number, req.session.session_id, session_number, session_start, req.turn, req.arrival,
                         req.prompt_len)
        self._r = req
        self._sched = sched
        self._tools: tuple[ToolCall, ...] | None = None

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        r = self._r
        if r.finish < 0:
            return ()
        if self._tools is None:
            self._tools = tuple([ToolCall(t.name, t.category) for t in r.session.calls[r.turn].tools])
        return self._tools

    @property
    def category(self) -> str:  # the same as RequestView's, without building the ToolCall views
        r = self._r
        if r.finish < 0:
            return NO_TOOL
        return call_category(r.session.calls[r.turn])

    @property
    def computed_tokens(self) -> int:
        return self._sched.counters(self._r)[0]

    @property
    def num_blocks(self) -> int:
        return self._r.nblk


class TraceFuture:
    """The trace's future, for an offline reference policy (``Need.FUTURE``): what no engine knows."""

    def __init__(self, workload):
        self.workload = workload

    def next_call(self, req: SimRequestView) -> tuple[float, int] | None:
        """``(gap_s, tokens shared with the next call)`` of the session's next call, or None (the last call)."""
        sess, turn = req._r.session, req._r.turn
        if turn + 1 >= len(sess.calls):
            return None
        call = sess.calls[turn]
        return call.gap_s, call.next_shared_tokens

    def shared_prefix_tokens(self, req: SimRequestView) -> int:
        """Tokens of the session's first prompt that another session's first prompt shares."""
        return req._r.session.shared_prefix_tokens

    @property
    def active_sessions(self) -> int:
        """Sessions started and not ended."""
        return self.workload.active_sessions


class SimCpuTier(CpuTierAccess):
    """The simulator's ``cwsim.cpu_tier.CpuTier`` as a policy drives it."""

    def __init__(self, tier):
        self.tier = tier

    def room(self) -> int:
        return self.tier.room()

    def transfer_time(self, n_blocks: int) -> float:
        return self.tier.transfer_time(n_blocks)

    def offload(self, release: Release, mask: np.ndarray) -> bool:
        return self.tier.offload(release.blocks[mask], release.keys[mask].tolist(), release.now)

    def prefetch(self, req: SimRequestView, start: float):
        r = req._r
        return self.tier.prefetch(r.hashes[: r.num_cached_blocks], start, owner=r)

    def cancel(self, handle) -> None:
        self.tier.cancel(handle)


class SimEnvironment(SessionFacts, Environment):
    """One policy bound to one simulated engine.

    ``policy`` gets ``predictor`` if it needs one, ``future`` (a
    :class:`TraceFuture`) only if it needs the trace's future, and the CPU
    tier ``cpu_tier`` (a ``cwsim.cpu_tier.CpuTier``) where the run has one.
    Call :meth:`attach` with the scheduler before the first step.
    """

    def __init__(self, policy: Policy, kv: KVCacheManager, *, predictor=None, cpu_tier=None,
                 future: TraceFuture | None = None, session_idle_s: float = DEFAULT_SESSION_IDLE_S):
        needs = policy.needs
        if Need.PREDICTOR in needs and predictor is None:
            raise ValueError(f"policy {policy.name!r} needs a tool-call predictor")
        if Need.FUTURE in needs and future is None:
            raise ValueError(f"policy {policy.name!r} needs the trace's future")
        self.policy = policy
        self.kv = kv
        self.pool = pool = kv.pool
        self.block_size = kv.block_size
        self.predictor = predictor if Need.PREDICTOR in needs else None
        #: the engine's tier (the policy drives it through ``cpu_tier``)
        self.tier = cpu_tier
        self.cpu_tier = SimCpuTier(cpu_tier) if cpu_tier is not None else None
        self.future = future if Need.FUTURE in needs else None
        self.scheduler = None
        #: the engine's clock (the engine keeps it current)
        self.now = 0.0
        self.sessions = SessionActivity(session_idle_s)
        self._requests = 0  # requests seen arriving: the next one's number
        # the decisions the generic loops take from the policy (None / True: vLLM's own, skipped)
        self.static = not policy.overrides("priority")
        self.max_queue = policy.max_queue
        self._victim = policy.overrides("preemption_victim")
        self.ticks = policy.overrides("tick")
        #: the policy may hold a waiting request back (``Policy.admit``)
        self.gates = policy.overrides("admit")
        #: the policy decides nothing of its own (vLLM's): no views, no session facts to keep
        self.passive = (self.static and not self._victim and not self.ticks and not self.gates
                        and not policy.overrides("score"))
        if policy.overrides("score"):
            self.sharing = BlockSharing(pool.num_blocks)
            self._last = None
            pool.score_fn = self._score
            pool.on_release = self._on_release
            pool.on_unhash = self.sharing.forget
        else:
            self.sharing = None
            pool.score_fn = None
        policy.bind(self)

    def attach(self, scheduler) -> None:
        self.scheduler = scheduler

    # ------------------------------------------------------- Environment
    @property
    def usable_blocks(self) -> int:
        return self.pool.num_usable_blocks

    def cached_prefix_blocks(self, req: SimRequestView) -> int:
        return len(self.kv.longest_prefix(req._r))

    @property
    def running(self) -> Sequence[SimRequestView]:
        return [r.view for r in self.scheduler.running]

    def still_free(self, seq: int, blocks: np.ndarray) -> np.ndarray:
        return self.pool.in_release(blocks, seq)

    def rescore(self, seq: int, blocks: np.ndarray, score: float) -> None:
        self.pool.queue.rescore(seq, blocks, score)

    # ------------------------------------------- the engine's events
    def on_arrival(self, req: Request) -> None:
        if self.passive:
            return
        number, start = self.sessions.arrive(req.session.session_id, req.arrival)
        req.view = SimRequestView(req, self._requests, number, start, self.scheduler)
        self._requests += 1

    def on_finish(self, req: Request, now: float) -> None:
        if self.passive:
            return
        self.sessions.finish(req.session.session_id, now)
        # its blocks are released: the engine needs the view no more (a policy may keep it), and the
        # request <-> view cycle would leave both to the cycle collector
        req.view = None

    # ------------------------------------------- the loops' decisions
    def priority_key(self, req: Request):
        return self.policy.priority(req.view)

    def admit(self, req: Request) -> bool:
        return self.policy.admit(req.view)

    def preemption_victim(self, running: list[Request]) -> Request:
        if not self._victim:
            return running[-1]
        return self.policy.preemption_victim([r.view for r in running])._r

    def tick(self, now: float) -> None:
        self.now = now  # the time hook runs at this time (the engine has set it too)
        if self.ticks:
            self.policy.tick(now)

    def next_deadline(self) -> float:
        return self.policy.next_deadline() if self.ticks else math.inf

    def _on_release(self, ordered: np.ndarray, refs_after: np.ndarray, hashed: np.ndarray, request) -> None:
        """Every release of blocks (before the freed ones are scored): the sharing facts."""
        pool = self.pool
        if len(pool.ref) > self.sharing.size:
            self.sharing.grow(len(pool.ref))
        if request is None or request.view is None:
            shared = refs_after > 0
        else:
            shared = self.sharing.release(ordered, hashed, refs_after, request.view.session_number)
        if count_nonzero(refs_after) or count_nonzero(hashed) < len(hashed):  # else every block is freed, with a hash
            shared = shared[(refs_after == 0) & hashed]
        self._last = shared

    def _score(self, freed: FreedBlocks):
        req = freed.request
        release = Release(None if req is None else req.view, _REASONS[freed.reason], freed.now, freed.positions,
                          freed.hashes, self._last, freed.blocks, freed.seq)
        return self.policy.score(release)
