"""``--gap-scale``: every gap between an answer and the session's next call scaled, for the run and its predictor."""

from __future__ import annotations

import pytest

from cwsim.config import ConfigError, SimConfig
from cwsim.runner import simulate
from tests.conftest import agent_trace
from traces.format import Trace
from traces.reader import write_trace
from traces.transform import scale_gaps


def _figures(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in ("wall_s", "config", "trace")}


def test_scale_gaps_multiplies_every_gap_and_keeps_the_rest():
    tr = agent_trace(n_sessions=2, turns=4, seed=1)
    scaled = list(scale_gaps(tr.sessions, 10))
    for s, t in zip(tr.sessions, scaled):
        assert [c.next_gap_s * 10 for c in s.calls] == [c.next_gap_s for c in t.calls]
        assert [c.prompt for c in s.calls] == [c.prompt for c in t.calls]
        assert [c.tools for c in s.calls] == [c.tools for c in t.calls]
    assert all(c.next_gap_s == 0 for s in scale_gaps(tr.sessions, 0) for c in s.calls)
    with pytest.raises(ValueError, match="gap scale must be >= 0"):
        list(scale_gaps(tr.sessions, -1))
    with pytest.raises(ConfigError, match="--gap-scale must be >= 0"):
        SimConfig(gap_scale=-0.5)


@pytest.mark.parametrize("policy", ["vllm", "cachewise", "continuum"])
def test_a_scaled_run_is_the_run_of_the_scaled_trace_streamed_or_whole(tmp_path, policy):
    tr = agent_trace(n_sessions=6, turns=6, seed=2, system_tokens=800)
    pre = Trace(list(scale_gaps(tr.sessions, 25.0)), source="pre-scaled")
    path = tmp_path / "t.jsonl"
    write_trace(path, tr.calls())
    cfg = dict(policy=policy, kv_blocks=700, agents=4)
    want = simulate(pre, SimConfig(**cfg)).summary
    assert _figures(simulate(tr, SimConfig(**cfg, gap_scale=25.0)).summary) == _figures(want)
    assert _figures(simulate(path, SimConfig(**cfg, gap_scale=25.0)).summary) == _figures(want)
    # and the scale matters: the sessions wait 25x longer between calls
    plain = simulate(tr, SimConfig(**cfg)).summary
    assert want["total_session_time_s"] > plain["total_session_time_s"]
