"""A project policy inside a live vLLM server (``cwreplay serve --policy``), against vLLM's own.

Two servers of the same pool, one running vLLM's scheduler and one running
``cachewise`` through the plugin, replay the same trace (sessions whose tool
calls predict their gaps) under pool pressure. The plugin is loaded (the
server says so), the calls carry their tool-call metadata over HTTP, and
vLLM's own ``BlockRemoved`` events show another eviction order. Live timing is
real time, so the two runs are not step-exact the way the in-process oracle
is (tests/test_vllm_plugin.py); the counts are in experiments/live_policy.py.

Needs vLLM (CI installs it); two server starts, about 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import csv
import importlib.util

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vLLM is not installed (pip install -e '.[vllm]'); CI installs it"),
]

SERVER = dict(kv_blocks=40, block_size=32, max_num_seqs=8, max_num_batched_tokens=512)
TIME_SCALE = 0.05


def _trace():
    from tests.oracle_workloads import tool_mix_sessions
    from traces.format import Trace

    return Trace(tool_mix_sessions(8, 6, seed=12), source="tool-mix")


def _evicted(out):
    with open(out / "evictions.csv", newline="") as f:
        return [r["block_hash"] for r in csv.DictReader(f)]


def _replay(server, trace, out, policy):
    from replay.live import LiveConfig, run_live

    cfg = LiveConfig(server=server.url, events=server.events, events_replay=server.events_replay,
                     time_scale=TIME_SCALE, agents=4, policy=policy)
    return run_live(trace, cfg, out, vocab_size=server.vocab_size).summary


def test_cachewise_runs_inside_a_live_server_and_changes_vllms_eviction_order(tmp_path_factory, monkeypatch):
    from replay.live_compare import scaled
    from replay.server import ServerConfig, start_server
    from replay.tiny_model import build_tiny_model
    from traces.reader import write_trace

    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")  # the servers' logs say what the plugin installed
    tmp_path = tmp_path_factory.mktemp("lp")  # short: the servers' ipc:// socket paths must stay under 107 bytes
    model = str(build_tiny_model(tmp_path / "tiny-llama"))
    trace = _trace()
    # the predictor learns the gaps the replay will really wait (the trace's, times the time scale)
    pred = tmp_path / "predictor.jsonl"
    write_trace(pred, [c for s in scaled(trace, TIME_SCALE).sessions for c in s.calls])
    summaries = {}
    for policy in ("vllm", "cachewise"):
        kw = {} if policy == "vllm" else dict(policy="cachewise", predictor_trace=str(pred))
        with start_server(ServerConfig(model=model, **SERVER, **kw), tmp_path / f"srv-{policy}") as srv:
            summaries[policy] = _replay(srv, trace, tmp_path / policy, policy)
        log = (tmp_path / f"srv-{policy}" / "server.log").read_text()
        assert ("cachewise policy plugin: cachewise (CacheWise) installed" in log) == (policy == "cachewise")
    for policy, s in summaries.items():
        assert not s["partial"] and s["policy"] == policy and s["requests"] == 48
        assert s["evicted_blocks"] == len(_evicted(tmp_path / policy)) > 0  # under pressure
    assert _evicted(tmp_path / "cachewise") != _evicted(tmp_path / "vllm")
