"""The policy registry (settings reach only the policies that name them), ``Policy.overrides`` and
the adapter's use of it, and the contract's import rule: a policy module imports from ``cwsim``
only the contract (``cwsim.policies.api``) and the predictor (``cwsim.predict``)."""

import ast
import inspect
from pathlib import Path

import pytest

import cwsim.policies
from cwsim.block_pool import BlockPool
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies import POLICIES, Policy, PolicySpec, get_policy, make_policy
from cwsim.policies.api import Need
from cwsim.policies.cachewise import CacheWise, PrefixAwareScheduling, ReuseAwareEviction
from cwsim.policies.continuum import Continuum, ProgramFCFS
from cwsim.policies.eviction import LFU, Belady
from cwsim.policies.pbkv import PBKV
from cwsim.policies.scheduling import LongestPrefixMatch
from cwsim.policies.tokencake import Tokencake
from cwsim.policy_adapter import SimEnvironment, TraceFuture
from cwsim.predict import ToolCallPredictor
from traces.format import Call, Session, ToolCall, Trace

DECISIONS = ("priority", "preemption_victim", "score", "tick", "next_deadline")


# ----------------------------------------------------------------------- registry
def test_every_spec_builds_its_class_and_names_only_constructor_settings():
    assert list(POLICIES) == ["vllm", "sglang", "belady", "infinite", "lfu", "cachewise", "cachewise-sched",
                              "cachewise-evict", "continuum", "pbkv", "tokencake", "working-set",
                              "working-set-evict"]
    for name, spec in POLICIES.items():
        assert spec.name == name and get_policy(name) is spec
        pol = spec.make()
        assert type(pol) is spec.cls and isinstance(pol, Policy) and pol.name == name
        assert spec.make() is not pol  # a new object each time: policies keep state
        ctor = inspect.signature(spec.cls.__init__).parameters
        assert set(spec.params) <= set(ctor), name
        assert spec.needs == spec.cls.needs and spec.needs_predictor == (Need.PREDICTOR in spec.cls.needs)
    assert [n for n, s in POLICIES.items() if s.unbounded] == ["infinite"]
    assert [n for n, s in POLICIES.items() if s.offloads] == ["tokencake"]
    assert [n for n, s in POLICIES.items() if s.needs_predictor] == ["cachewise", "cachewise-evict", "continuum",
                                                                      "pbkv", "tokencake", "working-set",
                                                                      "working-set-evict"]
    assert [n for n, s in POLICIES.items() if s.cls.overrides("admit")] == ["working-set", "working-set-evict"]
    assert [n for n, s in POLICIES.items() if not s.runs_in_vllm] == ["belady", "infinite"]
    assert [n for n, s in POLICIES.items() if Need.FUTURE in s.needs] == ["belady"]


def test_settings_reach_only_the_policies_whose_params_name_them():
    given = dict(aging_s=5, offload_threshold_s=1, q=0.5, max_queue=3, reserve_share=0.5, prefetch_margin_s=0.25)
    cw = make_policy("cachewise", aging_s=5, offload_threshold_s=1)
    assert isinstance(cw, CacheWise) and cw.aging_s == 5
    assert make_policy("cachewise-sched", **given).aging_s == 5
    tc = make_policy("tokencake", **given)
    assert (tc.offload_threshold_s, tc.reserve_share, tc.prefetch_margin_s) == (1, 0.5, 0.25)
    assert make_policy("continuum", **given).q == 0.5
    assert make_policy("sglang", **given).max_queue == 3
    for name in ("vllm", "belady", "infinite", "lfu", "cachewise-evict", "pbkv"):  # they take none
        assert type(make_policy(name, **given)) is POLICIES[name].cls
    # defaults where nothing is given
    assert make_policy("cachewise").aging_s == 30.0 and make_policy("continuum").q == 0.9
    assert make_policy("sglang").max_queue == 128 and make_policy("tokencake").offload_threshold_s == 2.0
    # a setting is checked by the policy that takes it
    with pytest.raises(ValueError, match="aging_s"):
        make_policy("cachewise", aging_s=-1)
    with pytest.raises(ValueError, match="q"):
        make_policy("continuum", q=2.0)
    make_policy("vllm", aging_s=-1)  # not vLLM's setting: never reaches it


def test_a_spec_passes_exactly_its_params():
    got = []

    class Takes(Policy):
        name = "takes"

        def __init__(self, a=1, b=2):
            got.append((a, b))

    spec = PolicySpec("takes", "test", Takes, ("a",))
    spec.make(a=10, b=20, c=30)
    spec.make()
    assert got == [(10, 2), (1, 2)]


def test_unknown_policy():
    with pytest.raises(ValueError, match="unknown policy 'nope'; available: vllm, sglang"):
        get_policy("nope")
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("nope")


# ------------------------------------------------------------------ Policy.overrides
OVERRIDES = {
    Policy: set(),
    LongestPrefixMatch: {"priority"},
    PrefixAwareScheduling: {"priority"},
    ReuseAwareEviction: {"score"},
    CacheWise: {"priority", "score"},
    ProgramFCFS: {"priority", "preemption_victim"},
    Continuum: {"priority", "preemption_victim", "score", "tick", "next_deadline"},
    LFU: {"score"},
    Belady: {"score"},
    PBKV: {"score"},
    Tokencake: {"priority", "score", "tick"},
}


@pytest.mark.parametrize("cls", list(OVERRIDES), ids=lambda c: c.__name__)
def test_overrides_names_the_decisions_a_class_replaces(cls):
    assert {m for m in DECISIONS if cls.overrides(m)} == OVERRIDES[cls]


def test_overrides_sees_inherited_and_super_calling_overrides():
    class Victim(ProgramFCFS):  # inherits ProgramFCFS's priority and preemption_victim
        pass

    class Calls(Policy):
        def score(self, release):
            return super().score(release)

    assert Victim.overrides("priority") and Victim.overrides("preemption_victim") and not Victim.overrides("score")
    assert Calls.overrides("score") and not Calls.overrides("priority")
    assert Calls().overrides("score")  # also on an instance
    assert not POLICIES["vllm"].cls.overrides("score") and not POLICIES["infinite"].cls.overrides("priority")
    assert POLICIES["cachewise-evict"].cls.overrides("score") and not POLICIES["cachewise-evict"].cls.overrides("priority")


def _predictor():
    calls = lambda i: (Call(f"f{i}", 0, (("p", 4),), 1, None, (ToolCall("t", "read"),), gap_s=1.0 + i),
                       Call(f"f{i}", 1, (("p", 4),), 1, None))
    return ToolCallPredictor.fit(Trace([Session(f"f{i}", calls(i)) for i in range(3)], source="fit"), min_samples=1)


@pytest.mark.parametrize("name", list(POLICIES))
def test_the_adapter_skips_the_base_decisions(name):
    """The adapter calls a policy only for the decisions it overrides (vLLM's own otherwise)."""
    pol = make_policy(name)
    pool = BlockPool(8)
    pred = _predictor()
    env = SimEnvironment(pol, KVCacheManager(pool, 4), predictor=pred, future=TraceFuture(None))
    cls = type(pol)
    assert pol.env is env
    assert env.static == (not cls.overrides("priority"))
    assert env.ticks == cls.overrides("tick")
    assert (pool.score_fn is not None) == cls.overrides("score") == (env.sharing is not None)
    assert env.max_queue == pol.max_queue == (128 if name == "sglang" else None)
    # what a policy does not need, it does not get
    assert (env.predictor is pred) == (Need.PREDICTOR in pol.needs)
    assert (env.future is not None) == (Need.FUTURE in pol.needs)
    assert env.cpu_tier is None and env.block_size == 4 and env.usable_blocks == 7


# ------------------------------------------------------------------- import rule
POLICY_DIR = Path(cwsim.policies.__file__).parent
ALLOWED = {"cwsim.policies.api", "cwsim.predict"}
#: the project's own packages, besides cwsim: a policy reaches neither engine's code
PROJECT = {"cwsim", "replay", "recorder", "traces", "vllm"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports (relative imports resolved), with its line."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = "cwsim.policies".split(".")[: 2 - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
                out += [(node.lineno, m) for m in names]
            else:
                out.append((node.lineno, node.module))
                # ``from cwsim import predict`` / ``from cwsim.policies import api``: the submodule
                out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                        if node.module in ("cwsim", "cwsim.policies")]
    return out


def test_policy_modules_import_only_the_contract_and_the_predictor():
    modules = sorted(p.name for p in POLICY_DIR.glob("*.py") if p.name not in ("registry.py", "__init__.py"))
    assert modules == ["admission.py", "api.py", "cachewise.py", "continuum.py", "eviction.py", "online.py", "pbkv.py",
                       "scheduling.py", "tokencake.py"]
    bad = []
    for name in modules:
        for line, mod in _imports(POLICY_DIR / name):
            top = mod.split(".")[0]
            if top not in PROJECT:
                continue
            if mod in ("cwsim", "cwsim.policies"):  # ``from cwsim import x``: judged by x, above
                continue
            if mod not in ALLOWED:
                bad.append(f"{name}:{line}: {mod}")
    assert bad == []


def test_the_import_rule_checker_catches_what_it_should(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import numpy\nfrom cwsim.block_pool import BlockPool\nfrom . import online\n"
                 "from .api import Policy\nfrom cwsim import scheduler\ndef g():\n    import cwsim.request\n")
    assert _imports(f) == [(1, "numpy"), (2, "cwsim.block_pool"), (3, "cwsim.policies.online"),
                           (4, "cwsim.policies.api"), (5, "cwsim"), (5, "cwsim.scheduler"), (7, "cwsim.request")]
