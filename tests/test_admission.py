"""``Policy.admit`` (an admission gate) in the simulator, and ``working-set`` (session-aware admission)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cwsim.config import SimConfig
from cwsim.policies.api import Policy, RequestView
from cwsim.policies.registry import PolicySpec, get_policy, register_policy, POLICIES
from cwsim.runner import simulate
from replay.vllm_plugin.config import engine_policy
from tests.conftest import agent_trace

HOLD_UNTIL = 7.5


class HoldSessionOne(Policy):
    """Holds every call of session s1 back until HOLD_UNTIL (a deadline the engine must not jump past)."""

    name = "test-hold-s1"

    def admit(self, req: RequestView) -> bool:
        return req.session_id != "s1" or self.env.now >= HOLD_UNTIL

    def tick(self, now: float) -> None:
        pass

    def next_deadline(self) -> float:
        return HOLD_UNTIL if self.env.now < HOLD_UNTIL else math.inf


@pytest.fixture(scope="module", autouse=True)
def hold_policy():
    if "test-hold-s1" not in POLICIES:
        register_policy(PolicySpec("test-hold-s1", "test: hold s1 until 7.5 s", HoldSessionOne))
    yield
    POLICIES.pop("test-hold-s1", None)


def _requests(out) -> pd.DataFrame:
    return pd.read_csv(out / "requests.csv")


def test_a_held_call_waits_for_the_deadline_and_nothing_else_changes_order(tmp_path):
    tr = agent_trace(n_sessions=3, turns=3, seed=4, system_tokens=300)
    cfg = dict(kv_blocks=2000, agents=3)
    held = _requests(simulate(tr, SimConfig(policy="test-hold-s1", **cfg), tmp_path / "h").out_dir)
    free = _requests(simulate(tr, SimConfig(policy="vllm", **cfg), tmp_path / "f").out_dir)
    s1 = held.loc[(held["session_id"] == "s1") & (held["turn"] == 0)].iloc[0]
    assert s1["arrival_s"] == 0.0
    assert s1["first_scheduled_s"] == HOLD_UNTIL  # the first step at the deadline admits it (the engine idles till then)
    assert free.loc[(free["session_id"] == "s1") & (free["turn"] == 0), "first_scheduled_s"].iloc[0] == 0.0
    # session s0 is never held: its first call is admitted at once either way
    assert held.loc[(held["session_id"] == "s0") & (held["turn"] == 0), "first_scheduled_s"].iloc[0] == 0.0


def test_a_gate_is_exact_under_decode_jumps():
    tr = agent_trace(n_sessions=3, turns=4, seed=4, system_tokens=300)
    runs = [simulate(tr, SimConfig(policy="test-hold-s1", kv_blocks=2000, agents=3, decode_jumps=j)).summary
            for j in (True, False)]
    jump, step = runs
    assert jump["decode_jumps"] > 0 and jump["steps"] == step["steps"]
    for key in ("evicted_blocks", "harmful_evictions", "preemptions", "recomputed_prompt_tokens", "requests"):
        assert jump[key] == step[key], key
    for key in ("total_session_time_s", "makespan_s", "p99_session_time_s"):  # (sums in another order)
        assert jump[key] == pytest.approx(step[key], rel=1e-9), key


def test_a_gating_policy_runs_in_the_vllm_plugin_but_not_with_async_scheduling(tmp_path):
    assert engine_policy("test-hold-s1").name == "test-hold-s1" and get_policy("test-hold-s1").runs_in_vllm
    tr = agent_trace(n_sessions=2, turns=2, seed=4)
    with pytest.raises(ValueError, match="--async-scheduling is not modelled with --policy 'test-hold-s1', which holds calls back"):
        simulate(tr, SimConfig(policy="test-hold-s1", kv_blocks=2000, async_scheduling=True))


# ------------------------------------------------------------------------ working-set
@pytest.fixture(scope="module")
def pressured_runs():
    """The bundled trace's first 12 sessions, 8 agents, a pool a third of what they would hold."""
    cfg = dict(kv_blocks=5000, agents=8, max_sessions=12)
    return {p: simulate(None, SimConfig(policy=p, **cfg)).summary
            for p in ("vllm", "working-set", "working-set-evict", "infinite")}


def test_working_set_admission_stops_the_thrashing(pressured_runs):
    vllm, ws, inf = pressured_runs["vllm"], pressured_runs["working-set"], pressured_runs["infinite"]
    assert ws["requests"] == vllm["requests"] and ws["sessions"] == 12
    assert vllm["evicted_blocks"] > 2.5 * ws["evicted_blocks"]
    assert ws["prefix_hit_rate"] > vllm["prefix_hit_rate"] + 0.3
    assert inf["total_session_time_s"] < ws["total_session_time_s"] < vllm["total_session_time_s"]


def test_working_set_evict_takes_cachewise_eviction_scores(pressured_runs):
    from cwsim.policies.cachewise import ReuseAwareEviction
    from cwsim.policies.admission import WorkingSetAdmission

    cls = get_policy("working-set-evict").cls
    assert issubclass(cls, WorkingSetAdmission) and issubclass(cls, ReuseAwareEviction)
    assert cls.score is WorkingSetAdmission.score  # the bookkeeping, then ReuseAwareEviction's scores
    assert pressured_runs["working-set-evict"]["evicted_blocks"] != pressured_runs["working-set"]["evicted_blocks"]


def test_working_set_settings_are_checked():
    from cwsim.policies.admission import WorkingSetAdmission

    with pytest.raises(ValueError, match="headroom must be in"):
        WorkingSetAdmission(headroom=1.0)


def test_a_gating_policy_refuses_async_scheduling_before_writing_anything(tmp_path):
    from cwsim.config import ConfigError

    with pytest.raises(ConfigError, match="--async-scheduling is not modelled with --policy 'working-set'"):
        simulate(None, SimConfig(policy="working-set", async_scheduling=True, max_sessions=2), tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("min_idle_s, until", [(0.0, 12.0), (3.0, 13.0)])
def test_a_session_stays_resident_for_its_horizon_or_min_idle_s_if_longer(min_idle_s, until):
    """grep's expected idle time is 0.5 s: resident for 4 x 0.5 = 2 s after its call ends, or for
    ``min_idle_s`` when that is longer (a floor that a long step in progress cannot race)."""
    from cwsim.policies.admission import WorkingSetAdmission
    from cwsim.predict import ToolCallPredictor
    from tests.test_policies_continuum_pbkv import Harness, fit_trace, sessions_for

    s = sessions_for([["grep", "grep"]])[0]
    h = Harness(WorkingSetAdmission(idle_factor=4.0, min_idle_s=min_idle_s), 5, ToolCallPredictor.fit(fit_trace(), min_samples=1))
    h.finish(h.use(2), h.req(0, s, 0), now=10.0)
    assert h.policy.next_deadline() == pytest.approx(until)
    nxt = h.req(1, s, 1, arrival=10.6)
    h.policy.tick(until - 0.01)
    assert h.policy.priority(nxt.view) == (0, 1)  # resident: its calls go first, admitted beside the others
    h.policy.tick(until)
    assert h.policy.priority(nxt.view) == (1, 1) and h.policy.next_deadline() == math.inf


class _RecordsMinIdle(Policy):
    name = "test-records-min-idle"
    seen: list = []

    def __init__(self, min_idle_s: float = 0.0):
        self.seen.append(min_idle_s)


def test_cwsim_gives_min_idle_s_to_the_policies_that_take_it(tmp_path):
    """``SimConfig.min_idle_s`` (``cwsim run --min-idle-s``) reaches the policy's constructor; a policy
    that keeps no resident sessions is refused the flag."""
    from typer.testing import CliRunner

    from cwsim.cli import app

    _RecordsMinIdle.seen.clear()
    register_policy(PolicySpec("test-records-min-idle", "test", _RecordsMinIdle, ("min_idle_s",)))
    try:
        simulate(None, SimConfig(policy="test-records-min-idle", min_idle_s=0.25, max_sessions=1))
        assert _RecordsMinIdle.seen == [0.25]
    finally:
        POLICIES.pop("test-records-min-idle")
    res = CliRunner().invoke(app, ["run", "--policy", "sglang", "--min-idle-s", "0.2", "--max-sessions", "1"])
    assert res.exit_code == 2
    assert "--min-idle-s: policy 'sglang' does not take min_idle_s (policies that do: working-set, working-set-evict)" \
        in res.output
    res = CliRunner().invoke(app, ["run", "--policy", "vllm", "--aging-s", "5", "--max-sessions", "1"])
    assert res.exit_code == 2 and "--aging-s: policy 'vllm' does not take aging_s (policies that do: cachewise, " \
        "cachewise-sched)" in res.output
    with pytest.raises(ValueError, match="--min-idle-s must be >= 0, got -1"):
        SimConfig(min_idle_s=-1)
