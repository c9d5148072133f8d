"""The policy registry: a name -> (scheduling policy, eviction policy) pair.

``cwsim policies`` lists it. To add a policy, write its two small classes
(or reuse one) and register a :class:`PolicySpec` here; see
``docs/adding-a-policy.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cwsim.policies.base import EvictionPolicy, SchedulingPolicy
from cwsim.policies.cachewise import PrefixAwareScheduling, ReuseAwareEviction
from cwsim.policies.continuum import ContinuumEviction, ProgramFCFS
from cwsim.policies.eviction import LFU, LRU, Belady
from cwsim.policies.pbkv import PBKVEviction
from cwsim.policies.scheduling import FCFS, LongestPrefixMatch
from cwsim.policies.tokencake import TokencakeEviction, TokencakeScheduling


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    description: str
    scheduling: Callable[[], SchedulingPolicy]
    eviction: Callable[[], EvictionPolicy]
    #: no capacity limit: the pool grows instead of evicting
    unbounded: bool = False
    #: uses the tool-call predictor (fitted by the runner)
    needs_predictor: bool = False
    #: CPU tier size, as a multiple of the GPU pool's usable blocks, when the configuration gives none
    default_cpu_tier: float = 0.0
    #: offloads blocks to the CPU tier (a policy that does not leaves any tier empty)
    offloads: bool = False


POLICIES: dict[str, PolicySpec] = {
    spec.name: spec
    for spec in [
        PolicySpec("vllm", "vLLM v1: FCFS scheduling, LRU eviction (unhashed blocks first, tail first)", FCFS, LRU),
        PolicySpec("sglang", "SGLang-style: longest-prefix-match scheduling, LRU eviction", LongestPrefixMatch, LRU),
        PolicySpec("belady", "offline reference: FCFS, evict the block whose next use is farthest (trace future)", FCFS, Belady),
        PolicySpec("infinite", "no capacity limit (never evicts): lower bound of session time", FCFS, LRU, unbounded=True),
        PolicySpec("lfu", "FCFS, evict the least frequently used block (ties LRU)", FCFS, LFU),
        PolicySpec("cachewise", "CacheWise: prefix-aware scheduling with aging + reuse-aware eviction from tool-call predictions",
                   PrefixAwareScheduling, ReuseAwareEviction, needs_predictor=True),
        PolicySpec("cachewise-sched", "CacheWise's prefix-aware scheduling alone (LRU eviction)", PrefixAwareScheduling, LRU),
        PolicySpec("cachewise-evict", "CacheWise's reuse-aware eviction alone (FCFS scheduling)", FCFS, ReuseAwareEviction,
                   needs_predictor=True),
        PolicySpec("continuum", "Continuum: program-level FCFS, a tool call pins its session's blocks for a per-tool TTL (q=0.9)",
                   ProgramFCFS, ContinuumEviction, needs_predictor=True),
        PolicySpec("pbkv", "PBKV: FCFS, LRU blended with the predicted next-call wait, weighted by predictor confidence",
                   FCFS, PBKVEviction, needs_predictor=True),
        PolicySpec("tokencake", "Tokencake: offload during long tool calls, prefetch before the predicted return "
                   "(CPU tier, default = GPU pool size); critical sessions first and evicted last",
                   TokencakeScheduling, TokencakeEviction, needs_predictor=True, default_cpu_tier=1.0,
                   offloads=True),
    ]
}


def get_policy(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}") from None
