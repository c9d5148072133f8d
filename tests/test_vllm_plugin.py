"""The same policy objects inside vLLM 0.32 (``replay.vllm_plugin``) and in ``cwsim``: exactly equal.

Each policy that can run in an engine (all but ``belady``, which reads the
trace's future, and ``infinite``, an unbounded pool; ``working-set`` holds calls
back, which the plugin does in vLLM's waiting loop) runs inside vLLM's
in-process engine through the plugin (``OracleConfig(policy=...)``) and in the
simulator, on two pressured workloads whose tool calls predict their gaps
(tests/oracle_workloads.py); every call's arrival, first-token and finish
step, cached tokens and preemptions, and the evicted block hashes in order,
must be EXACTLY equal. Each policy must also change vLLM's own eviction order
on at least one of them, so the equality is not that of two LRUs.

Needs vLLM (``pip install -e '.[vllm]'``; CI installs it).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest

from cwsim.policies.api import Policy
from tests.oracle_workloads import assert_exact, workloads

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install -e '.[vllm]'); CI installs it"),
]

WORKLOADS = workloads()
POLICY_WORKLOADS = ("tool-mix-tight", "tool-mix-roomy")
ENGINE_POLICIES = ("vllm", "sglang", "lfu", "cachewise", "cachewise-sched", "cachewise-evict", "continuum", "pbkv",
                   "tokencake", "working-set", "working-set-evict")
DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from replay.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama"))


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """(workload, policy) -> the comparison, run once per module."""
    from replay.compare import compare, format_report

    root = tmp_path_factory.mktemp("plugin")
    cache: dict = {}

    def get(name: str, policy: str, engine: str = "emulated"):
        if (name, policy, engine) not in cache:
            make, oc = WORKLOADS[name]
            out = root / f"{name}-{policy}-{engine}"
            c = compare(make(), replace(oc, model=tiny_model, policy=policy, engine=engine), out)
            assert c.oracle["config"]["engine"] == engine
            cache[name, policy, engine] = (c, format_report(c), out)
        return cache[name, policy, engine]

    return get




def _evicted(out: Path) -> list[str]:
    with open(out / "oracle" / "evictions.csv", newline="") as f:
        return [row["block_hash"] for row in csv.DictReader(f)]


def _eviction_steps(out: Path) -> list[str]:
    with open(out / "oracle" / "evictions.csv", newline="") as f:
        return [row["step"] for row in csv.DictReader(f)]


#: (policy, workload) on which the policy evicts in another order than vLLM's own (measured; every policy
#: but vllm is on at least one: the equality below is not that of two LRUs)
ORDER_CHANGED = {
    "tool-mix-tight": {"sglang", "lfu", "cachewise", "cachewise-sched", "cachewise-evict", "continuum", "pbkv",
                       "working-set", "working-set-evict"},
    "tool-mix-roomy": {"lfu", "cachewise", "cachewise-evict", "pbkv", "tokencake", "working-set", "working-set-evict"},
}


@pytest.mark.parametrize("name", POLICY_WORKLOADS)
@pytest.mark.parametrize("policy", ENGINE_POLICIES)
def test_policy_inside_vllm_equals_the_simulator(policy, name, runs):
    """On vLLM's engine core with the model's outputs emulated (``engine="emulated"``: the scheduler, KV
    cache manager and plugin are vLLM's and ours, only the forward pass is skipped; 4-5x faster, so the
    whole grid fits CI). The real model runs the headline policies below."""
    c, report, out = runs(name, policy)
    assert_exact(c, report)
    assert c.oracle["evicted_blocks"] > 0  # pressured
    if policy != "vllm":
        changed = _evicted(out) != _evicted(runs(name, "vllm")[2])
        assert changed == (policy in ORDER_CHANGED[name]), f"{policy} on {name}: order changed {changed}"


@pytest.mark.parametrize("policy", ["cachewise", "working-set"])
def test_policy_inside_vllm_with_the_real_model_equals_the_simulator_and_the_emulation(policy, runs):
    """The real model's forward pass under the plugin: exactly the simulator, and exactly the emulated
    run's calls and eviction steps (so the grid above, emulated, stands for the real engine). The
    hashes of blocks holding answers differ: the emulation answers other tokens."""
    c, report, out = runs("tool-mix-tight", policy, "model")
    assert_exact(c, report)
    assert c.oracle["evicted_blocks"] > 0
    emulated = runs("tool-mix-tight", policy)[2]
    assert _eviction_steps(out) == _eviction_steps(emulated)
    assert (out / "oracle" / "requests.csv").read_text() == (emulated / "oracle" / "requests.csv").read_text()


def test_every_policy_changes_vllms_order_somewhere():
    assert set().union(*ORDER_CHANGED.values()) == set(ENGINE_POLICIES) - {"vllm"}


def test_every_engine_policy_is_covered():
    from cwsim.policies.registry import POLICIES

    assert {n for n, s in POLICIES.items() if s.runs_in_vllm} == set(ENGINE_POLICIES)
    # the trace's future, an unbounded pool
    assert {n for n, s in POLICIES.items() if not s.runs_in_vllm} == {"belady", "infinite"}


# ------------------------------------------------------------- the documented example
def _doc_example() -> str:
    text = (DOCS / "adding-a-policy.md").read_text()
    blocks = re.findall(r"```python\n(# my_policies\.py\n.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/adding-a-policy.md must hold one ```python block starting '# my_policies.py'"
    return blocks[0]


@pytest.fixture
def evict_finished_first():
    """The policy of docs/adding-a-policy.md, registered from the doc's own code (and removed after)."""
    from cwsim.policies.registry import POLICIES

    namespace: dict = {}
    exec(compile(_doc_example(), "docs/adding-a-policy.md", "exec"), namespace)  # noqa: S102 - our own docs
    try:
        yield namespace["EvictFinishedFirst"]
    finally:
        POLICIES.pop("evict-finished-first", None)


def test_the_documented_example_runs_in_both_engines_and_they_agree(evict_finished_first, tiny_model, tmp_path, runs):
    from replay.compare import compare, format_report

    make, oc = WORKLOADS["tool-mix-tight"]
    c = compare(make(), replace(oc, model=tiny_model, policy="evict-finished-first"), tmp_path / "example")
    assert_exact(c, format_report(c))
    assert _evicted(tmp_path / "example") != _evicted(runs("tool-mix-tight", "vllm")[2])


# ------------------------------------------------------------------- what it refuses
def test_policies_an_engine_cannot_run_are_refused_with_the_reason():
    from replay.vllm_plugin.config import PluginConfig
    from replay.vllm_plugin.environment import build_policy

    with pytest.raises(ValueError, match="trace's future"):
        build_policy(PluginConfig(policy="belady"))
    with pytest.raises(ValueError, match="unbounded"):
        build_policy(PluginConfig(policy="infinite"))
    with pytest.raises(ValueError, match="predictor_trace"):
        build_policy(PluginConfig(policy="cachewise"))
    with pytest.raises(ValueError, match=r"takes the settings \['aging_s'\], not \['q'\]"):
        build_policy(PluginConfig(policy="cachewise-sched", settings={"q": 1}))
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        build_policy(PluginConfig(policy="nope"))
    with pytest.raises(ValueError, match="unknown keys \\['polcy'\\]"):
        PluginConfig.from_additional_config({"cachewise": {"polcy": "lfu"}})
    with pytest.raises(ValueError, match="cachewise.imports: no_such_module_xyz: No module named"):
        build_policy(PluginConfig(policy="lfu", imports=["no_such_module_xyz"]))
    policy, predictor = build_policy(PluginConfig(policy="cachewise-sched", settings={"aging_s": 5.0}))
    assert policy.aging_s == 5.0 and predictor is None
    assert PluginConfig.from_additional_config({}) == PluginConfig()  # no settings: vLLM's own policy


def test_a_policy_reaches_the_plugin_through_additional_config(tmp_path):
    """The server path: --scheduler-cls and --additional-config, with the predictor fitted on a trace file."""
    from replay.server import ServerConfig, policy_args
    from traces.reader import load_trace

    from tests.oracle_workloads import tool_mix_sessions
    from traces.reader import write_trace

    trace = tmp_path / "t.jsonl"
    write_trace(trace, [c for s in tool_mix_sessions(4, 3, seed=1) for c in s.calls])
    cfg = ServerConfig(kv_blocks=50, policy="cachewise", policy_settings=(("aging_s", 12.5),),
                       predictor_trace=str(trace))
    args = policy_args(cfg)
    assert args[:2] == ["--scheduler-cls", "replay.vllm_plugin.PolicyScheduler"]
    import json

    from replay.vllm_plugin.config import PluginConfig
    from replay.vllm_plugin.environment import build_policy

    plugin = PluginConfig.from_additional_config(json.loads(args[3]))
    policy, predictor = build_policy(plugin)
    assert policy.aging_s == 12.5 and predictor is not None
    assert len(load_trace(trace).sessions) == 4
    assert len(args) == 4  # async scheduling left as vLLM decides
    held = policy_args(ServerConfig(kv_blocks=50, policy="working-set", predictor_trace=str(trace)))
    assert held[-1] == "--no-async-scheduling"  # a policy that holds calls back runs with the plain scheduler
    with pytest.raises(ValueError, match="--predictor-trace"):
        ServerConfig(kv_blocks=50, policy="pbkv")
    with pytest.raises(ValueError, match="--policy belady: runs in the simulator only"):
        ServerConfig(kv_blocks=50, policy="belady")


def test_the_plugins_step_log_is_the_simulators_step_by_step(tiny_model, tmp_path):
    """`cwreplay serve --step-log` (the plugin's ``StepLog``) inside vLLM's engine: every step's prefill
    tokens, attention pairs, decoding sequences and their context, running and waiting requests equal
    `cwsim run --step-log`'s for the same run, step by step (decode jumps off); its times are the wall
    clock's, each step's output after its scheduling."""
    import pandas as pd

    from cwsim.runner import STEP_FIELDS, simulate
    from replay.compare import sim_config_for
    from replay.oracle import VllmEngine, run_oracle, step_trace
    from replay.vllm_plugin.scheduler import StepLog

    make, oc = WORKLOADS["tool-mix-tight"]
    oc = replace(oc, model=tiny_model, policy="vllm")
    stepped = step_trace(make(), oc.steps_per_s)
    engine = VllmEngine(oc, max_model_len=min((oc.kv_blocks - 1) * oc.block_size, 32768))
    engine.scheduler._cw_steps = StepLog(str(tmp_path / "server-steps.csv"))
    oracle = run_oracle(stepped, oc, tmp_path / "oracle", engine=engine).summary
    sim = simulate(stepped, sim_config_for(oc, decode_jumps=False), tmp_path / "sim", step_log=True).summary
    live = pd.read_csv(tmp_path / "server-steps.csv")
    ours = pd.read_csv(tmp_path / "sim" / "steps.csv")
    assert list(live.columns) == [*STEP_FIELDS, "schedule_s"] and list(ours.columns) == STEP_FIELDS
    assert len(live) == len(ours) == sim["steps"] and oracle["evicted_blocks"] == sim["evicted_blocks"] > 0
    cols = ["prefill_tokens", "attn_pairs", "decode_seqs", "decode_ctx", "running", "waiting"]
    assert (live[cols].values == ours[cols].values).all()
    assert (live.steps == 1).all() and (live.prefill_tokens > 0).any() and (live.decode_seqs > 1).any()
    assert (live.end_s >= live.start_s).all() and (live.start_s.diff().dropna() > 0).all()
    assert (live.schedule_s > 0).all() and (live.schedule_s <= live.end_s - live.start_s).all()


# ------------------------------------------------------ vLLM's AsyncScheduler (the GPU default)
@pytest.mark.parametrize("policy", ["cachewise", "tokencake"])
def test_policy_inside_vllms_async_scheduler_equals_the_simulator(policy, tiny_model, tmp_path):
    """``PolicyScheduler`` becomes an ``AsyncPolicyScheduler`` when vLLM schedules asynchronously (two
    batches in flight; emulated outputs, as the CPU platform forces async off in a real engine): the
    policy still runs there, and ``cwsim --async-scheduling`` with the same policy equals it exactly."""
    from replay.compare import compare, format_report

    make, oc = WORKLOADS["tool-mix-tight"]
    c = compare(make(), replace(oc, model=tiny_model, policy=policy, engine="emulated", async_scheduling=True),
                tmp_path / "async")
    assert c.oracle["async_scheduling"] is True and c.sim["config"]["async_scheduling"] is True
    assert c.oracle["config"]["policy"] == policy
    assert_exact(c, format_report(c))
    assert c.oracle["evicted_blocks"] > 0


def test_a_policy_that_holds_calls_back_is_refused_under_async_scheduling(tiny_model, tmp_path):
    from replay.compare import compare

    make, oc = WORKLOADS["tool-mix-tight"]
    with pytest.raises(ValueError, match="'working-set' holds calls back .*start vLLM with --no-async-scheduling"):
        compare(make(), replace(oc, model=tiny_model, policy="working-set", engine="emulated", async_scheduling=True),
                tmp_path / "async")


# ------------------------------------------------------------ admission held back (Policy.admit)
class HoldAll(Policy):
    """Holds every call back until step 5, and session s1's until step 40: the engine first idles with
    only held calls (vLLM's engine core keeps stepping; the simulator waits for the deadline), then
    runs the others while s1's calls wait."""

    name = "test-hold-all"

    def admit(self, req) -> bool:
        now = self.env.now
        return now >= 5 and (req.session_id != "s1" or now >= 40)

    def tick(self, now: float) -> None:
        pass

    def next_deadline(self) -> float:
        now = self.env.now
        return 5.0 if now < 5 else 40.0 if now < 40 else math.inf


def test_calls_held_back_inside_vllm_equal_the_simulator(tiny_model, tmp_path):
    from cwsim.policies.registry import POLICIES, PolicySpec, register_policy
    from replay.compare import compare, format_report

    register_policy(PolicySpec("test-hold-all", "test: hold every call until step 5, s1's until 40", HoldAll))
    try:
        make, oc = WORKLOADS["shared-system-prompt"]
        c = compare(make(), replace(oc, model=tiny_model, policy="test-hold-all"), tmp_path / "hold")
    finally:
        POLICIES.pop("test-hold-all", None)
    assert_exact(c, format_report(c))
    with open(tmp_path / "hold" / "oracle" / "requests.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = {r["session_id"]: float(r["first_scheduled_s"]) for r in rows if r["turn"] == "0"}
    assert min(first.values()) == 5.0  # nothing ran before the first deadline
    assert first["s1"] == 40.0 and sorted(first)[0] == "s0" and first["s0"] == 5.0


def test_working_set_holds_calls_back_in_both_engines(tiny_model, tmp_path, monkeypatch):
    """The exactness above is not that of a gate that never closes: on the tight workload both engines'
    working-set holds calls back (counted by a spy around the policy's own ``admit``)."""
    from cwsim.policies.admission import WorkingSetAdmission
    from replay.compare import compare, format_report

    held: dict[str, int] = {}
    admit = WorkingSetAdmission.admit

    def counted(self, req):
        ok = admit(self, req)
        if not ok:
            engine = type(self.env).__name__
            held[engine] = held.get(engine, 0) + 1
        return ok

    monkeypatch.setattr(WorkingSetAdmission, "admit", counted)
    make, oc = WORKLOADS["tool-mix-tight"]
    c = compare(make(), replace(oc, model=tiny_model, policy="working-set"), tmp_path / "ws")
    assert_exact(c, format_report(c))
    assert held.get("VllmEnvironment", 0) > 0 and held.get("SimEnvironment", 0) > 0, held


def test_cli_oracle_runs_a_policy_inside_vllm(tiny_model, tmp_path):
    """``cwreplay oracle --policy P --setting ...`` runs P in the plugin and, with --compare, simulates it."""
    import json

    from typer.testing import CliRunner

    from replay.cli import app
    from traces.reader import write_trace

    make, oc = WORKLOADS["tool-mix-tight"]
    trace = tmp_path / "t.jsonl"
    write_trace(trace, make().calls())
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["oracle", "--trace", str(trace), "--kv-blocks", str(oc.kv_blocks),
                                   "--arrivals", oc.arrivals, "--agents", str(oc.agents),
                                   "--max-num-seqs", str(oc.max_num_seqs),
                                   "--max-num-batched-tokens", str(oc.max_num_batched_tokens),
                                   "--steps-per-s", str(oc.steps_per_s), "--engine", "emulated",
                                   "--model", tiny_model, "--policy", "cachewise-sched", "--setting", "aging_s=5",
                                   "--compare", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "EXACT" in res.output
    c = json.loads((out / "compare.json").read_text())
    assert c["exact"] and c["oracle_summary"]["config"]["policy"] == "cachewise-sched"
    assert c["oracle_summary"]["config"]["policy_settings"] == [["aging_s", 5]]


def test_a_prefix_cache_reset_puts_the_policy_back_on_a_fresh_pool(tiny_model):
    """vLLM's reset (what ``cwreplay run``'s warm-up sends) leaves its free queue as it was; inside the plugin
    the policy's queue would keep the old blocks' order and scores: after a reset the free blocks are in a fresh
    pool's order (by id, the null block out), none holds a hash, and the policy runs in a new environment that
    has seen no session."""
    from replay.oracle import OracleConfig, VllmEngine
    from replay.tokens import TokenBook
    from replay.vllm_plugin.block_queue import PolicyBlockQueue

    eng = VllmEngine(OracleConfig(kv_blocks=20, block_size=32, max_num_seqs=4, model=tiny_model, policy="lfu"),
                     max_model_len=600)
    try:
        sched = eng.scheduler
        pool = sched.kv_cache_manager.block_pool
        order = lambda: [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]  # noqa: E731
        assert order() == list(range(1, 20))
        book = TokenBook(eng.vocab_size)
        eng.add("a", book.prompt([("sys", 70), ("u", 60)]), 8, session_id="s1")
        eng.add("b", book.prompt([("sys", 70), ("v", 90)]), 8, session_id="s2")
        while eng.has_unfinished():
            eng.step(0.0)
        old_env, old_policy = sched.cw, sched.cw.policy
        assert order() != list(range(1, 20)) and sorted(order()) == list(range(1, 20))
        assert any(b.block_hash is not None for b in pool.blocks) and old_env.sessions._number
        assert sched.reset_prefix_cache()
        assert order() == list(range(1, 20))
        assert all(b.block_hash is None for b in pool.blocks)
        assert isinstance(pool.free_block_queue, PolicyBlockQueue) and pool.free_block_queue is not old_env.queue
        assert sched.cw is not old_env and sched.cw.policy is old_policy and not sched.cw.sessions._number
        # and it serves again: the same prompt now hits nothing
        eng.add("c", book.prompt([("sys", 70), ("u", 60)]), 4, session_id="s1")
        while eng.has_unfinished():
            eng.step(0.0)
        assert sched.cw.sessions._number == {"s1": 0}
    finally:
        eng.close()
