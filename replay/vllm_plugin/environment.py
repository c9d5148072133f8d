"""vLLM's side of the policy contract (``cwsim.policies.api``): the views a policy sees, built
from vLLM's ``Request``, scheduler and ``BlockPool``, with the online facts
(``cwsim.policies.online``) fed the same events as in the simulator's adapter
(``cwsim.policy_adapter``).

Request metadata comes with the request: the session is vLLM's ``session_id``
(the request body's field) or ``vllm_xargs.session_id``; ``vllm_xargs`` (vLLM's
``sampling_params.extra_args``, which takes strings, numbers and flat lists of
them) may give ``turn`` and the response's tool calls as two lists of strings,
``tool_names`` and ``tool_categories`` (``cwreplay run`` and the oracle send
them from the trace); a policy sees them only once the response has ended, as
in the simulator. A request without a session is a session of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cwsim.policies.api import Environment, Need, Policy, Release, ReleaseReason, RequestView, ToolCall
from cwsim.policies.online import BlockSharing, SessionActivity, SessionFacts
from replay.tokens import external_hash
from replay.vllm_plugin.config import PluginConfig, engine_policy, import_policy_modules

_EMPTY = np.empty(0, dtype=np.int64)


class VllmRequestView(RequestView):
    """A vLLM ``Request`` as a policy sees it."""

    __slots__ = ("_r", "_env", "_tools", "_blocks_at_release")

    def __init__(self, request, number: int, session_id: str, session_number: int, session_start: float, turn: int,
                 tools: tuple[ToolCall, ...], env):
        super().__init__(number, session_id, session_number, session_start, turn, request.arrival_time,
                         request.num_prompt_tokens)
        self._r = request
        self._env = env
        self._tools = tools
        self._blocks_at_release = -1

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self._tools if self._r.is_finished() else ()

    @property
    def computed_tokens(self) -> int:
        return self._r.num_computed_tokens

    @property
    def num_blocks(self) -> int:
        if self._blocks_at_release >= 0:
            return self._blocks_at_release
        return len(self._env.request_blocks(self._r.request_id))


def request_metadata(request) -> tuple[str, int, tuple[ToolCall, ...]]:
    """``(session id, turn, tool calls)`` from a vLLM request (see the module docstring)."""
    extra = getattr(request.sampling_params, "extra_args", None) or {}
    sid = request.session_id or extra.get("session_id") or request.request_id
    turn = int(extra.get("turn", 0))
    names = extra.get("tool_names") or []
    cats = extra.get("tool_categories") or []
    if isinstance(names, str):  # one tool call
        names, cats = [names], [cats]
    tools = tuple(ToolCall(str(n), str(c)) for n, c in zip(names, cats))
    return str(sid), turn, tools


def build_policy(config: PluginConfig) -> tuple[Policy, object]:
    """The policy and its predictor (or None), or ``ValueError`` saying why the plugin cannot run it."""
    import_policy_modules(config.imports, "--additional-config cachewise.imports:")
    spec = engine_policy(config.policy, config.settings)
    policy = spec.make(**config.settings)
    predictor = None
    if Need.PREDICTOR in spec.needs:
        if not config.predictor_trace:
            raise ValueError(f"policy {spec.name!r} needs a tool-call predictor: give "
                             "--additional-config cachewise.predictor_trace (a trace file to fit it on)")
        from cwsim.predict import ToolCallPredictor
        from traces.reader import load_trace

        predictor = ToolCallPredictor.fit(load_trace(config.predictor_trace), error=config.predictor_error,
                                          seed=config.seed)
    return policy, predictor


class VllmEnvironment(SessionFacts, Environment):
    """One policy bound to one vLLM scheduler (``replay.vllm_plugin.scheduler``)."""

    def __init__(self, scheduler, policy: Policy, predictor, session_idle_s: float):
        from replay.vllm_plugin.block_queue import PolicyBlockQueue

        self.scheduler = scheduler
        self.policy = policy
        kvm = scheduler.kv_cache_manager
        self._coordinator = kvm.coordinator
        pool = kvm.block_pool
        self.block_size = scheduler.block_size
        self.usable_blocks = pool.num_gpu_blocks - 1
        self.predictor = predictor
        self.cpu_tier = None
        self.future = None
        self.sessions = SessionActivity(session_idle_s)
        self.views: dict[str, VllmRequestView] = {}
        self._requests = 0
        self.scores = policy.overrides("score")
        self.sharing = BlockSharing(pool.num_gpu_blocks) if self.scores else None
        self._pending = None
        self.static = not policy.overrides("priority")
        #: the policy may hold a waiting request back (``Policy.admit``)
        self.gates = policy.overrides("admit")
        #: the waiting queue is the policy's (``PolicyWaitingQueue``): it orders it or holds requests back
        self.orders_waiting = not self.static or self.gates
        self.custom_victim = policy.overrides("preemption_victim")
        self.ticks = policy.overrides("tick")
        self.queue = PolicyBlockQueue(pool.blocks, pool.free_block_queue.get_all_free_blocks(), self)
        pool.free_block_queue = self.queue
        policy.bind(self)

    # ------------------------------------------------------- Environment
    @property
    def now(self) -> float:
        return self.scheduler.clock()

    def request_blocks(self, request_id: str) -> list:
        return self._coordinator.get_blocks(request_id)[0]

    def cached_prefix_blocks(self, req: VllmRequestView) -> int:
        r = req._r
        _, tokens, _ = self._coordinator.find_longest_cache_hit(r.block_hashes, r.num_tokens - 1)
        return tokens // self.block_size

    @property
    def running(self) -> Sequence[VllmRequestView]:
        views = self.views
        return [views[r.request_id] for r in self.scheduler.running]

    def still_free(self, seq: int, blocks: np.ndarray) -> np.ndarray:
        return self.queue.queue.in_release(blocks, seq)

    def rescore(self, seq: int, blocks: np.ndarray, score: float) -> None:
        self.queue.queue.rescore(seq, blocks, score)

    # --------------------------------------------------- the scheduler's events
    def on_arrival(self, request) -> None:
        sid, turn, tools = request_metadata(request)
        number, start = self.sessions.arrive(sid, request.arrival_time)
        self.views[request.request_id] = VllmRequestView(request, self._requests, sid, number, start, turn, tools,
                                                         self)
        self._requests += 1

    def on_finish(self, request) -> None:
        view = self.views.pop(request.request_id, None)
        if view is not None:
            self.sessions.finish(view.session_id, self.now)

    def view(self, request) -> VllmRequestView:
        return self.views[request.request_id]

    def tick(self) -> None:
        if self.ticks:
            self.policy.tick(self.now)

    def next_deadline(self) -> float:
        return self.policy.next_deadline() if self.ticks else math.inf

    def before_free(self, request, reason: ReleaseReason) -> None:
        """The scheduler is about to free ``request``'s blocks: the release that the pool's next
        append of cached blocks belongs to, and the sharing facts of its table."""
        blocks = self.request_blocks(request.request_id)
        view = self.views.get(request.request_id)
        if view is not None:
            view._blocks_at_release = len(blocks)
        if not self.scores or not blocks:
            self._pending = (view, reason, None, None, None)
            return
        ordered = blocks[::-1]  # vLLM frees a table tail first
        ids = np.fromiter((b.block_id for b in ordered), dtype=np.int64, count=len(ordered))
        refs_after = np.fromiter((b.ref_cnt - 1 for b in ordered), dtype=np.int64, count=len(ordered))
        hashed = np.fromiter((b.block_hash is not None for b in ordered), dtype=bool, count=len(ordered))
        if view is None:
            shared = refs_after > 0
        else:
            shared = self.sharing.release(ids, hashed, refs_after, view.session_number)
        freed = (refs_after == 0) & hashed
        positions = np.arange(len(ordered) - 1, -1, -1)
        self._pending = (view, reason, ids[freed], positions[freed], shared[freed])

    def after_free(self, request) -> None:
        self._pending = None
        view = self.views.get(request.request_id)
        if view is not None:
            view._blocks_at_release = -1

    def score(self, ids: np.ndarray, blocks: list, seq: int):
        """The score of cached blocks the pool appends to the free queue (0 for a policy that keeps vLLM's)."""
        if not self.scores:
            return 0.0
        pending = self._pending
        # content keys: the 64-bit hashes vLLM's KV events carry (the group id's 4 bytes dropped)
        keys = np.fromiter((external_hash(b.block_hash[:-4]) for b in blocks), dtype=np.uint64,
                           count=len(blocks)).view(np.int64)
        if pending is not None and pending[2] is not None and np.array_equal(pending[2], ids):
            view, reason, _, positions, shared = pending
            self._pending = None
            release = Release(view, reason, self.now, positions, keys, shared, ids, seq)
        else:  # blocks freed outside a request's release
            release = Release(None, ReleaseReason.FREE, self.now, np.arange(len(ids)), keys,
                              np.zeros(len(ids), dtype=bool), ids, seq)
        return self.policy.score(release)
