"""The two policy interfaces. Policies see requests, sessions, blocks and hints;
never SimPy. The generic loops (the scheduler's admission loop, the block
pool's eviction order) do not know which policy they run.

- A :class:`SchedulingPolicy` has one scoring method, ``priority(req)``: the
  waiting request with the lowest priority is admitted first (ties keep queue
  order, and preempted requests sit at the front of the queue, as in vLLM).
- An :class:`EvictionPolicy` has one scoring method, ``score(freed)``: called
  when cached blocks become free, it returns one score for all of them or one
  per block; the pool evicts the lowest score first, ties least recently
  freed first (so a constant score is vLLM's LRU).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cwsim.block_pool import FreedBlocks
from cwsim.request import Request


@dataclass
class PolicyContext:
    """What policies may consult: the clock, the cache and the workload's metadata."""

    now: float = 0.0
    kv: object = None  # cwsim.kv_cache_manager.KVCacheManager
    workload: object = None  # cwsim.workload.Workload
    predictor: object = None  # cwsim.predict.ToolCallPredictor, for policies that use one
    eviction: object = None  # the bound EvictionPolicy: the engine calls its tick / next_deadline hooks
    cpu_tier: object = None  # cwsim.cpu_tier.CpuTier, when the run has one
    scheduler: object = None  # cwsim.scheduler.Scheduler: its waiting / running requests (read only)


class SchedulingPolicy:
    name = "fcfs"
    #: True when priority() is the same for every request: the queue order stands
    static = True

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx

    def priority(self, req: Request):
        """Sort key of a waiting request (lowest admitted first): a number or a tuple."""
        return 0.0

    def preemption_victim(self, running: list[Request]) -> Request:
        """vLLM FCFS: the request admitted last is preempted first."""
        return running[-1]


class EvictionPolicy:
    name = "lru"

    def bind(self, ctx: PolicyContext) -> None:
        self.ctx = ctx
        ctx.eviction = self

    def tick(self, now: float) -> None:
        """Time hook: the engine calls it once per scheduler iteration, before ``schedule()``.

        A policy whose blocks change rank with time (a pin that expires) moves
        them here (``BlockPool.requeue``).
        """

    def next_deadline(self) -> float:
        """The earliest time at which :meth:`tick` will change the free queue (``inf``: never).

        The engine's decode jumps do not run steps that start at or after it.
        """
        return math.inf

    def score(self, freed: FreedBlocks) -> float | np.ndarray:
        return 0.0
