"""The simulator against a real vLLM 0.32 engine (the oracle), call by call and block by block.

Each workload (tests/oracle_workloads.py) runs on vLLM's in-process engine,
stepped by hand (``replay.oracle``), and in ``cwsim`` with the unit-step
profile; every call's arrival, first-token and finish step, cached tokens and
preemptions, and the evicted block hashes in order, must be EXACTLY equal.

Needs vLLM (``pip install -e '.[vllm]'``; CI installs it). Run these alone
with ``pytest -m vllm``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest

from tests.oracle_workloads import SHARED_TRACES, assert_exact, miniswe_workload, workloads

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install -e '.[vllm]'); CI installs it"),
]

WORKLOADS = workloads()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from replay.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-llama"))


def _compare(name, make, oc, tiny_model, tmp_path):
    from replay.compare import compare, format_report

    c = compare(make(), replace(oc, model=tiny_model), tmp_path / name)
    return c, format_report(c)




@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_simulator_equals_vllm(name, tiny_model, tmp_path):
    make, oc = WORKLOADS[name]
    c, report = _compare(name, make, oc, tiny_model, tmp_path)
    assert_exact(c, report)
    assert c.calls == sum(len(s.calls) for s in make().sessions)


def test_simulator_equals_vllm_on_real_miniswe_sessions(tiny_model, tmp_path):
    if not (SHARED_TRACES / "mini-swe-agent-deepseek").is_dir():
        pytest.skip(f"real traces not found at {SHARED_TRACES} (the shared data folder is absent on this clone)")
    make, oc = miniswe_workload()
    c, report = _compare("miniswe", make, oc, tiny_model, tmp_path)
    assert_exact(c, report)
    assert c.oracle["evicted_blocks"] > 0


def _rerun_sim(name, oc, c, tmp_path, **overrides):
    """The simulator again, against the oracle run ``c`` already made (in ``tmp_path / name``), with ``overrides``."""
    from replay.compare import diff_runs, sim_config_for
    from replay.oracle import step_trace

    from cwsim.runner import simulate

    stepped = step_trace(WORKLOADS[name][0]())
    out = tmp_path / name
    wrong = simulate(stepped, sim_config_for(oc, **overrides), out / "sim", eviction_log=True)
    return diff_runs(stepped, oc, out, c.oracle, wrong.summary)


def test_the_comparison_sees_a_missing_full_sequence_check(tiny_model, tmp_path):
    """Against the same oracle run, a simulator without vLLM's full-sequence admission check differs."""
    make, oc = WORKLOADS["longer-than-budget"]
    c, report = _compare("longer-than-budget", make, oc, tiny_model, tmp_path)
    assert_exact(c, report)
    w = _rerun_sim("longer-than-budget", oc, c, tmp_path, scheduler_reserve_full_isl=False)
    assert not w.exact and w.call_diffs and w.first_divergence is not None
    assert w.sim["preemptions"] > c.oracle["preemptions"]


def test_the_comparison_sees_same_instant_arrivals_out_of_session_order(tiny_model, tmp_path, monkeypatch):
    """Calls that arrive at one instant queue in session order in the oracle; queued as submitted, they differ."""
    from cwsim.scheduler import Scheduler

    make, oc = WORKLOADS["max-num-seqs"]
    c, report = _compare("max-num-seqs", make, oc, tiny_model, tmp_path)
    assert_exact(c, report)
    def add_as_submitted(self, req):
        self.policy.on_arrival(req)  # the request's view, as Scheduler.add makes it
        self.waiting.append(req)

    monkeypatch.setattr(Scheduler, "add", add_as_submitted)
    w = _rerun_sim("max-num-seqs", oc, c, tmp_path)
    assert not w.exact and w.call_diffs


def test_block_hashes_are_vllms(tiny_model):
    """replay.tokens computes the hashes vLLM's BlockStored events carry, from token ids alone."""
    from replay.oracle import OracleConfig, VllmEngine
    from replay.tokens import TokenBook, external_hash, vllm_block_hashes

    eng = VllmEngine(OracleConfig(kv_blocks=20, block_size=32, max_num_seqs=4, model=tiny_model), max_model_len=600)
    try:
        book = TokenBook(eng.vocab_size)
        prompt = book.prompt([("sys", 70), ("u", 60)])
        eng.add("r", prompt, 40)
        stored, generated = [], []
        while eng.has_unfinished():
            outs, _, _, batches = eng.step(0.0)
            for o in outs:
                generated += o.outputs[0].token_ids
            stored += [h for b in batches for e in b.events if type(e).__name__ == "BlockStored" for h in e.block_hashes]
    finally:
        eng.close()
    assert len(generated) == 40
    # every full block of prompt + output but the last token's (never computed)
    expected = [external_hash(h) for h in vllm_block_hashes((prompt + generated)[:-1], 32)]
    assert stored == expected and len(expected) == (130 + 40 - 1) // 32


def test_cli_oracle_compare(tiny_model, tmp_path):
    from typer.testing import CliRunner

    from replay.cli import app
    from traces.reader import write_trace

    make, oc = WORKLOADS["simultaneous-arrivals"]
    trace = tmp_path / "t.jsonl"
    write_trace(trace, make().calls())
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["oracle", "--trace", str(trace), "--kv-blocks", str(oc.kv_blocks),
                                   "--arrivals", "trace", "--max-num-batched-tokens", "256", "--model", tiny_model,
                                   "--compare", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "EXACT" in res.output
    import json

    c = json.loads((out / "compare.json").read_text())
    assert c["exact"] and c["calls"] == 24 and c["oracle_summary"]["source"] == "vllm-oracle"
    assert json.loads((out / "oracle" / "summary.json").read_text())["time_unit"] == "engine step"


# ------------------------------------------------------- the emulated engine core (no forward pass)
@pytest.mark.parametrize("name", ["heavy-pressure", "max-num-seqs", "simultaneous-arrivals"])
def test_emulated_engine_core_equals_the_real_engine(name, tiny_model, tmp_path):
    """vLLM's engine core with emulated model outputs schedules exactly as the real engine: the
    simulator equals both, so the emulation is exact on these workloads."""
    make, oc = WORKLOADS[name]
    c, report = _compare(name, make, replace(oc, engine="emulated"), tiny_model, tmp_path)
    assert_exact(c, report)
    assert c.oracle["config"]["engine"] == "emulated" and c.oracle["async_scheduling"] is False


ASYNC = ["concurrent-chunked", "heavy-pressure", "longer-than-budget", "simultaneous-arrivals", "max-num-seqs",
         "single-stream"]


@pytest.mark.parametrize("name", ASYNC)
def test_async_simulator_equals_vllms_async_scheduler(name, tiny_model, tmp_path):
    """Async scheduling (vLLM's AsyncScheduler and batch queue, two steps in flight; emulated
    outputs, as vLLM's CPU platform forces it off): ``cwsim --async-scheduling`` equals it exactly."""
    make, oc = WORKLOADS[name]
    c, report = _compare(name, make, replace(oc, engine="emulated", async_scheduling=True), tiny_model, tmp_path)
    assert c.oracle["async_scheduling"] is True and c.sim["config"]["async_scheduling"] is True
    assert_exact(c, report)
    if name != "single-stream":  # with one call at a time the pipeline changes nothing
        sync = _rerun_sim(name, oc, c, tmp_path, async_scheduling=False)
        assert not sync.exact, f"{name}: the plain scheduler should not match the async one"


def test_async_with_preemptions_of_steps_in_flight(tiny_model, tmp_path):
    """Many preemptions (no full-sequence check): victims with a step in flight, whose output arrives stale."""
    make, oc = WORKLOADS["heavy-pressure"]
    oc = replace(oc, engine="emulated", async_scheduling=True, scheduler_reserve_full_isl=False)
    c, report = _compare("hp-async-nofull", make, oc, tiny_model, tmp_path)
    assert_exact(c, report)
    assert c.oracle["preemptions"] > 20
