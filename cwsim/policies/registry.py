"""The policy registry: a name -> (scheduling policy, eviction policy) pair.

``cwsim policies`` lists it. To add a policy, write its two small classes
(or reuse one) and register a :class:`PolicySpec` here; see
``docs/adding-a-policy.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cwsim.policies.base import EvictionPolicy, SchedulingPolicy
from cwsim.policies.eviction import LRU, Belady
from cwsim.policies.scheduling import FCFS, LongestPrefixMatch


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    description: str
    scheduling: Callable[[], SchedulingPolicy]
    eviction: Callable[[], EvictionPolicy]
    #: no capacity limit: the pool grows instead of evicting
    unbounded: bool = False


POLICIES: dict[str, PolicySpec] = {
    spec.name: spec
    for spec in [
        PolicySpec("vllm", "vLLM v1: FCFS scheduling, LRU eviction (unhashed blocks first, tail first)", FCFS, LRU),
        PolicySpec("sglang", "SGLang-style: longest-prefix-match scheduling, LRU eviction", LongestPrefixMatch, LRU),
        PolicySpec("belady", "offline reference: FCFS, evict the block whose next use is farthest (trace future)", FCFS, Belady),
        PolicySpec("infinite", "no capacity limit (never evicts): lower bound of session time", FCFS, LRU, unbounded=True),
    ]
}


def get_policy(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}") from None
