"""vLLM's scheduler with a project policy installed (``--scheduler-cls replay.vllm_plugin.PolicyScheduler``).

:class:`PolicyScheduler` builds vLLM's ``Scheduler``, or its ``AsyncScheduler``
when the engine runs async scheduling (a GPU's default; vLLM's CPU platform
forces it off), each with :class:`_PolicyMixin`. What the mixin changes, and
nothing else:

- the waiting queue (:class:`PolicyWaitingQueue`, vLLM's FCFS queue) is
  sorted by the policy's ``priority`` (stable) the first time the waiting
  phase of a step looks at it, i.e. after the running requests are scheduled,
  as in the simulator; a policy that keeps the base priority leaves it alone;
- admission stops at a request the policy holds back (``Policy.admit``): the
  waiting loop's test of the queue (``if not request_queue``, its only test of
  the queue's truth; vLLM counts requests with ``len``) finds it empty then.
  While every waiting request is held and nothing runs, vLLM's engine core
  keeps stepping (it has requests), so ``tick`` sees the policy's deadlines
  pass; a policy that holds calls back is refused under async scheduling, as
  in the simulator, whose async model does not have it;
- the preemption victim: vLLM's ``priority`` branch of ``schedule()`` (which
  handles a victim anywhere in the running list) is switched on, and each
  request's ``priority`` reads 1 for the policy's victim, 0 for the others;
  a policy that keeps the base victim leaves vLLM's FCFS branch;
- the pool's free queue is replaced (``replay.vllm_plugin.block_queue``), and
  every release of a request's blocks is announced to it first
  (``_free_request_blocks``), with its reason (finish or preempt);
- ``reset_prefix_cache`` (vLLM's, then the policy started again from its
  config on the free blocks in a fresh pool's order: as on a fresh server);
- ``tick`` before every step; the clock (``clock``, default ``time.time``, the
  clock of vLLM's ``arrival_time``) may be replaced by whoever drives the
  engine (the oracle counts steps).
"""

from __future__ import annotations

import time
from collections import deque

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import FCFSRequestQueue, SchedulingPolicy
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from vllm.logger import init_logger

from cwsim.policies.api import ReleaseReason
from cwsim.steptime import prefill_attn_pairs
from replay.vllm_plugin.config import PluginConfig
from replay.vllm_plugin.environment import VllmEnvironment, build_policy


logger = init_logger("vllm.cachewise_plugin")  # under "vllm": vLLM's log handlers show it


class PolicyWaitingQueue(FCFSRequestQueue):
    """vLLM's FCFS waiting queue, admitted from in the policy's order.

    The first time a step's waiting phase looks at the queue, the policy's order
    is taken (a stable sort: ties keep queue order); admissions pop from it. The
    queue's own order is left as it was (the simulator's too), so the next step
    sorts the same base order. Any other change to the queue takes a new order.
    """

    def __init__(self, env: VllmEnvironment, requests=()):
        super().__init__(requests)
        self._env = env
        self._order: deque | None = None
        self._sorted = True

    def new_step(self) -> None:
        self._sorted = False

    def _sort(self) -> None:
        self._sorted = True
        self._order = None
        env = self._env
        mq = env.policy.max_queue
        if env.static or len(self) < 2 or (mq is not None and len(self) > mq):
            return
        priority, view = env.policy.priority, env.view
        self._order = deque(sorted(self, key=lambda r: priority(view(r))))

    def __bool__(self) -> bool:
        """Whether admission may go on: a request waits and the policy admits the one next in its order."""
        if not len(self):
            return False
        env = self._env
        return not env.gates or env.policy.admit(env.view(self.peek_request()))

    def peek_request(self) -> Request:
        if not self._sorted:
            self._sort()
        if self._order:
            return self._order[0]
        if not len(self):  # (not ``not self``: that asks the policy)
            raise IndexError("peek from an empty queue")
        return self[0]

    def pop_request(self) -> Request:
        if not self._sorted:
            self._sort()
        if not self._order:
            return super().pop_request()
        req = self._order.popleft()
        for i, r in enumerate(self):
            if r is req:
                del self[i]
                return req
        raise AssertionError("a request in the policy's order left the queue")

    def _changed(self) -> None:
        self._sorted = False

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self._changed()

    def prepend_request(self, request: Request) -> None:
        super().prepend_request(request)
        self._changed()

    def prepend_requests(self, requests) -> None:
        super().prepend_requests(requests)
        self._changed()

    def remove_request(self, request: Request) -> None:
        super().remove_request(request)
        self._changed()

    def remove_requests(self, requests) -> None:
        super().remove_requests(requests)
        self._changed()


class _VictimKey:
    """``request.priority`` for vLLM's priority-preemption branch: 1 for the policy's victim."""

    def __get__(self, request, owner=None):
        if request is None:
            return self
        sched = request._cw_sched
        running = sched.running
        key = tuple(map(id, running))
        if sched._cw_victim_key != key:
            env = sched.cw
            sched._cw_victim_key = key
            sched._cw_victim = env.policy.preemption_victim([env.view(r) for r in running])._r
        return 1 if sched._cw_victim is request else 0

    def __set__(self, request, value) -> None:
        request.__dict__["_cw_priority"] = value


class StepLog:
    """The scheduler's steps as ``cwsim run --step-log`` writes the simulator's (``cwsim.runner.STEP_FIELDS``):
    per step that schedules tokens, when its scheduling began and when its output came back (wall clock,
    ``time.time()``), its prefill tokens and attention pairs, its decoding sequences and their context,
    and the running and waiting requests once it was scheduled; then one column the simulator has not,
    ``schedule_s``: the time the scheduling itself took (vLLM's scheduler and the policy's hooks, on the
    step's critical path). A scheduled chunk is prefill while it computes tokens before the request's
    last (a recomputation after a preemption too), as cwsim counts it. Rows are written as steps
    finish, a line at a time."""

    def __init__(self, path: str):
        import csv

        from cwsim.runner import STEP_FIELDS

        self._file = open(path, "w", newline="", buffering=1)
        self._writer = csv.writer(self._file)
        self._writer.writerow([*STEP_FIELDS, "schedule_s"])
        self._pending: dict[int, list] = {}

    def scheduled(self, t: float, schedule_s: float, out, requests: dict, running: int, waiting: int) -> None:
        if not out.total_num_scheduled_tokens:
            return
        prefill, pairs, seqs, ctx = 0, 0, 0, 0
        for rid, n in out.num_scheduled_tokens.items():
            req = requests[rid]
            before = req.num_computed_tokens - n  # (vLLM has counted the step's tokens as computed)
            if before < req.num_tokens - 1:
                prefill += n
                pairs += prefill_attn_pairs(n, before)
            else:
                seqs += 1
                ctx += before
        self._pending[id(out)] = [t, None, 1, prefill, pairs, seqs, ctx, running, waiting, schedule_s]

    def ran(self, out, t: float) -> None:
        row = self._pending.pop(id(out), None)
        if row is not None:
            row[1] = t
            self._writer.writerow(row)


class _PolicyRequest(Request):
    """A vLLM request whose ``priority`` names the policy's preemption victim (set on arrival)."""

    priority = _VictimKey()


class _PolicyMixin:
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        config = PluginConfig.from_additional_config(self.vllm_config.additional_config)
        self._cw_config = config
        policy, predictor = build_policy(config)
        self.clock = time.time
        self._cw_preempting = False
        self._cw_victim_key = None
        self._cw_victim = None
        self.cw = self._cw_environment(policy, predictor, config.session_idle_s)
        if self.cw.orders_waiting:
            self.waiting = PolicyWaitingQueue(self.cw, self.waiting)
        if self.cw.custom_victim:
            self.policy = SchedulingPolicy.PRIORITY  # vLLM's branch that preempts anywhere in the running list
        self._cw_steps = StepLog(config.step_log) if config.step_log else None
        logger.info("cachewise policy plugin: %s (%s) installed in vLLM's %s", policy.name, type(policy).__name__,
                    type(self).__mro__[2].__name__)

    def install(self, policy, predictor=None, session_idle_s: float | None = None, *,
                config: PluginConfig | None = None) -> None:
        """Put another policy in place (before the first request): for tests and in-process engines.
        ``config``: what a prefix-cache reset builds the policy again from (None: it binds the same objects
        to a fresh environment)."""
        if self.requests:
            raise RuntimeError("install a policy before the first request")
        idle = self.cw.sessions.idle_s if session_idle_s is None else session_idle_s
        self._cw_config = config
        self.cw = self._cw_environment(policy, predictor, idle)
        self.waiting = PolicyWaitingQueue(self.cw) if self.cw.orders_waiting else FCFSRequestQueue()
        self.policy = SchedulingPolicy.PRIORITY if self.cw.custom_victim else SchedulingPolicy.FCFS

    def _cw_environment(self, policy, predictor, session_idle_s: float) -> VllmEnvironment:
        if isinstance(self, AsyncScheduler) and policy.overrides("admit"):
            raise ValueError(f"policy {policy.name!r} holds calls back (Policy.admit), which the plugin runs with "
                             "vLLM's plain scheduler only: start vLLM with --no-async-scheduling")
        return VllmEnvironment(self, policy, predictor, session_idle_s)

    def reset_prefix_cache(self, *args, **kwargs) -> bool:
        """vLLM's reset (``POST /reset_prefix_cache``, which ``cwreplay run``'s warm-up sends), then the policy
        started again as on a fresh server: vLLM drops every hash but leaves the free queue as it was, which for
        vLLM's own queue changes nothing that matters (no block holds anything), while the policy's queue would
        keep the old blocks' scores and its sessions the requests it saw. So the free blocks are put back in a
        fresh pool's order (by id), and a new policy, predictor and environment are built from the config."""
        ok = super().reset_prefix_cache(*args, **kwargs)
        if ok:
            if self.requests:  # waiting requests hold no block, but a policy's state is theirs too
                logger.warning("cachewise policy plugin: prefix cache reset with %d request(s) in the scheduler: "
                               "the policy keeps its state", len(self.requests))
            else:
                self._cw_restart()
        return ok

    def _cw_restart(self) -> None:
        from vllm.v1.core.kv_cache_utils import FreeKVCacheBlockQueue

        pool = self.kv_cache_manager.block_pool
        free = sorted(pool.free_block_queue.get_all_free_blocks(), key=lambda b: b.block_id)
        pool.free_block_queue = FreeKVCacheBlockQueue(free)
        config = self._cw_config
        policy, predictor = build_policy(config) if config is not None else (self.cw.policy, self.cw.predictor)
        self.install(policy, predictor, self.cw.sessions.idle_s, config=config)
        logger.info("cachewise policy plugin: prefix cache reset; %s started again on %d free blocks",
                    policy.name, len(free))

    def schedule(self, *args, **kwargs):
        log = self._cw_steps
        t = time.time() if log is not None else 0.0
        self.cw.tick()
        if isinstance(self.waiting, PolicyWaitingQueue):
            self.waiting.new_step()
        out = super().schedule(*args, **kwargs)
        if log is not None:
            log.scheduled(t, time.time() - t, out, self.requests, len(self.running), len(self.waiting))
        return out

    def update_from_output(self, scheduler_output, *args, **kwargs):
        if self._cw_steps is not None:
            self._cw_steps.ran(scheduler_output, time.time())
        return super().update_from_output(scheduler_output, *args, **kwargs)

    def add_request(self, request: Request) -> None:
        new = request.request_id not in self.requests
        if new and self.cw.custom_victim:
            request.__class__ = _PolicyRequest
            request._cw_sched = self
        super().add_request(request)
        if new:
            self.cw.on_arrival(request)

    def _preempt_request(self, request: Request, *args, **kwargs) -> None:
        self._cw_preempting = True
        try:
            super()._preempt_request(request, *args, **kwargs)
        finally:
            self._cw_preempting = False

    def _free_request_blocks(self, request: Request) -> None:
        self.cw.before_free(request, ReleaseReason.PREEMPT if self._cw_preempting else ReleaseReason.FINISH)
        try:
            super()._free_request_blocks(request)
        finally:
            self.cw.after_free(request)

    def _free_request(self, request: Request, *args, **kwargs):
        out = super()._free_request(request, *args, **kwargs)
        self.cw.on_finish(request)
        return out


class SyncPolicyScheduler(_PolicyMixin, Scheduler):
    """vLLM's ``Scheduler`` with the policy."""


class AsyncPolicyScheduler(_PolicyMixin, AsyncScheduler):
    """vLLM's ``AsyncScheduler`` with the policy."""


class PolicyScheduler(SyncPolicyScheduler):
    """The class to give ``--scheduler-cls``: an :class:`AsyncPolicyScheduler` when the engine runs
    async scheduling, else a :class:`SyncPolicyScheduler`."""

    def __new__(cls, *args, **kwargs):
        vllm_config = kwargs.get("vllm_config", args[0] if args else None)
        if vllm_config is not None and vllm_config.scheduler_config.async_scheduling:
            obj = object.__new__(AsyncPolicyScheduler)
            obj.__init__(*args, **kwargs)
            return obj
        return object.__new__(cls)
