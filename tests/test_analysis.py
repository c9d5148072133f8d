"""traces.analysis and cwsim.analysis (its simulated KV working set): every number of a tiny
hand-made trace, and the bundled real trace."""

import json
import math

import pandas as pd
import pytest

import cwsim.sequences
import traces.analysis
from cwsim.analysis import analyze, working_set_inputs
from cwsim.runner import DEFAULT_TRACE
from traces.analysis import (
    call_table,
    compare,
    make_figures,
    session_first_prompt_shares,
    stats,
    summary_scalars,
    working_set,
    write_analysis,
)
from traces.format import Call, Session, ToolCall, Trace
from traces.reader import load_trace
from traces.sequences import common_prefix_len, shared_tokens

TOP_KEYS = {
    "sessions", "calls", "calls_per_session", "prompt_tokens", "output_tokens", "gap_s", "new_tokens_per_call",
    "prev_prefix_share", "cross_session_prefix_share", "prompt_growth", "tool_duration_s", "tool_mix",
    "llm_latency_s", "eviction_free_prefill", "kv_working_set",
}
STATS_KEYS = {"count", "mean", "median", "p10", "p90", "p99", "max"}


def tiny_trace() -> Trace:
    """Two sessions x three calls sharing a 32-token system prompt.

    A: append-only; a2's prompt holds only 2 of a1's 4 output tokens (prefix rule).
    B: outputs never reused (no output_segment on b0); b2 compacts the history,
       keeping the first 20 tokens of "sys".
    """
    sys = ("sys", 32)
    a0 = Call("A", 0, (sys, ("A:task", 10)), 5, "A:o0", (ToolCall("cat", "read", 1.0),))
    a1 = Call("A", 1, (sys, ("A:task", 10), ("A:o0", 5), ("A:r0", 20)), 4, "A:o1",
              (ToolCall("grep", "grep", 0.5), ToolCall("cat", "read", 2.0)), gap_s=3.0)
    a2 = Call("A", 2, (sys, ("A:task", 10), ("A:o0", 5), ("A:r0", 20), ("A:o1", 2), ("A:x", 6)), 3)
    b0 = Call("B", 0, (sys, ("B:task", 8)), 6, None, (ToolCall("pytest", "test", 4.0),))
    b1 = Call("B", 1, (sys, ("B:task", 8), ("B:r0", 10)), 2, "B:o1", (ToolCall("sed", "edit", 0.25),))
    b2 = Call("B", 2, (("sys", 20), ("B:summary", 10)), 1)
    return Trace([Session("A", (a0, a1, a2)), Session("B", (b0, b1, b2))], source="tiny")


# prompt tokens: a 42, 67, 75; b 40, 50, 30
PROMPTS = [42, 67, 75, 40, 50, 30]
# shared with the previous prompt + output: a1 47 (sys+task+o0), a2 69 (.. + r0 + 2 of o1), b1 40, b2 20
PREV_SHARES = [47 / 67, 69 / 75, 40 / 50, 20 / 30]
AVOIDABLE = [32, 47, 69, 32, 40, 20]  # first calls: the shared system prompt


@pytest.fixture(scope="module")
def tiny():
    return analyze(tiny_trace(), block_size=16, pool_blocks=6, agents=2)


def test_shared_tokens_follows_the_token_identity_rule():
    assert shared_tokens((("sys", 900), ("u0", 40)), (("sys", 900), ("u1", 40))) == 900
    assert shared_tokens((("a", 10), ("ctx", 300)), (("a", 10), ("ctx", 1000))) == 310
    assert shared_tokens((("a", 10), ("ctx", 300), ("x", 5)), (("a", 10), ("ctx", 300), ("x", 5))) == 315
    assert shared_tokens((("a", 10),), (("b", 10),)) == 0


def test_cwsim_sequences_are_the_traces_helpers():
    assert cwsim.sequences.shared_tokens is shared_tokens
    assert cwsim.sequences.common_prefix_len is common_prefix_len


def test_stats_by_hand():
    s = stats([0.25, 0.5, 1.0, 2.0, 4.0])
    assert set(s) == STATS_KEYS
    assert s["count"] == 5 and s["median"] == 1.0 and s["max"] == 4.0
    assert s["mean"] == pytest.approx(7.75 / 5)
    # linear interpolation: p10 at rank 0.4, p90 at 3.6, p99 at 3.96
    assert s["p10"] == pytest.approx(0.35)
    assert s["p90"] == pytest.approx(3.2)
    assert s["p99"] == pytest.approx(3.92)
    empty = stats([])
    assert empty["count"] == 0 and all(empty[k] is None for k in STATS_KEYS - {"count"})


def test_tiny_trace_counts_and_shapes(tiny):
    assert set(tiny) == TOP_KEYS
    json.dumps(tiny, allow_nan=False)  # JSON-serialisable, no NaN
    assert tiny["sessions"] == 2 and tiny["calls"] == 6
    for key in ("calls_per_session", "prompt_tokens", "output_tokens", "gap_s", "new_tokens_per_call",
                "prev_prefix_share", "cross_session_prefix_share"):
        assert set(tiny[key]) == STATS_KEYS, key
    assert tiny["calls_per_session"]["median"] == 3 and tiny["calls_per_session"]["count"] == 2
    p = tiny["prompt_tokens"]
    assert p["count"] == 6 and p["median"] == 46.0 and p["max"] == 75 and p["mean"] == pytest.approx(304 / 6)
    o = tiny["output_tokens"]
    assert o["count"] == 6 and o["mean"] == pytest.approx(21 / 6) and o["median"] == 3.5
    # gaps of calls that have a next call: a0 1.0 (tools), a1 3.0 (recorded), b0 4.0, b1 0.25
    g = tiny["gap_s"]
    assert g["count"] == 4 and g["mean"] == pytest.approx(8.25 / 4) and g["median"] == 2.0 and g["max"] == 4.0
    assert tiny["llm_latency_s"] is None


def test_tiny_trace_prefix_shares(tiny):
    table = call_table(tiny_trace())
    assert table["prev_shared_tokens"].tolist() == [0, 47, 69, 0, 40, 20]
    assert table.loc[table["turn"] > 0, "prev_prefix_share"].tolist() == pytest.approx(PREV_SHARES)
    s = tiny["prev_prefix_share"]
    assert s["count"] == 4
    assert s["mean"] == pytest.approx(sum(PREV_SHARES) / 4)
    assert s["median"] == pytest.approx((0.8 + 47 / 67) / 2)
    assert s["max"] == pytest.approx(69 / 75)
    # both first prompts share the 32-token system prompt
    assert session_first_prompt_shares(tiny_trace()) == [32, 32]
    c = tiny["cross_session_prefix_share"]
    assert c["count"] == 2
    assert c["mean"] == pytest.approx((32 / 42 + 32 / 40) / 2)
    assert c["max"] == pytest.approx(32 / 40)


def test_tiny_trace_prefill_and_growth(tiny):
    e = tiny["eviction_free_prefill"]
    assert e["prompt_tokens"] == sum(PROMPTS) == 304
    assert e["avoidable_tokens"] == sum(AVOIDABLE) == 240
    assert e["avoidable_share"] == pytest.approx(240 / 304)
    new = [p - a for p, a in zip(PROMPTS, AVOIDABLE)]  # 10, 20, 6, 8, 10, 10
    n = tiny["new_tokens_per_call"]
    assert n["count"] == 6 and n["mean"] == pytest.approx(sum(new) / 6) and n["median"] == 10 and n["max"] == 20
    g = tiny["prompt_growth"]
    assert g["by_turn_median"] == [41.0, 58.5, 52.5]
    # least squares over (turn, prompt): sum((x - 1) * y) / sum((x - 1)^2) = (-42 + 75 - 40 + 30) / 4
    assert g["tokens_per_turn_slope"] == pytest.approx(23 / 4)


def test_tiny_trace_tools(tiny):
    t = tiny["tool_duration_s"]
    assert set(t) == {"read", "grep", "test", "edit", "all"}
    assert t["read"]["count"] == 2 and t["read"]["mean"] == 1.5 and t["read"]["median"] == 1.5
    assert t["read"]["p10"] == pytest.approx(1.1) and t["read"]["max"] == 2.0
    assert t["test"] == {"count": 1, "mean": 4.0, "median": 4.0, "p10": 4.0, "p90": 4.0, "p99": 4.0, "max": 4.0}
    assert t["all"] == pytest.approx(stats([0.25, 0.5, 1.0, 2.0, 4.0]))
    assert tiny["tool_mix"] == pytest.approx({"read": 0.4, "grep": 0.2, "test": 0.2, "edit": 0.2})


def test_tiny_trace_working_set_from_the_simulation(tiny):
    ws = tiny["kv_working_set"]
    assert set(ws) == {"pool_blocks", "block_size", "peak_blocks", "mean_blocks", "time_over_pool_share", "series"}
    assert ws["pool_blocks"] == 6 and ws["block_size"] == 16
    # both sessions start at 0: a0 ceil(47/16) = 3 + b0 ceil(46/16) = 3 blocks, the 2 system-prompt blocks once
    assert ws["series"][0] == [0.0, 4]
    assert ws["series"][-1][1] == 0
    # contexts: A 3, 5, 5 blocks; B 3, 4, 2: at most 5 + 4 - 2 at once
    assert 5 <= ws["peak_blocks"] <= 7
    assert 0 < ws["mean_blocks"] <= ws["peak_blocks"]
    assert 0.0 <= ws["time_over_pool_share"] <= 1.0


def test_working_set_sweep_by_hand():
    trace = tiny_trace()
    requests = pd.DataFrame({
        "session_id": ["A", "A", "A", "B", "B", "B"],
        "turn": [0, 1, 2, 0, 1, 2],
        "arrival_s": [0.0, 10.0, 20.0, 0.0, 5.0, 25.0],
    })
    sessions = pd.DataFrame({"session_id": ["A", "B"], "end_s": [30.0, 40.0]})
    ws = working_set(call_table(trace), requests, sessions, trace, block_size=16, pool_blocks=6)
    # t0: 3 + 3 - 2 shared; t5: b1 4 blocks; t10: a1 5 blocks; t20: a2 still 5 (no new point);
    # t25: b2 2 blocks, sharing only "sys"[:20] -> 1 block; t30: A ends; t40: B ends
    assert ws["series"] == [[0.0, 4], [5.0, 5], [10.0, 7], [25.0, 6], [30.0, 2], [40.0, 0]]
    assert ws["peak_blocks"] == 7
    assert ws["mean_blocks"] == pytest.approx((4 * 5 + 5 * 5 + 7 * 15 + 6 * 5 + 2 * 10) / 40)
    assert ws["time_over_pool_share"] == pytest.approx(15 / 40)  # 7 > 6 on [10, 25)


def test_traces_analysis_takes_the_working_set_inputs_from_the_caller(tiny):
    trace = tiny_trace()
    plain = traces.analysis.analyze(trace)
    assert plain["kv_working_set"] is None
    assert {k: v for k, v in plain.items() if k != "kv_working_set"} == \
        {k: v for k, v in tiny.items() if k != "kv_working_set"}
    inputs = working_set_inputs(trace, block_size=16, pool_blocks=6, agents=2)
    assert (inputs.block_size, inputs.pool_blocks) == (16, 6)
    assert traces.analysis.analyze(trace, working_set_inputs=inputs) == tiny
    assert analyze(trace, block_size=16, pool_blocks=6, agents=2, working_set=False) == plain
    assert "kv_working_set" not in make_figures(plain, trace)


def test_empty_trace_is_refused_before_any_simulation():
    for run in (traces.analysis.analyze, analyze):
        with pytest.raises(ValueError, match="no sessions"):
            run(Trace([]))


def test_compare_is_zero_on_itself_and_relative(tiny):
    c = compare(tiny, tiny)
    assert c and set(c) == set(summary_scalars(tiny))
    assert c["llm_latency_s.mean"] is None  # not recorded on either side
    assert all(v == 0.0 for k, v in c.items() if not k.startswith("llm_latency_s."))
    b = json.loads(json.dumps(tiny))
    b["prompt_tokens"]["median"] *= 1.5
    b["tool_mix"] = {"read": 0.5, "grep": 0.5}
    c = compare(tiny, b)
    assert c["prompt_tokens.median"] == pytest.approx(0.5)
    assert c["tool_mix.read"] == pytest.approx(0.25) and c["tool_mix.test"] == pytest.approx(-1.0)


# ---------------------------------------------------------------- bundled trace
@pytest.fixture(scope="module")
def bundled():
    trace = load_trace(DEFAULT_TRACE)
    return trace, analyze(trace)


def test_bundled_trace(bundled):
    trace, a = bundled
    assert set(a) == TOP_KEYS
    json.dumps(a, allow_nan=False)
    assert a["sessions"] == 53 and a["calls"] == 4129
    assert 0.95 <= a["prev_prefix_share"]["median"] <= 1.0
    assert a["calls_per_session"]["median"] == 75 and a["prompt_tokens"]["median"] == 18643
    assert 0.95 < a["eviction_free_prefill"]["avoidable_share"] < 1.0
    assert a["llm_latency_s"]["count"] > 0
    assert sum(a["tool_mix"].values()) == pytest.approx(1.0)
    assert len(a["prompt_growth"]["by_turn_median"]) <= 200 and a["prompt_growth"]["tokens_per_turn_slope"] > 0
    ws = a["kv_working_set"]
    assert 0 < len(ws["series"]) <= 500 and ws["series"][0][0] == 0.0
    assert ws["peak_blocks"] == max(b for _, b in ws["series"]) > ws["mean_blocks"] > 0
    assert not math.isnan(ws["time_over_pool_share"])
    assert all(v == 0.0 for v in compare(a, a).values())


def test_bundled_trace_figures(bundled, tmp_path):
    trace, a = bundled
    paths = write_analysis(a, trace, tmp_path / "out")
    names = {p.name for p in paths}
    assert "analysis.json" in names and len([n for n in names if n.endswith(".png")]) == 7
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000, p
    for p in paths[1:]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "out" / "analysis.json").read_text()) == a
