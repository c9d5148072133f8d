"""``traces.transform.shrink``: a trace brought to CPU-replay size, its shape kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from traces.format import Call, Session, ToolCall, Trace
from traces.reader import load_trace, write_trace
from traces.transform import shrink

BUNDLED = Path(__file__).resolve().parents[1] / "traces" / "data" / "miniswe-deepseek.jsonl.gz"


def _session(sid="s"):
    t = (ToolCall("bash", "test", 3.0),)
    return Session(sid, (
        Call(sid, 0, (("sys", 95), (f"{sid}:task", 400)), 41, f"{sid}:o0", t, gap_s=30.0),
        # the importer counted the answer as 43 tokens in the next prompt, the call generated 41
        Call(sid, 1, (("sys", 95), (f"{sid}:task", 400), (f"{sid}:o0", 43), (f"{sid}:r0", 9)), 7, f"{sid}:o1", t,
             gap_s=2.0),
        Call(sid, 2, (("sys", 95), (f"{sid}:task", 400), (f"{sid}:o0", 43), (f"{sid}:r0", 9), (f"{sid}:o1", 7)),
             5, f"{sid}:o2", t),
    ))


def test_every_segment_scales_alike_and_answers_match_what_the_call_generates():
    small = shrink(Trace([_session()], source="hand"), token_scale=10, max_gap_s=20.0)
    c0, c1, c2 = small.sessions[0].calls
    assert c0.prompt == (("sys", 9), ("s:task", 40)) and c0.output_tokens == 4 and c0.gap_s == 20.0
    assert c1.prompt == (("sys", 9), ("s:task", 40), ("s:o0", 4), ("s:r0", 1)) and c1.output_tokens == 1
    assert c1.gap_s == 2.0 and c1.tools == (ToolCall("bash", "test", 3.0),)
    assert c2.prompt[-1] == ("s:o1", 1) and c2.gap_s == 3.0  # no gap recorded: the tools' durations
    assert small.source == "hand (tokens / 10, gaps <= 20 s)"


def test_sessions_and_turns_are_cut_from_the_front():
    tr = Trace([_session("a"), _session("b"), _session("c")], header={"format": "cwtrace", "sessions": 3, "calls": 9})
    small = shrink(tr, max_sessions=2, max_turns=2)
    assert [s.session_id for s in small.sessions] == ["a", "b"]
    assert [len(s.calls) for s in small.sessions] == [2, 2]
    # token_scale 1: only the answer is cut to what its call generates
    assert small.sessions[0].calls[1].prompt == (("sys", 95), ("a:task", 400), ("a:o0", 41), ("a:r0", 9))
    assert small.header["sessions"] == 2 and small.header["calls"] == 4
    assert small.header["shrunk"] == "first 2 sessions, first 2 turns"


@pytest.mark.parametrize("kw,msg", [({"token_scale": 0}, "token_scale"), ({"token_scale": 2.5}, "token_scale"),
                                    ({"max_turns": 0}, "max_turns"), ({"max_sessions": -1}, "max_sessions"),
                                    ({"max_gap_s": -1.0}, "max_gap_s")])
def test_bad_arguments_name_themselves(kw, msg):
    with pytest.raises(ValueError, match=msg):
        shrink(Trace([_session()]), **kw)


def test_the_bundled_trace_shrunk_keeps_its_shared_prefixes_and_writes_back(tmp_path):
    full = load_trace(BUNDLED)
    small = shrink(full, token_scale=10, max_turns=24, max_sessions=16, max_gap_s=20.0)
    assert len(small.sessions) == 16 and small.num_calls == 16 * 24
    for s in small.sessions:  # each prompt still extends the one before it
        for a, b in zip(s.calls, s.calls[1:]):
            assert b.prompt[:len(a.prompt)] == a.prompt
    f = tmp_path / "small.jsonl"
    write_trace(f, small.calls(), small.header)
    back = load_trace(f)
    assert [c.prompt for c in back.calls()] == [c.prompt for c in small.calls()]
    assert back.header["calls"] == 16 * 24
