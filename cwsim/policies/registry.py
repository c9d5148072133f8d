"""The policy registry: a name -> a :class:`PolicySpec` that builds one ``Policy`` object.

``cwsim policies`` lists it. To add a policy, write its class
(``cwsim.policies.api.Policy``) and register a :class:`PolicySpec` here; see
``docs/adding-a-policy.md``. Settings reach a policy's constructor explicitly:
a spec names the settings its class takes (``params``), and
:func:`make_policy` passes those, and only those, from what the engine's
configuration gives (``cwsim run --aging-s``, or the vLLM plugin's
``--additional-config``).
"""

from __future__ import annotations

from dataclasses import dataclass

from cwsim.policies.api import Need, Policy
from cwsim.policies.cachewise import CacheWise, PrefixAwareScheduling, ReuseAwareEviction
from cwsim.policies.admission import WorkingSetAdmission
from cwsim.policies.continuum import Continuum
from cwsim.policies.eviction import LFU, Belady
from cwsim.policies.pbkv import PBKV
from cwsim.policies.scheduling import LongestPrefixMatch
from cwsim.policies.tokencake import Tokencake


@dataclass(frozen=True, slots=True)
class PolicySpec:
    name: str
    description: str
    cls: type[Policy]
    #: the constructor's settings that the configuration may give
    params: tuple[str, ...] = ()
    #: no capacity limit: the pool grows instead of evicting
    unbounded: bool = False
    #: CPU tier size, as a multiple of the GPU pool's usable blocks, when the configuration gives none
    default_cpu_tier: float = 0.0
    #: offloads blocks to the CPU tier (a policy that does not leaves any tier empty)
    offloads: bool = False

    @property
    def needs(self) -> frozenset[Need]:
        return self.cls.needs

    @property
    def needs_predictor(self) -> bool:
        return Need.PREDICTOR in self.cls.needs

    @property
    def runs_in_vllm(self) -> bool:
        """Whether the vLLM plugin can run it (not with an unbounded pool, nor with the trace's future)."""
        return not self.unbounded and Need.FUTURE not in self.cls.needs

    def make(self, **settings) -> Policy:
        """A new policy object, given the settings among ``settings`` that it takes (``params``)."""
        return self.cls(**{k: settings[k] for k in self.params if k in settings})


class _Vllm(Policy):
    """vLLM v1: FCFS admission, last-admitted preemption, LRU eviction."""

    name = "vllm"


class _Infinite(Policy):
    """No capacity limit (the pool grows): FCFS, LRU."""

    name = "infinite"


class _CacheWiseEvict(ReuseAwareEviction):
    name = "cachewise-evict"


class _WorkingSetCacheWise(WorkingSetAdmission, ReuseAwareEviction):
    """Working-set admission with CacheWise's reuse-aware eviction (``score``: the bookkeeping of
    one, the scores of the other)."""

    name = "working-set-evict"


POLICIES: dict[str, PolicySpec] = {
    spec.name: spec
    for spec in [
        PolicySpec("vllm", "vLLM v1: FCFS scheduling, LRU eviction (unhashed blocks first, tail first)", _Vllm),
        PolicySpec("sglang", "SGLang-style: longest-prefix-match scheduling, LRU eviction", LongestPrefixMatch,
                   ("max_queue",)),
        PolicySpec("belady", "offline reference: FCFS, evict the block whose next use is farthest (trace future)",
                   Belady),
        PolicySpec("infinite", "no capacity limit (never evicts): lower bound of session time", _Infinite,
                   unbounded=True),
        PolicySpec("lfu", "FCFS, evict the least frequently used block (ties LRU)", LFU),
        PolicySpec("cachewise", "CacheWise: prefix-aware scheduling with aging + reuse-aware eviction from "
                   "tool-call predictions", CacheWise, ("aging_s",)),
        PolicySpec("cachewise-sched", "CacheWise's prefix-aware scheduling alone (LRU eviction)",
                   PrefixAwareScheduling, ("aging_s",)),
        PolicySpec("cachewise-evict", "CacheWise's reuse-aware eviction alone (FCFS scheduling)", _CacheWiseEvict),
        PolicySpec("continuum", "Continuum: program-level FCFS, a tool call pins its session's blocks for a "
                   "per-tool TTL (q=0.9)", Continuum, ("q",)),
        PolicySpec("pbkv", "PBKV: FCFS, LRU blended with the predicted next-call wait, weighted by predictor "
                   "confidence", PBKV),
        PolicySpec("tokencake", "Tokencake: offload during long tool calls, prefetch before the predicted return "
                   "(CPU tier, default = GPU pool size); critical sessions first and evicted last",
                   Tokencake, ("offload_threshold_s", "reserve_share", "prefetch_margin_s"), default_cpu_tier=1.0,
                   offloads=True),
        PolicySpec("working-set", "session-aware admission: a new session's call waits while the resident "
                   "sessions' contexts fill the pool (no thrashing), LRU eviction", WorkingSetAdmission,
                   ("headroom", "min_idle_s", "idle_factor")),
        PolicySpec("working-set-evict", "working-set admission + CacheWise's reuse-aware eviction",
                   _WorkingSetCacheWise, ("headroom", "min_idle_s", "idle_factor")),
    ]
}


def register_policy(spec: PolicySpec) -> PolicySpec:
    """Add a policy to the registry (a module of the user's that defines one calls this at import);
    a name already registered is refused."""
    if not isinstance(spec, PolicySpec) or not (isinstance(spec.cls, type) and issubclass(spec.cls, Policy)):
        raise TypeError("register_policy takes a PolicySpec whose cls is a cwsim.policies.api.Policy subclass")
    if spec.name in POLICIES:
        raise ValueError(f"a policy named {spec.name!r} is already registered")
    POLICIES[spec.name] = spec
    return spec


def get_policy(name: str) -> PolicySpec:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; available: {', '.join(POLICIES)}") from None


def make_policy(name: str, **settings) -> Policy:
    """The registered policy ``name``, built with the settings it takes from ``settings``."""
    return get_policy(name).make(**settings)
