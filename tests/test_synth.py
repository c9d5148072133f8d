"""Synthetic traces (traces.synth): fit the bundled trace, sample, check shape and closeness."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from tests.conftest import agent_trace
from traces.format import Call, Session, ToolCall, Trace
from traces.reader import load_trace
from traces.synth import (
    NO_TOOL,
    WorkloadModel,
    closeness,
    fit,
    format_closeness,
    iter_sessions,
    main,
    sample,
    synthetic_trace,
)

BUNDLED = Path(__file__).resolve().parents[1] / "traces" / "data" / "miniswe-deepseek.jsonl.gz"
N = 200
SEED = 1
TOL = 0.25  # relative tolerance of the closeness checks


@pytest.fixture(scope="module")
def real() -> Trace:
    return load_trace(BUNDLED)


@pytest.fixture(scope="module")
def model(real) -> WorkloadModel:
    return fit(real)


@pytest.fixture(scope="module")
def calls(model) -> list[Call]:
    return sample(model, N, SEED)


@pytest.fixture(scope="module")
def synth(calls) -> Trace:
    by: dict[str, list[Call]] = defaultdict(list)
    for c in calls:
        by[c.session_id].append(c)
    return Trace([Session(sid, tuple(cs)) for sid, cs in by.items()])


# ------------------------------------------------------------------ the model


def test_fit_bundled(model, real):
    assert model.fitted_sessions == 53 and model.fitted_calls == 4129
    # three runs, each with its own 29-token system prompt segment
    assert sorted(c["sessions"] for c in model.system_classes) == [10, 20, 23]
    assert all(c["tokens"] == [29] for c in model.system_classes)
    assert model.terminal == "submit" and model.ends_terminal == 48
    assert model.non_append_share == 0.0
    assert set(model.categories) == {
        "grep", "edit", "read", "python", "find", "test", "other", "git", "install", "submit"}
    assert model.latency_s is not None and len(model.latency_s) == len(model.latency_output_edges) + 1
    assert model.interarrival_s and min(model.interarrival_s) >= 0
    assert sorted(model.session_calls) == sorted(len(s.calls) for s in real.sessions)
    # large samples are kept as at most 1,001 observed values
    assert len(model.output_tokens) <= 1001
    assert set(model.output_tokens) <= {c.output_tokens for c in real.calls()}


def test_model_json_round_trip(model):
    text = json.dumps(model.to_json())
    back = WorkloadModel.from_json(text)
    assert back == model
    assert WorkloadModel.from_json(json.loads(text)) == model
    assert [c.to_line() for c in sample(back, 20, 3)] == [c.to_line() for c in sample(model, 20, 3)]
    with pytest.raises(ValueError, match="unknown"):
        WorkloadModel.from_json({**model.to_json(), "bogus": 1})


# ------------------------------------------------------------------ sampling


def test_deterministic(model, calls):
    # Calls are frozen dataclasses: equal calls give equal lines (to_line is a function of the fields).
    assert sample(model, N, SEED) == calls
    first = sample(model, 20, SEED)  # session i does not depend on how many are sampled
    assert calls[: len(first)] == first
    assert [c.to_line() for c in first] == [c.to_line() for c in calls[: len(first)]]
    gen = iter_sessions(model, 10**9, SEED)  # lazy: sessions come one at a time
    assert next(gen).calls == tuple(calls[: len(next(iter_sessions(model, 1, SEED)).calls)])
    other = sample(model, 20, SEED + 1)
    assert [c.to_line() for c in other] != [c.to_line() for c in first]
    assert {c.session_id for c in other} == {c.session_id.replace(f"s{SEED}-", f"s{SEED + 1}-") for c in first}


def test_lines_load(tmp_path, calls):
    # (write_trace streaming is exercised by test_cli; here the plain lines are checked by the strict reader)
    path = tmp_path / "syn.jsonl"
    path.write_text("".join(c.to_line() + "\n" for c in calls))
    back = load_trace(path)  # strict: every line is valid format v1
    assert len(back.sessions) == N
    assert list(back.calls()) == calls


def test_append_only_growth(synth):
    for s in synth.sessions:
        assert [c.turn for c in s.calls] == list(range(len(s.calls)))
        for prev, cur in zip(s.calls, s.calls[1:]):
            ext = prev.prompt + ((prev.output_segment, prev.output_tokens),)
            assert cur.prompt[: len(ext)] == ext
            assert len(cur.prompt) == len(ext) + 1  # + the tool output
        assert all(seg.startswith("syn/") for seg, _ in s.calls[-1].prompt)


def test_cross_session_system_segment(synth):
    sessions_of = defaultdict(set)
    for s in synth.sessions:
        sessions_of[s.calls[0].prompt[0]].add(s.session_id)
        for c in s.calls:
            assert c.prompt[0] == s.calls[0].prompt[0]
    # one shared 29-token system segment per class, each used by many sessions
    assert len(sessions_of) == 3
    assert all(n == 29 for _, n in sessions_of)
    assert all(len(v) >= 20 for v in sessions_of.values())
    # the task segment is the session's own
    tasks = [s.calls[0].prompt[1][0] for s in synth.sessions]
    assert len(set(tasks)) == len(tasks)


def test_tools_gaps_timestamps(model, synth):
    starts = []
    for s in synth.sessions:
        cats = [c.tools[0].category for c in s.calls]
        assert "submit" not in cats[:-1]  # terminal only at the end
        starts.append(s.calls[0].timestamp_s)
        for k, c in enumerate(s.calls):
            assert len(c.tools) == 1 and c.tools[0].name == "bash"
            assert c.gap_s == c.tools[0].duration_s
            assert c.latency_s is not None and c.latency_s >= 0
            if k:
                p = s.calls[k - 1]
                assert c.timestamp_s == pytest.approx(p.timestamp_s + p.latency_s + p.gap_s, abs=1e-5)
    assert starts[0] == 0.0 and starts == sorted(starts)
    share = sum(s.calls[-1].tools[0].category == "submit" for s in synth.sessions) / len(synth.sessions)
    assert share == pytest.approx(48 / 53, abs=0.06)


# ------------------------------------------------------------------ closeness


def test_closeness(real, synth):
    rep = closeness(real, synth)
    st = rep["stats"]
    for key in ("calls_per_session.median", "prompt_tokens.median", "output_tokens.median",
                "tool_duration_s.all.median", "gap_s.median", "prev_prefix_share.median",
                "cross_session_prefix_share.median", "llm_latency_s.median"):
        assert abs(st[key]["rel_error"]) <= TOL, (key, st[key])
    mix = {k: v for k, v in st.items() if k.startswith("tool_mix.")}
    assert len(mix) == 10
    for key, v in mix.items():
        assert abs(v["synthetic"] - v["real"]) <= 0.02, (key, v)
        if v["real"] >= 0.05:
            assert abs(v["rel_error"]) <= TOL, (key, v)
    table = format_closeness(rep)
    assert "calls_per_session.median" in table and "tool_mix.grep" in table


def test_closeness_with_the_simulated_working_set():
    from cwsim.analysis import analyze

    real, synth = agent_trace(n_sessions=4, turns=4, seed=0), agent_trace(n_sessions=4, turns=4, seed=1)
    plain = closeness(real, synth)
    assert plain["analysis"] == "traces.analysis.analyze"
    assert not any(k.startswith("kv_working_set.") for k in plain["stats"])
    rep = closeness(real, synth, analyze=analyze)
    assert rep["analysis"] == "cwsim.analysis.analyze"
    peak = rep["stats"]["kv_working_set.peak_blocks"]
    assert peak["real"] > 0 and peak["synthetic"] > 0
    assert {k: v for k, v in rep["stats"].items() if not k.startswith("kv_working_set.")} == plain["stats"]


def test_fit_plain_trace_without_times_or_submit():
    model = fit(agent_trace(n_sessions=6, turns=5))
    assert model.terminal is None and model.latency_s is None and model.interarrival_s is None
    assert model.system_classes == [{"tokens": [2000], "sessions": 6}]
    trace = synthetic_trace(model, 10, 0)
    for s in trace.sessions:
        assert len(s.calls) == 5
        assert all(c.timestamp_s is None and c.latency_s is None for c in s.calls)
        assert s.calls[0].prompt[0] == ("syn/sys0.0", 2000)


def test_non_append_and_toolless_calls():
    sessions = []
    for i in range(4):
        p0 = (("sys", 50), (f"task{i}", 20))
        c0 = Call(f"s{i}", 0, p0, 10, f"a{i}", (ToolCall("bash", "read", 0.5),))
        p1 = p0 + ((f"a{i}", 10), (f"r{i}", 30))
        c1 = Call(f"s{i}", 1, p1, 12, f"b{i}")  # no tool
        p2 = (("sys", 50), (f"summary{i}", 15))  # rewritten context
        c2 = Call(f"s{i}", 2, p2, 5, f"c{i}", (ToolCall("bash", "test", 1.0),))
        sessions.append(Session(f"s{i}", (c0, c1, c2)))
    model = fit(Trace(sessions))
    assert model.non_append_share == pytest.approx(0.5)
    assert NO_TOOL in model.categories
    trace = synthetic_trace(model, 50, 2)
    rewrites = 0
    for s in trace.sessions:
        for prev, cur in zip(s.calls, s.calls[1:]):
            if cur.prompt[: len(prev.prompt)] != prev.prompt:
                rewrites += 1
                assert cur.prompt[0] == prev.prompt[0]  # the system part stays
        assert all(c.tools[0].category != NO_TOOL for c in s.calls if c.tools)
    assert rewrites > 0
    assert any(not c.tools for c in trace.calls())


def test_cli(tmp_path, capsys):
    out = tmp_path / "syn.jsonl.gz"
    model_out = tmp_path / "model.json"
    rc = main(["--like", str(BUNDLED), "--sessions", "12", "--seed", "4", "-o", str(out),
               "--model-out", str(model_out), "--check-sessions", "12"])
    assert rc == 0
    trace = load_trace(out)
    assert len(trace.sessions) == 12
    h = trace.header
    assert h["synthetic"] is True and h["seed"] == 4 and h["fitted_from"] == str(BUNDLED)
    assert h["generator"] == "traces.synth"
    printed = capsys.readouterr().out
    assert "calls_per_session.median" in printed
    model = WorkloadModel.load(model_out)
    assert [c.to_line() for c in trace.calls()] == [c.to_line() for c in sample(model, 12, 4)]
