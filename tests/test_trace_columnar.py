"""The columnar trace (``traces.columnar.TraceTable``): every session it builds equals
``load_trace``'s, its ``shared`` is exact, it pickles, and code written for a ``Trace`` runs on it."""

from __future__ import annotations

import json
import pickle
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwsim.analysis import analyze
from cwsim.predict import ToolCallPredictor
from cwsim.runner import DEFAULT_TRACE
from traces import Call, Session, ToolCall, TraceFormatError, load_trace, write_trace
from traces.columnar import TraceTable, load_table
from traces.format import Trace, header_line
from traces.stream import segment_ids, session_info


def _calls() -> list[Call]:
    sys = ("sys", 40)
    return [
        Call("a", 0, (sys, ("a:task", 20)), 30, "a:o0", (ToolCall("bash", "shell", 1.5),), 1.5, 0.0),
        Call("a", 1, (sys, ("a:task", 20), ("a:o0", 30), ("a:r0", 12)), 8, "a:o1",
             (ToolCall("grep", "search", 0.25), ToolCall("bash", "shell", 2.0)), None, 3.0, 0.75),
        Call("b", 0, (sys, ("b:task", 7)), 5, None, (), 2.0, 1.0),
        Call("b", 1, (sys, ("b:task", 7), ("b:r0", 3)), 4, None, (), None, 4.0),
        Call("b", 2, (sys, ("shared-file", 16)), 4),  # diverges from its previous prompt after one segment
        Call("c", 0, (("shared-file", 16), ("c:q", 5)), 9, None, (), None, 0.5),
    ]


def test_a_file_read_into_columns_gives_load_traces_sessions_and_exact_sharing(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    write_trace(p, _calls(), header={"source": "unit"})
    table, trace = load_table(p), load_trace(p)
    assert table.header == trace.header and table.source == trace.source == str(p)
    assert list(table.sessions) == trace.sessions and table.to_trace() == trace
    assert table.sessions[-1] == trace.sessions[2] and table.sessions[1:] == trace.sessions[1:]
    with pytest.raises(IndexError):
        table.sessions[3]
    assert table.num_calls == 6 and list(table.calls()) == list(trace.calls())
    assert table.infos == [session_info(s) for s in trace.sessions]
    assert [s for s in ["sys", "shared-file", "a:task", "a:o0", "b:r0", "c:q", "nowhere"] if table.shared(s)] \
        == ["sys", "shared-file"]
    # the compact form: b's turn 2 keeps one segment of turn 1's sequence and appends one
    assert table.keep.tolist() == [0, 3, 0, 2, 1, 0]
    assert table.append_start.tolist() == [0, 2, 3, 5, 6, 7, 9]
    again = pickle.loads(pickle.dumps(table))
    assert list(again.sessions) == trace.sessions and again.shared("sys") and not again.shared("a:o0")


def test_interleaved_sessions_are_loaded_whole_then_held_in_columns(tmp_path):
    calls = _calls()
    p = tmp_path / "t.jsonl"
    write_trace(p, [calls[0], calls[2], calls[1], calls[3], calls[4], calls[5]])
    assert list(load_table(p).sessions) == load_trace(p).sessions


def test_a_bad_file_gets_load_traces_error(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(header_line() + "\n" + json.dumps({"session_id": "a", "turn": 0, "prompt": [["s", 1]],
                                                    "output_tokens": -1}) + "\n")
    with pytest.raises(TraceFormatError) as loaded:
        load_trace(p)
    with pytest.raises(TraceFormatError) as tabled:
        load_table(p)
    assert str(tabled.value) == str(loaded.value) and ":2: output_tokens: " in str(loaded.value)


_ids = st.sampled_from(["sys", "tools", "f1", "f2", "[x]", "ü", "", "a b"])
_seg = st.tuples(_ids, st.integers(1, 5000))
_opt = st.one_of(st.none(), st.floats(0, 1e6, allow_nan=False, allow_infinity=False))
_tool = st.builds(ToolCall, st.sampled_from(["bash", "edit", "grep"]), st.sampled_from(["shell", "edit", "other"]),
                  st.floats(0, 1e4, allow_nan=False, allow_infinity=False))


@st.composite
def _sessions(draw):
    out = []
    for si in range(draw(st.integers(0, 5))):
        sid = draw(st.sampled_from(["s", "t", "ü[b]"])) + str(si)
        calls, prev = [], ()
        for turn in range(draw(st.integers(1, 5))):
            keep = draw(st.integers(0, len(prev)))  # grow the previous sequence, or diverge from it
            prompt = prev[:keep] + tuple(draw(st.lists(_seg, min_size=0 if keep else 1, max_size=3)))
            out_seg = draw(st.one_of(st.none(), st.sampled_from([f"{sid}:o{turn}", "sys"])))
            c = Call(sid, turn, prompt, draw(st.integers(1, 10**6)), out_seg, tuple(draw(st.lists(_tool, max_size=2))),
                     draw(_opt), draw(_opt), draw(_opt))
            calls.append(c)
            prev = prompt + (((out_seg, c.output_tokens),) if out_seg is not None else ())
        out.append(Session(sid, tuple(calls)))
    return out


@settings(max_examples=300, deadline=None)
@given(_sessions())
def test_any_sessions_come_back_equal_from_the_columns_and_sharing_is_exact(sessions):
    table = TraceTable.from_sessions(sessions, header={"k": 1}, source="x")
    assert list(table.sessions) == sessions and len(table.sessions) == len(sessions)
    assert table.first_prompts() == [s.calls[0].prompt for s in sessions]
    assert all(type(a.calls[k].output_tokens) is int for a in table.sessions for k in range(len(a.calls)))
    holders: dict[str, int] = {}
    for s in sessions:
        for seg in segment_ids(s):
            holders[seg] = holders.get(seg, 0) + 1
    assert {s for s in holders if table.shared(s)} == {s for s, n in holders.items() if n > 1}
    # a builder told which ids may be shared (as the index pass does) interns the rest per session
    told = TraceTable.from_sessions(sessions, may_share=lambda s: holders.get(s, 0) > 1)
    assert list(told.sessions) == sessions and told._shared == table._shared


def test_code_written_for_a_trace_gives_the_same_answers_on_a_table():
    trace = load_trace(DEFAULT_TRACE)
    table = TraceTable.from_trace(trace)
    small = Trace(trace.sessions[:12], trace.header, trace.source)
    assert analyze(TraceTable.from_trace(small), agents=4) == analyze(small, agents=4)
    a, b = ToolCallPredictor.fit(trace), ToolCallPredictor.fit(table)
    assert a.dists.keys() == b.dists.keys() and all(
        (a.dists[k].gaps == b.dists[k].gaps).all() for k in a.dists)


def test_a_table_holds_a_fraction_of_what_the_objects_hold():
    """Memory the trace holds once read (tracemalloc: allocations, not timing): the bundled trace
    takes 6.2-6.6 MB as objects and 0.7 MB as columns."""
    held = {}
    for read in (load_trace, load_table):
        tracemalloc.start()
        kept = read(DEFAULT_TRACE)
        held[read.__name__] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del kept
    assert held["load_table"] < 0.25 * held["load_trace"]


def test_filling_the_columns_reports_sessions_done(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    write_trace(p, [Call(f"s{i}", 0, (("sys", 10), (f"u{i}", 3)), 2) for i in range(2500)])
    seen = []
    table = load_table(p, columns_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1000, 2500), (2000, 2500), (2500, 2500)] and len(table.sessions) == 2500
    interleaved = tmp_path / "i.jsonl"
    calls = _calls()
    write_trace(interleaved, [calls[0], calls[2], calls[1], calls[3], calls[4], calls[5]])
    seen.clear()
    load_table(interleaved, columns_progress=lambda done, total: seen.append((done, total)))
    assert seen == [(3, 3)]
