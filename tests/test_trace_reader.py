"""Trace format v1 reader/writer: round trips, header, every malformed case, skip_bad."""

from __future__ import annotations

import gzip
import json
import pickle
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from traces import Call, Session, ToolCall, Trace, TraceFormatError, load_trace, write_trace
from traces.format import header_line
from traces.reader import MAX_CALL_TOKENS


def _calls() -> list[Call]:
    return [
        Call("a", 0, (("sys", 100), ("u0", 20)), 30, "a:o0", (ToolCall("bash", "shell", 1.5),), None, 0.0, 0.8),
        Call("b", 0, (("sys", 100), ("v0", 7)), 5, None, (), 2.0, 0.1, None),
        Call("a", 1, (("sys", 100), ("u0", 20), ("a:o0", 30), ("u1", 12)), 8, "a:o1", (), None, 2.4, 0.3),
        Call("b", 1, (("sys", 100), ("v0", 7), ("v1", 3)), 4),
    ]


def _line(**kw) -> str:
    d = {"session_id": "s", "turn": 0, "prompt": [["sys", 10]], "output_tokens": 5}
    d.update(kw)
    return json.dumps(d)


def _write(tmp_path, *lines: str, name: str = "t.jsonl"):
    p = tmp_path / name
    p.write_text("".join(line + "\n" for line in lines))
    return p


def _err(path, **kw) -> TraceFormatError:
    with pytest.raises(TraceFormatError) as ei:
        load_trace(path, **kw)
    return ei.value


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["t.jsonl", "t.jsonl.gz"])
def test_round_trip(tmp_path, name):
    p = tmp_path / name
    calls = _calls()
    assert write_trace(p, calls, header={"source": "unit"}) == 4
    tr = load_trace(p)
    assert isinstance(tr, Trace)
    assert tr.source == str(p)
    assert tr.header == {"format": "cwtrace", "version": 2, "source": "unit"}
    assert tr.rejected == []
    assert [s.session_id for s in tr.sessions] == ["a", "b"]
    assert tr.sessions[0] == Session("a", (calls[0], calls[2]))
    assert tr.sessions[1] == Session("b", (calls[1], calls[3]))
    assert tr.num_calls == 4
    if name.endswith(".gz"):
        with gzip.open(p, "rt") as f:
            assert json.loads(f.readline())["format"] == "cwtrace"


def test_gz_bytes_deterministic(tmp_path, monkeypatch):
    p1, p2 = tmp_path / "x.jsonl.gz", tmp_path / "y.jsonl.gz"
    write_trace(p1, _calls(), header={"source": "unit"})
    # a later clock (or a different file name) must not show up in the gzip header
    monkeypatch.setattr(gzip.time, "time", lambda: 2_000_000_000.0)
    write_trace(p2, iter(_calls()), header={"source": "unit"})
    assert p1.read_bytes() == p2.read_bytes()
    write_trace(p1, _calls(), header={"source": "unit"})
    assert p1.read_bytes() == p2.read_bytes()


def test_no_header_blank_lines_unknown_keys_and_order(tmp_path):
    p = _write(
        tmp_path,
        "",
        _line(session_id="x", turn=1, meta={"model": "m"}),
        "   ",
        _line(session_id="y", turn=0),
        _line(session_id="x", turn=0, tools=[{"name": "grep", "duration_s": 2}]),
    )
    tr = load_trace(p)
    assert tr.header == {}
    assert [s.session_id for s in tr.sessions] == ["x", "y"]
    x = tr.sessions[0]
    assert [c.turn for c in x.calls] == [0, 1]
    assert x.calls[0].tools == (ToolCall("grep", "other", 2.0),)
    assert x.calls[0].next_gap_s == 2.0


def test_write_validates(tmp_path):
    p = tmp_path / "bad.jsonl"
    with pytest.raises(TraceFormatError) as ei:
        write_trace(p, [_calls()[0], Call("s", 0, (("a", 0),), 1)])
    assert str(ei.value).startswith(f"{p}:3: prompt[0][1]: ")  # line 1: the header
    assert not p.exists() and not (tmp_path / "bad.jsonl.tmp").exists()
    with pytest.raises(TraceFormatError) as ei:
        write_trace(p, _calls(), header={"version": 3})
    assert str(ei.value).startswith(f"{p}:1: version: ")


def test_error_attributes_and_pickle(tmp_path):
    e = TraceFormatError(tmp_path / "f.jsonl", 3, "turn", "oops")
    assert (e.path, e.line, e.field, e.problem) == (str(tmp_path / "f.jsonl"), 3, "turn", "oops")
    assert str(e) == f"{tmp_path / 'f.jsonl'}:3: turn: oops"
    assert isinstance(e, ValueError)
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) and e2.field == "turn"


# ---------------------------------------------------------------- header


def test_header_only_first_line(tmp_path):
    p = _write(tmp_path, "", header_line(source="x", note={"a": 1}), _line())
    tr = load_trace(p)
    assert tr.header["source"] == "x" and tr.header["note"] == {"a": 1}
    p = _write(tmp_path, _line(), header_line(), name="late.jsonl")
    assert str(_err(p)).startswith(f"{p}:2: format: ")


def test_bad_header_version(tmp_path):
    p = _write(tmp_path, json.dumps({"format": "cwtrace", "version": 3}), _line())
    assert str(_err(p)).startswith(f"{p}:1: version: ")
    # fatal even in lenient mode
    assert str(_err(p, skip_bad=True)).startswith(f"{p}:1: version: ")
    p = _write(tmp_path, json.dumps({"format": "cwtrace", "version": True}), _line(), name="b.jsonl")
    assert str(_err(p)).startswith(f"{p}:1: version: ")


def test_bad_header_format(tmp_path):
    p = _write(tmp_path, json.dumps({"format": "other", "version": 1}), _line())
    assert str(_err(p)).startswith(f"{p}:1: format: ")


# ---------------------------------------------------------------- malformed lines

GOOD = _line(session_id="ok", turn=0)

MALFORMED = [
    ("invalid_json", '{"session_id": "s", "turn": 0,', "json"),
    ("non_object", "[1, 2, 3]", "json"),
    ("missing_session_id", json.dumps({"turn": 0, "prompt": [["a", 1]], "output_tokens": 1}), "session_id"),
    ("empty_session_id", _line(session_id=""), "session_id"),
    ("turn_bool", _line(turn=True), "turn"),
    ("turn_negative", _line(turn=-1), "turn"),
    ("turn_float", _line(turn=1.0), "turn"),
    ("prompt_missing", json.dumps({"session_id": "s", "turn": 0, "output_tokens": 1}), "prompt"),
    ("prompt_empty", _line(prompt=[]), "prompt"),
    ("prompt_pair_shape", _line(prompt=[["a", 1], ["b", 2], ["c", 3, 4]]), "prompt[2]"),
    ("prompt_pair_not_list", _line(prompt=[["a", 1], {"b": 2}]), "prompt[1]"),
    ("n_tokens_zero", _line(prompt=[["a", 1], ["b", 2], ["c", 3], ["d", 0]]), "prompt[3][1]"),
    ("n_tokens_bool", _line(prompt=[["a", True]]), "prompt[0][1]"),
    ("segment_id_not_str", _line(prompt=[["a", 1], [7, 2]]), "prompt[1][0]"),
    ("output_tokens_zero", _line(output_tokens=0), "output_tokens"),
    ("output_segment_int", _line(output_segment=3), "output_segment"),
    ("tools_not_list", _line(tools={"name": "bash", "duration_s": 1}), "tools"),
    ("tool_not_object", _line(tools=["bash"]), "tools[0]"),
    ("tool_missing_name", _line(tools=[{"duration_s": 1}]), "tools[0].name"),
    ("tool_category_not_str", _line(tools=[{"name": "x", "category": 1, "duration_s": 1}]), "tools[0].category"),
    ("tool_missing_duration", _line(tools=[{"name": "a", "duration_s": 1}, {"name": "bash"}]), "tools[1].duration_s"),
    ("tool_negative_duration", _line(tools=[{"name": "bash", "duration_s": -0.5}]), "tools[0].duration_s"),
    ("gap_nan", '{"session_id":"s","turn":0,"prompt":[["a",1]],"output_tokens":1,"gap_s":NaN}', "gap_s"),
    ("gap_negative", _line(gap_s=-1), "gap_s"),
    ("gap_string", _line(gap_s="1"), "gap_s"),
    ("latency_infinite", '{"session_id":"s","turn":0,"prompt":[["a",1]],"output_tokens":1,"latency_s":Infinity}',
     "latency_s"),
    ("timestamp_bool", _line(timestamp_s=False), "timestamp_s"),
]


@pytest.mark.parametrize("bad,field", [(b, f) for _, b, f in MALFORMED], ids=[n for n, _, _ in MALFORMED])
def test_malformed_line(tmp_path, bad, field):
    p = _write(tmp_path, header_line(), GOOD, bad)
    e = _err(p)
    assert str(e).startswith(f"{p}:3: {field}: "), str(e)
    assert (e.path, e.line, e.field) == (str(p), 3, field)
    # same in gzip
    gz = tmp_path / "t.jsonl.gz"
    gz.write_bytes(gzip.compress(p.read_bytes()))
    assert str(_err(gz)).startswith(f"{gz}:3: {field}: ")


def test_timestamp_may_be_negative(tmp_path):
    p = _write(tmp_path, _line(timestamp_s=-5, gap_s=0, latency_s=None, output_segment=None))
    c = load_trace(p).sessions[0].calls[0]
    assert c.timestamp_s == -5.0 and c.gap_s == 0.0 and c.latency_s is None


def test_duplicate_turn(tmp_path):
    p = _write(tmp_path, _line(turn=0), _line(session_id="t", turn=0), _line(turn=1), _line(turn=0))
    e = _err(p)
    assert str(e).startswith(f"{p}:4: turn: ")
    assert "duplicate turn 0" in e.problem and "line 1" in e.problem


def test_missing_turn_gap(tmp_path):
    p = _write(tmp_path, _line(turn=0), _line(turn=1), _line(turn=3), _line(turn=4))
    e = _err(p)
    assert str(e).startswith(f"{p}:3: turn: ")
    assert "turn 2" in e.problem and "missing" in e.problem


def test_missing_turn_at_start(tmp_path):
    p = _write(tmp_path, _line(session_id="ok"), _line(turn=2), _line(turn=1))
    e = _err(p)
    assert str(e).startswith(f"{p}:3: turn: ")
    assert "turn 0" in e.problem


def test_empty_file(tmp_path):
    p = _write(tmp_path)
    e = _err(p)
    assert str(e) == f"{p}:0: trace: no calls"
    p = _write(tmp_path, "", "  ", name="blank.jsonl")
    assert str(_err(p)) == f"{p}:0: trace: no calls"
    p = _write(tmp_path, header_line(), name="header_only.jsonl")
    assert str(_err(p)) == f"{p}:0: trace: no calls"


def test_missing_file(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as ei:
        load_trace(p)
    assert str(p) in str(ei.value)


def test_corrupt_gzip(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    p.write_bytes(b"not gzip at all")
    assert str(_err(p)).startswith(f"{p}:0: gzip: ")


# ---------------------------------------------------------------- skip_bad


def test_skip_bad(tmp_path):
    p = _write(
        tmp_path,
        header_line(),
        _line(session_id="a", turn=0),
        _line(session_id="b", turn=0),
        "not json",  # line 4
        _line(session_id="b", turn=1, output_tokens=0),  # line 5: b's middle line
        _line(session_id="a", turn=1),
        _line(session_id="b", turn=2),  # line 7: after b's gap
        _line(session_id="c", turn=0),
        _line(session_id="c", turn=0),  # line 9: duplicate
        _line(session_id="c", turn=1),
        _line(session_id="d", turn=1, prompt=[]),  # line 11: d's only line, bad
    )
    with pytest.raises(TraceFormatError):
        load_trace(p)
    tr = load_trace(p, skip_bad=True)
    assert [s.session_id for s in tr.sessions] == ["a"]
    assert [c.turn for c in tr.sessions[0].calls] == [0, 1]
    got = [(e.line, e.field) for e in tr.rejected]
    assert got == [(4, "json"), (5, "output_tokens"), (7, "turn"), (9, "turn"), (11, "prompt")]
    b_err = tr.rejected[2]
    assert "turn 1 of session 'b' is missing" in b_err.problem
    assert "rejected line(s) of this session: 5" in b_err.problem
    assert "dropped" in b_err.problem
    assert "session 'c' dropped" in tr.rejected[3].problem
    assert all(isinstance(e, TraceFormatError) for e in tr.rejected)


def test_skip_bad_all_rejected(tmp_path):
    p = _write(tmp_path, "nope", _line(turn=-1))
    e = _err(p, skip_bad=True)
    assert str(e).startswith(f"{p}:0: trace: no valid calls (2 rejected")


# ---------------------------------------------------------------- speed


def test_reads_4000_lines_fast(tmp_path):
    shared = [[f"sys{i}", 512] for i in range(100)]
    calls = []
    for s in range(40):
        for t in range(100):
            prompt = shared + [[f"s{s}:u{k}", 40 + k] for k in range(50)]
            calls.append(
                Call(
                    f"s{s}", t, tuple((a, b) for a, b in prompt), 50, f"s{s}:o{t}",
                    (ToolCall("bash", "shell", 0.5),), 1.0, float(t), 2.0,
                )
            )
    p = tmp_path / "big.jsonl"
    write_trace(p, calls)
    times = []
    for _ in range(3):  # best of 3: robust to a busy test machine
        t0 = time.perf_counter()
        tr = load_trace(p)
        times.append(time.perf_counter() - t0)
    assert tr.num_calls == 4000
    assert tr.sessions[7].calls[99].prompt == calls[799].prompt
    assert min(times) < 1.0, times


# ---------------------------------------------------------------- property

_ids = st.text(min_size=1, max_size=8)
_nonneg = st.floats(min_value=0, allow_nan=False, allow_infinity=False)
_tool = st.builds(ToolCall, name=_ids, category=st.text(max_size=6), duration_s=_nonneg)


@st.composite
def _sessions(draw):
    sids = draw(st.lists(_ids, min_size=1, max_size=4, unique=True))
    calls = []
    for sid in sids:
        for turn in range(draw(st.integers(1, 4))):
            calls.append(
                Call(
                    sid,
                    turn,
                    tuple(draw(st.lists(st.tuples(_ids, st.integers(1, MAX_CALL_TOKENS // 6)), min_size=1, max_size=6))),
                    draw(st.integers(1, MAX_CALL_TOKENS)),
                    draw(st.none() | _ids),
                    tuple(draw(st.lists(_tool, max_size=3))),
                    draw(st.none() | _nonneg),
                    draw(st.none() | st.floats(allow_nan=False, allow_infinity=False)),
                    draw(st.none() | _nonneg),
                )
            )
    return draw(st.permutations(calls))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=_sessions(), gz=st.booleans())
def test_property_round_trip(tmp_path, calls, gz):
    p = tmp_path / ("p.jsonl.gz" if gz else "p.jsonl")
    assert write_trace(p, calls) == len(calls)
    tr = load_trace(p)
    got = sorted(tr.calls(), key=lambda c: (c.session_id, c.turn))
    want = sorted(calls, key=lambda c: (c.session_id, c.turn))
    assert got == want
    firsts = list(dict.fromkeys(c.session_id for c in calls))
    assert [s.session_id for s in tr.sessions] == firsts
