"""The streaming reader (``traces.stream``): an index pass that validates like ``load_trace`` and
keeps per session only what a run needs first, then the sessions read again one at a time; and a
run fed that way (``cwsim.workload.Workload.from_index``) gives the same numbers as one fed the
whole trace."""

from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest

from cwsim.config import SimConfig
from cwsim.runner import DEFAULT_TRACE, simulate
from traces import Call, ToolCall, TraceFormatError, load_trace, write_trace
from traces.columnar import load_table
from traces.format import header_line
from traces.stream import SessionInfo, index_trace, iter_sessions, num_calls


def _calls() -> list[Call]:
    sys = ("sys", 40)
    return [
        Call("a", 0, (sys, ("a:task", 20)), 30, "a:o0", (ToolCall("bash", "shell", 1.5),), 1.5, 0.0),
        Call("a", 1, (sys, ("a:task", 20), ("a:o0", 30), ("a:r0", 12)), 8, "a:o1", (), None, 3.0),
        Call("b", 0, (sys, ("b:task", 7)), 5, None, (), 2.0, 1.0),
        Call("b", 1, (sys, ("b:task", 7), ("b:r0", 3)), 4, None, (), None, 4.0),
        Call("b", 2, (sys, ("shared-file", 16)), 4),
        Call("c", 0, (("shared-file", 16), ("c:q", 5)), 9, None, (), None, 0.5),
    ]


def test_the_index_keeps_what_a_run_needs_first_and_the_stream_gives_load_traces_sessions(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    write_trace(p, _calls(), header={"source": "unit"})
    ix = index_trace(p)
    assert ix.header == {"format": "cwtrace", "version": 2, "source": "unit"} and ix.source == str(p)
    assert ix.sessions == [
        SessionInfo("a", 2, 0.0, 1, 40 + 20 + 30 + 12 + 8 - 1, (("sys", 40), ("a:task", 20))),
        SessionInfo("b", 3, 1.0, 2, 40 + 16 + 4 - 1, (("sys", 40), ("b:task", 7))),
        SessionInfo("c", 1, 0.5, 0, 16 + 5 + 9 - 1, (("shared-file", 16), ("c:q", 5))),
    ]
    assert ix.num_calls == num_calls(ix) == 6 and num_calls(ix, 2) == 5 and num_calls(load_trace(p), 1) == 2
    # segments in two or more sessions' sequences: the system prompt and the file b and c both read
    assert [s for s in ["sys", "shared-file", "a:task", "a:o0", "b:r0", "c:q"] if ix.shared(s)] == ["sys", "shared-file"]
    assert list(iter_sessions(ix)) == load_trace(p).sessions
    assert [s.session_id for s in iter_sessions(ix, 2)] == ["a", "b"]
    assert list(iter_sessions(ix, 0)) == []
    with pytest.raises(TypeError, match="index the file again"):
        pickle.dumps(ix)


def test_turns_out_of_order_inside_a_session_still_stream(tmp_path):
    lines = [json.dumps(c.to_json()) for c in _calls()]
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join([lines[1], lines[0], lines[3], lines[4], lines[2], lines[5]]) + "\n")
    ix = index_trace(p)
    assert ix is not None and list(iter_sessions(ix)) == load_trace(p).sessions


def test_interleaved_sessions_are_not_streamed_and_a_run_reads_them_whole(tmp_path):
    calls = _calls()
    p = tmp_path / "t.jsonl"
    write_trace(p, [calls[0], calls[2], calls[1], calls[3], calls[4], calls[5]])  # a, b, a: interleaved
    assert index_trace(p) is None
    cfg = SimConfig(policy="vllm", kv_blocks=64, agents=2)
    assert _numbers(simulate(p, cfg)) == _numbers(simulate(load_trace(p), cfg))


@pytest.mark.parametrize("lines,where", [
    (["{", "x"], ":2: json: "),  # a bad line: the same error as load_trace, at once (after the header)
    ([{"session_id": "a", "turn": 0, "prompt": [["s", 1]], "output_tokens": 1},
      {"session_id": "a", "turn": 2, "prompt": [["s", 1]], "output_tokens": 1},
      {"session_id": "b", "turn": 0, "prompt": [["s", 1]], "output_tokens": -1}], ":4: output_tokens: "),
    ([{"session_id": "a", "turn": 0, "prompt": [["s", 1]], "output_tokens": 1},
      {"session_id": "a", "turn": 2, "prompt": [["s", 1]], "output_tokens": 1}], ":3: turn: "),  # a gap
    ([{"session_id": "a", "turn": 0, "prompt": [["s", 1]], "output_tokens": 1},
      {"session_id": "a", "turn": 1, "extends": 5, "output_tokens": 1}], ":3: extends: "),
    ([{"session_id": "a", "turn": 0, "prompt": [["s", 1]], "output_tokens": 1},
      {"session_id": "a", "turn": 0, "prompt": [["s", 1]], "output_tokens": 1}], ":3: turn: "),  # duplicate
    ([], ":0: trace: no calls"),
])
def test_the_index_rejects_what_load_trace_rejects_with_the_same_message(tmp_path, lines, where):
    p = tmp_path / "t.jsonl"
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in [header_line(), *lines]))
    with pytest.raises(TraceFormatError) as loaded:
        load_trace(p)
    with pytest.raises(TraceFormatError) as indexed:
        index_trace(p)
    assert str(indexed.value) == str(loaded.value) and where in str(loaded.value)


def test_a_file_changed_after_indexing_is_named(tmp_path):
    p = tmp_path / "t.jsonl"
    write_trace(p, _calls())
    ix = index_trace(p)
    write_trace(p, _calls()[:4])  # session b lost a call, c is gone
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:\d+: file: changed since it was indexed"):
        list(iter_sessions(ix))


def test_the_index_reports_progress_in_bytes(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    calls = [Call(f"s{i}", 0, (("sys", 10), (f"u{i}", 3)), 2) for i in range(9000)]
    write_trace(p, calls)
    seen = []
    index_trace(p, progress=lambda done, size: seen.append((done, size)))
    assert len(seen) == 2 and all(size == p.stat().st_size and 0 < done <= size for done, size in seen)


# ------------------------------------------------------------------ runs

def _numbers(result) -> dict:
    s = dict(result.summary)
    s.pop("wall_s")
    return s


@pytest.fixture(scope="module")
def synth_file(tmp_path_factory):
    """A generated trace of 24 sessions (sessions together in the file, compact lines)."""
    from traces.synth import fit, iter_sessions as synth_sessions, synthetic_header

    model = fit(load_trace(DEFAULT_TRACE))
    p = tmp_path_factory.mktemp("synth") / "synth.jsonl.gz"
    write_trace(p, (c for s in synth_sessions(model, 24, 3) for c in s.calls), synthetic_header(model, 24, 3, "x"))
    return p


@pytest.mark.parametrize("policy,kw", [
    ("vllm", dict(agents=6)),
    ("cachewise", dict(agents=6, max_sessions=15)),
    ("belady", dict(agents=4)),
    ("tokencake", dict(agents=6, max_sessions=10)),
    ("vllm", dict(arrivals="poisson", rate=0.05)),
    ("lfu", dict(arrivals="trace")),
])
def test_a_streamed_run_gives_the_numbers_of_a_run_on_the_whole_trace(synth_file, policy, kw):
    """Sessions made ready as the run reaches them, and a finished session's own segment ids and block
    hashes forgotten: the same summary, bit for bit, as the whole trace in memory, and as a run that
    forgets nothing (the eviction log keeps every hash)."""
    cfg = SimConfig(policy=policy, kv_blocks=6000, **kw)
    streamed = simulate(synth_file, cfg)
    assert streamed.summary["evicted_blocks"] > 0 and streamed.summary["requests"] == num_calls(
        load_trace(synth_file), kw.get("max_sessions"))
    assert _numbers(streamed) == _numbers(simulate(load_trace(synth_file), cfg))
    assert _numbers(streamed) == _numbers(simulate(synth_file, cfg, eviction_log=True))
    assert _numbers(streamed) == _numbers(simulate(load_table(synth_file), cfg))  # sessions built from columns


def test_recorded_starts_out_of_file_order_are_served_by_reading_ahead(tmp_path):
    """``--arrivals trace`` starts the file's third session first: the run reads ahead to it and keeps
    the two before it until their turn; the numbers are those of the whole trace."""
    start = {"a": 10.0, "b": 11.0, "c": 0.5}
    late = [replace(c, timestamp_s=start[c.session_id] + c.turn) for c in _calls()]
    p = tmp_path / "t.jsonl"
    write_trace(p, late)
    cfg = SimConfig(policy="vllm", kv_blocks=8, arrivals="trace")
    streamed = simulate(p, cfg)
    assert streamed.summary["requests"] == 6 and streamed.summary["evicted_blocks"] > 0
    assert _numbers(streamed) == _numbers(simulate(load_trace(p), cfg))


def test_a_gzip_file_cut_short_is_one_error_line(tmp_path):
    p = tmp_path / "t.jsonl.gz"
    write_trace(p, _calls())
    p.write_bytes(p.read_bytes()[:-12])
    with pytest.raises(TraceFormatError, match=r"t\.jsonl\.gz:0: gzip: unreadable"):
        index_trace(p)


def test_each_call_knows_where_its_sessions_own_blocks_start(tmp_path):
    """``private_from``: the first token in a segment no other session holds (from there on no other
    session can ask for the blocks); the same from the whole trace and from the index. Session b's
    last call holds only shared segments in its prompt, then its own (unnamed) output."""
    from cwsim.workload import Workload

    p = tmp_path / "t.jsonl"
    write_trace(p, _calls())
    for wl in (Workload.from_trace(load_trace(p)), Workload.from_index(index_trace(p))):
        states = list(wl.states())
        assert [[c.private_from for c in s.calls] for s in states] == [[40, 40], [40, 40, 56], [16]]
        assert [sorted(s.private_segments) for s in states] == [
            ["a:o0", "a:o1", "a:r0", "a:task"], ["\0out:1:0", "\0out:1:1", "\0out:1:2", "b:r0", "b:task"],
            ["\0out:2:0", "c:q"]]
        assert [s.shared_prefix_tokens for s in states] == [40, 40, 0]
        for s in states:
            wl.release(s)
        assert sorted(wl._intern.ids) == ["shared-file", "sys"]


def test_single_call_sessions_number_their_own_blocks_without_hashing_and_the_numbers_stay(tmp_path):
    """Sessions of one call (a Mooncake-like import): past the prefix they share (a system prompt,
    one of five documents), their blocks get ids without being hashed; the summary is the one of
    the run that hashes every block (the eviction log keeps every hash) and of the whole trace."""
    calls = [Call(f"r{i}", 0, (("sys", 500), (f"doc{i % 5}", 64 * (i % 5) + 40), (f"q{i}", 300 + i)), 50)
             for i in range(80)]
    p = tmp_path / "single.jsonl"
    write_trace(p, calls)
    cfg = SimConfig(policy="vllm", kv_blocks=300, arrivals="poisson", rate=2.0)
    fast = simulate(p, cfg)
    assert fast.summary["evicted_blocks"] > 0 and fast.summary["cached_prompt_tokens"] > 80 * 496 * 0.5
    assert _numbers(fast) == _numbers(simulate(p, cfg, eviction_log=True))
    assert _numbers(fast) == _numbers(simulate(load_trace(p), cfg))


def test_a_streamed_file_that_changes_mid_run_stops_the_run_with_a_partial_summary(tmp_path):
    """The run reads sessions as it reaches them: if the file is cut short meanwhile, the error names
    the file, and the results folder holds a summary marked partial with the calls finished so far."""
    p = tmp_path / "t.jsonl"
    calls = [Call(f"s{i}", t, (("sys", 40), (f"u{i}", 10 + t)), 5, None, (), 1.0) for i in range(6) for t in range(3)]
    write_trace(p, calls)
    ix = index_trace(p)
    write_trace(p, calls[:9])  # sessions 3..5 gone
    out = tmp_path / "run"
    with pytest.raises(TraceFormatError, match=r"t\.jsonl:\d+: file: changed since it was indexed"):
        simulate(ix, SimConfig(policy="vllm", kv_blocks=64, agents=1), out)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True and "changed since it was indexed" in summary["stopped_by"]
    assert summary["requests"] == 9 and len((out / "requests.csv").read_text().splitlines()) == 1 + 9


@pytest.mark.parametrize("trace", ["single", "synth"])
def test_the_unbounded_pool_drops_finished_sessions_own_blocks_and_the_numbers_stay(tmp_path, synth_file, trace):
    """``infinite`` (the pool that grows instead of evicting) drops a finished session's own blocks
    (``BlockPool.drop_unreachable``) so that it does not grow with the trace: the summary is the one
    of the run that keeps every block (the eviction log turns dropping off), bit for bit."""
    if trace == "single":  # one call a session, a shared prefix whose blocks get new ids mid-trace
        p = tmp_path / "single.jsonl"
        write_trace(p, [Call(f"r{i}", 0, (("sys", 500), (f"doc{i % 5}", 64 * (i % 5) + 40), (f"q{i}", 300 + i)), 50)
                        for i in range(80)])
        cfg = SimConfig(policy="infinite", arrivals="poisson", rate=2.0)
    else:
        p, cfg = synth_file, SimConfig(policy="infinite", agents=6)
    kept = simulate(p, cfg, eviction_log=True)
    assert kept.summary["cached_prompt_tokens"] > 0 and kept.summary["evicted_blocks"] == 0
    assert _numbers(simulate(p, cfg)) == _numbers(kept)
