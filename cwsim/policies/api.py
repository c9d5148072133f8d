"""The policy contract: everything a KV-cache policy sees, in either engine, and nothing else.

A policy is one :class:`Policy` object. Two engines run it unchanged: the
simulator (``cwsim.policy_adapter``) and vLLM 0.32 (``replay.vllm_plugin``).
Each builds the views below from its own state; a policy imports nothing from
either, only this module and the predictor (``cwsim.predict``).

What a policy may decide (override):

- ``priority(req)``: the sort key of a waiting request (lowest admitted
  first; ties keep queue order, and preempted requests sit at the front, as in
  vLLM). The queue is sorted once per step, after the running requests are
  scheduled and before any waiting one is admitted; a policy that keeps the
  base ``priority`` leaves the queue order as it is.
- ``preemption_victim(running)``: which running request to preempt when a
  running one cannot get its blocks (vLLM: the last admitted).
- ``score(release)``: the eviction score of cached blocks that become free
  (one number for all, or one per block; lower is evicted first; equal scores
  go least recently freed first, so a constant is vLLM's LRU). Blocks without
  a hash are never scored: they are reused first, as in vLLM.
- ``tick(now)``: a time hook, called before every scheduling step;
  ``next_deadline()``: the earliest time at which ``tick`` will change
  anything (the simulator does not jump its clock past it).
- ``needs``: what the policy cannot run without (:class:`Need`). ``FUTURE``
  (the trace's future, an offline reference) is given by the simulator only;
  the vLLM plugin refuses such a policy.

Its settings are constructor arguments, given explicitly by whoever builds it
(``cwsim.policies.registry.make_policy``).

What a policy sees: :class:`RequestView` (a request), :class:`Release`
(blocks becoming free, with facts known online: which request freed them, why,
which other sessions shared them), and :class:`Environment` (block size,
pool size, the clock, the cache, the sessions, the predictor, a CPU tier
where one exists, and re-scoring of blocks still free).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np

from cwsim.predict import NO_TOOL  # the tool category of a response that calls no tool


class ReleaseReason(str, Enum):
    """Why blocks become free."""

    #: the request finished
    FINISH = "finish"
    #: the request was preempted (it will need its prefix again at once)
    PREEMPT = "preempt"
    #: a CPU-tier prefetch's copy ended (the simulator's CPU tier)
    PREFETCH = "prefetch"
    #: any other release (outside a request's life)
    FREE = "free"


class Need(str, Enum):
    """What a policy needs from its engine."""

    #: a fitted tool-call predictor (``Environment.predictor``)
    PREDICTOR = "predictor"
    #: a CPU KV tier (``Environment.cpu_tier``); without one, the policy runs without offloading
    CPU_TIER = "cpu_tier"
    #: the trace's future (``Environment.future``): an offline reference, simulator only
    FUTURE = "future"


class ToolCall(NamedTuple):
    """One tool call a response makes: the tool's name and its category (``traces`` format)."""

    name: str
    category: str


class RequestView:
    """One request (an LLM call of a session), read only.

    Fixed at arrival: ``number`` (the order in which the engine received
    requests, from 0), ``session_id``, ``session_number`` (the order in which
    the engine first saw the session, from 0), ``session_start`` (the arrival
    of the session's first request), ``turn``, ``arrival`` and
    ``prompt_tokens``. Known once the response has ended: ``tool_calls`` (the
    response's tool calls, in order; empty before). Current:
    ``computed_tokens`` and ``num_blocks`` (the block table's length; at a
    release, the length it had).

    The engines' adapters subclass it; ``tool_calls``, ``computed_tokens``
    and ``num_blocks`` are theirs to provide.
    """

    __slots__ = ("number", "session_id", "session_number", "session_start", "turn", "arrival", "prompt_tokens")

    def __init__(self, number: int, session_id: str, session_number: int, session_start: float, turn: int,
                 arrival: float, prompt_tokens: int):
        self.number = number
        self.session_id = session_id
        self.session_number = session_number
        self.session_start = session_start
        self.turn = turn
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        raise NotImplementedError

    @property
    def computed_tokens(self) -> int:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        raise NotImplementedError

    @property
    def category(self) -> str:
        """The category that predicts what follows the response: its last tool's, or ``NO_TOOL``
        (also before the response has ended)."""
        calls = self.tool_calls
        return calls[-1].category if calls else NO_TOOL

    def __repr__(self) -> str:
        return f"<request {self.number}: session {self.session_id!r} turn {self.turn}>"


@dataclass(slots=True)
class Release:
    """Cached blocks that become free, as the eviction policy sees them.

    Arrays have one entry per block, in queue order (a request frees its
    table tail first, so its last block comes first): ``positions`` in the
    request's block table, ``keys`` their content keys (a block's key names
    its content and whole prefix: the engine's block hash), ``shared``
    whether a request of another session has held the block since its content
    was cached (it hit it, or holds it still), and ``blocks`` the engine's
    block ids. ``seq`` names the release for :meth:`Environment.still_free`
    and :meth:`Environment.rescore`.
    """

    request: RequestView | None
    reason: ReleaseReason
    now: float
    positions: np.ndarray
    keys: np.ndarray
    shared: np.ndarray
    blocks: np.ndarray
    seq: int


class CpuTierAccess:
    """A CPU KV tier behind the GPU pool (the simulator's ``cwsim.cpu_tier``), as a policy drives it."""

    def room(self) -> int:
        """Blocks the tier can still take."""
        raise NotImplementedError

    def transfer_time(self, n_blocks: int) -> float:
        """Seconds to move ``n_blocks`` blocks one way."""
        raise NotImplementedError

    def offload(self, release: Release, mask: np.ndarray) -> bool:
        """Copy the release's blocks selected by ``mask`` to the tier; False when refused (no room)."""
        raise NotImplementedError

    def prefetch(self, req: RequestView, start: float):
        """Bring ``req``'s cached prefix back to the GPU from ``start`` on; a handle for :meth:`cancel`."""
        raise NotImplementedError

    def cancel(self, handle) -> None:
        """Drop a prefetch that has not started (``None``: nothing)."""
        raise NotImplementedError


class Environment:
    """What a policy may consult and do, besides its own state.

    - ``block_size``, ``usable_blocks`` (the pool's blocks, the null block
      left out), ``now`` (the engine's clock, seconds);
    - ``cached_prefix_blocks(req)``: how many leading blocks of a waiting
      request's prompt are cached now (a lookup: nothing is touched);
    - ``running``: the running requests, in running order;
    - ``active_sessions`` and ``session_active(session_id)``: a session is
      active while a request of it is in the engine, and for
      ``session_idle_s`` seconds after its latest request finished (an
      engine does not see a session end: an agent that stays away longer
      counts as gone until it calls again);
    - ``predictor`` (``cwsim.predict.ToolCallPredictor``) when the policy
      needs one, ``cpu_tier`` (:class:`CpuTierAccess`) where one exists,
      ``future`` only for a policy that needs the trace's future;
    - ``still_free(seq, blocks)`` and ``rescore(seq, blocks, score)``: which
      of a release's blocks are still free in it (not reused, evicted or
      moved), and moving those to another score at the release's place in
      the LRU order (a pin that expires).
    """

    block_size: int
    usable_blocks: int
    predictor = None
    cpu_tier: CpuTierAccess | None = None
    future = None

    #: the engine's clock, seconds (an adapter may make it a property)
    now: float = 0.0

    def cached_prefix_blocks(self, req: RequestView) -> int:
        raise NotImplementedError

    @property
    def running(self) -> Sequence[RequestView]:
        raise NotImplementedError

    @property
    def active_sessions(self) -> int:
        raise NotImplementedError

    def session_active(self, session_id: str) -> bool:
        raise NotImplementedError

    def still_free(self, seq: int, blocks: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def rescore(self, seq: int, blocks: np.ndarray, score: float) -> None:
        raise NotImplementedError


class Policy:
    """A KV-cache policy: vLLM's own (FCFS admission, last-admitted preemption, LRU eviction)
    until a subclass overrides a decision. See the module docstring for the contract."""

    name = "vllm"
    #: what the policy cannot run without
    needs: frozenset[Need] = frozenset()
    #: sort the waiting queue only while it holds at most this many requests (None: any length);
    #: a longer queue keeps its order (SGLang's guard against sorting a long queue every step)
    max_queue: int | None = None

    def bind(self, env: Environment) -> None:
        """Called once by the engine's adapter before the first step."""
        self.env = env

    def priority(self, req: RequestView):
        """Sort key of a waiting request (lowest admitted first): a number or a tuple."""
        return 0

    def admit(self, req: RequestView) -> bool:
        """Whether the waiting request ``req``, next in the policy's order, may be admitted now.
        False stops this step's admissions there, as a request that cannot get its blocks does.
        It must change no state (an engine may ask again), and its answer may change only at an
        engine event (an arrival, a finish, a preemption, a release) or at :meth:`next_deadline`.
        Base: True (vLLM admits whatever fits). Both engines run it with vLLM's plain scheduler;
        with async scheduling, both refuse a policy that overrides it."""
        return True

    def preemption_victim(self, running: Sequence[RequestView]) -> RequestView:
        """vLLM FCFS: the request admitted last is preempted first."""
        return running[-1]

    def score(self, release: Release) -> float | np.ndarray:
        """Eviction score of the released cached blocks (lower: evicted sooner)."""
        return 0.0

    def tick(self, now: float) -> None:
        """Time hook: called before each scheduling step."""

    def next_deadline(self) -> float:
        """The earliest time at which :meth:`tick` will change anything (``inf``: never)."""
        return math.inf

    # ------------------------------------------------- for the adapters
    @classmethod
    def overrides(cls, method: str) -> bool:
        """Whether the policy replaces the base decision ``method`` (the adapters skip the base ones)."""
        return getattr(cls, method) is not getattr(Policy, method)
