"""The compact call form (format version 2): a call lists only what it appends to its
session's previous call (prompt + output); the reader gives the same trace as from full lines."""

import json

import pytest

from tests.conftest import agent_trace
from traces import Call, Session, TraceFormatError, load_trace, write_trace
from traces.reader import sequence


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_compact_and_full_files_load_to_the_same_trace(tmp_path):
    trace = agent_trace(6, 10, seed=4)
    full, compact = tmp_path / "full.jsonl", tmp_path / "compact.jsonl"
    write_trace(full, trace.calls(), {"source": "unit"}, compact=False)
    write_trace(compact, trace.calls(), {"source": "unit"})
    a, b = load_trace(full), load_trace(compact)
    assert a.sessions == b.sessions == trace.sessions
    assert a.header["version"] == 1 and b.header["version"] == 2
    lines = _lines(compact)[1:]
    assert all("prompt" in d for d in lines if d["turn"] == 0)
    later = [d for d in lines if d["turn"] > 0]
    assert later and all("prompt" not in d and d["extends"] >= 1 for d in later)
    # appending sessions: each line lists only the new tool output (the previous output is extended)
    assert all(len(d["append"]) == 1 for d in later)
    # the file grows linearly with a session's length, not quadratically
    long = agent_trace(2, 60, seed=4)
    write_trace(full, long.calls(), compact=False)
    write_trace(compact, long.calls())
    assert compact.stat().st_size < full.stat().st_size / 5


def test_a_diverging_prompt_keeps_the_shared_segments_and_lists_the_rest(tmp_path):
    calls = [Call("s", 0, (("sys", 100), ("u", 20), ("ctx", 300)), 10, "o0"),
             Call("s", 1, (("sys", 100), ("u", 20), ("ctx", 120), ("new", 5)), 10),  # cut inside ctx
             Call("s", 2, (("sys", 100), ("summary", 50)), 10)]  # compaction: diverges after sys
    p = tmp_path / "t.jsonl"
    write_trace(p, calls)
    lines = _lines(p)[1:]
    assert lines[1]["extends"] == 2 and lines[1]["append"] == [["ctx", 120], ["new", 5]]
    assert lines[2]["extends"] == 1 and lines[2]["append"] == [["summary", 50]]
    assert load_trace(p).sessions == [Session("s", tuple(calls))]


def test_out_of_order_and_interleaved_compact_lines(tmp_path):
    trace = agent_trace(3, 4, seed=1)
    p = tmp_path / "t.jsonl"
    write_trace(p, trace.calls())
    header, *lines = p.read_text().splitlines()
    p.write_text("\n".join([header, *reversed(lines)]) + "\n")
    assert [s.calls for s in load_trace(p).sessions] == [s.calls for s in reversed(trace.sessions)]


def test_sequence_is_prompt_then_output_segment():
    assert sequence(Call("s", 0, (("a", 1),), 3, "o")) == (("a", 1), ("o", 3))
    assert sequence(Call("s", 0, (("a", 1),), 3)) == (("a", 1),)


HEAD = '{"format":"cwtrace","version":2}'
T0 = '{"session_id":"s","turn":0,"prompt":[["a",10]],"output_tokens":5,"output_segment":"o"}'


@pytest.mark.parametrize("line, where", [
    ('{"session_id":"s","turn":1,"extends":3,"append":[],"output_tokens":5}',
     "3: extends: 3 segments, but the previous call (turn 0) has 2 (prompt + output segment)"),
    ('{"session_id":"s","turn":1,"extends":1,"prompt":[["a",1]],"output_tokens":5}',
     "3: extends: give either prompt (full form) or extends + append (compact form), not both"),
    ('{"session_id":"s","turn":1,"extends":-1,"output_tokens":5}',
     "3: extends: expected an integer >= 0 (segments kept from the previous call), got integer -1"),
    ('{"session_id":"s","turn":1,"extends":0,"append":[],"output_tokens":5}',
     "3: append: empty with extends 0 (a call has at least one prompt segment)"),
    ('{"session_id":"s","turn":1,"extends":1,"append":[["b",0]],"output_tokens":5}',
     "3: append[0][1]: expected an integer n_tokens >= 1, got integer 0"),
    ('{"session_id":"s","turn":1,"extends":2,"append":[["b",9999999]],"output_tokens":5}',
     "3: append: a prompt of 10,000,014 tokens exceeds the limit of 10,000,000 tokens per call"),
])
def test_bad_compact_lines_name_line_and_field(tmp_path, line, where):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([HEAD, T0, line]) + "\n")
    with pytest.raises(TraceFormatError) as ei:
        load_trace(p)
    assert str(ei.value) == f"{p}:{where}"
    resolved_late = "3: extends: 3" in where or "exceeds" in where  # found when the session is assembled
    trace = None if resolved_late else load_trace(p, skip_bad=True)
    if trace is not None:  # a line rejected while reading: the session keeps turn 0
        assert [len(s.calls) for s in trace.sessions] == [1]


def test_compact_turn_zero_and_a_resolution_error_in_lenient_mode(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([HEAD, '{"session_id":"s","turn":0,"extends":1,"output_tokens":5}']) + "\n")
    with pytest.raises(TraceFormatError, match=r":2: extends: turn 0 has no previous call to extend"):
        load_trace(p)
    p.write_text("\n".join([HEAD, T0, '{"session_id":"s","turn":1,"extends":3,"output_tokens":5}',
                            T0.replace('"s"', '"t"')]) + "\n")
    trace = load_trace(p, skip_bad=True)
    assert [s.session_id for s in trace.sessions] == ["t"]
    assert len(trace.rejected) == 1 and trace.rejected[0].line == 3
    assert trace.rejected[0].problem.endswith("session 's' dropped")


def test_version_1_files_stay_valid(tmp_path):
    p = tmp_path / "v1.jsonl"
    p.write_text('{"format":"cwtrace","version":1}\n' + T0 + "\n")
    assert load_trace(p).sessions[0].calls[0].prompt == (("a", 10),)


def test_load_reports_progress_in_bytes(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    write_trace(p, agent_trace(100, 50, seed=2).calls())  # 5,000 calls: past one progress interval
    seen = []
    trace = load_trace(p, progress=lambda done, size: seen.append((done, size)))
    assert trace.num_calls == 5000
    assert seen and all(size == p.stat().st_size and 0 < done <= size for done, size in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
