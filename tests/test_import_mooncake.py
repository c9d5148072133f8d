"""Tests of the Mooncake importer (traces/importers/mooncake.py) on the conversation
trace in ../shared/data/traces/mooncake, plus synthetic malformed input."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from traces.importers.mooncake import BLOCK, HEADER, ImportReport, convert, main
from traces.reader import load_trace, write_trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
SRC = SHARED / "mooncake" / "conversation_trace.jsonl"

needs_data = pytest.mark.skipif(
    not SRC.is_file(), reason=f"Mooncake conversation trace not present at {SRC} (shared data folder is absent)"
)


@pytest.fixture(scope="module")
def conversation():
    return convert([SRC])


def _row(ts, L, O, h):
    return json.dumps({"timestamp": ts, "input_length": L, "output_length": O, "hash_ids": h})


# ------------------------------------------------------------------ the real trace


@needs_data
def test_counts(conversation):
    calls, report = conversation
    assert isinstance(report, ImportReport)
    assert report.files_read == 1 and report.lines_read == 12_031
    assert report.calls == len(calls) == 12_031
    assert report.rejected == []
    assert 1 < report.sessions < 12_031
    assert report.sessions + report.follow_ups == report.calls
    assert sum(report.calls_per_session.values()) == report.sessions
    assert sum(n * k for n, k in report.calls_per_session.items()) == report.calls
    assert report.shared_context_blocks == 1  # block 0: the system prompt, in every request
    assert report.max_parent_fanout == 11
    assert report.branches > 0
    # field.md: about 80% of a follow-up prompt is shared with its parent.
    assert 0.75 < report.figures["mean follow-up share shared with parent"] < 0.85
    # Calls are in file order and keep every length exactly.
    rows = [json.loads(line) for line in SRC.read_text().splitlines()]
    for c, r in zip(calls, rows):
        assert c.prompt_tokens == r["input_length"]
        assert [s for s, _ in c.prompt] == [f"mc:{h}" for h in r["hash_ids"]]
        assert all(n == BLOCK for _, n in c.prompt[:-1]) and 1 <= c.prompt[-1][1] <= BLOCK
        assert c.output_tokens == max(1, r["output_length"])
        assert c.timestamp_s == r["timestamp"] / 1000
        assert c.output_segment is None and c.tools == ()


@needs_data
def test_hand_checked_chain(conversation):
    """Lines 4 -> 1586 -> 1901 -> 2200: each extends the complete blocks of the one before
    (line 2200 re-sends line 1901's prompt: a regenerated answer)."""
    calls, _ = conversation
    rows = [json.loads(line) for line in SRC.read_text().splitlines()]
    chain = [4, 1586, 1901, 2200]
    for a, b in zip(chain, chain[1:]):
        ha, hb = rows[a - 1]["hash_ids"], rows[b - 1]["hash_ids"]
        full = rows[a - 1]["input_length"] // BLOCK
        assert hb[:full] == ha[:full]
    session = [c for c in calls if c.session_id == "mc-4"]
    assert [calls.index(c) + 1 for c in session] == chain
    assert [c.turn for c in session] == [0, 1, 2, 3]
    assert [c.prompt_tokens for c in session] == [2290, 2615, 3082, 3082]
    assert session[0].prompt[-1] == ("mc:45", 2290 - 4 * BLOCK)
    assert session[1].prompt[:4] == session[0].prompt[:4]  # 2048 tokens shared
    assert session[1].prompt[4] != session[0].prompt[4]
    assert [c.timestamp_s for c in session] == [0.0, 545.999, 642.0, 731.999]
    assert [c.gap_s for c in session] == [545.999, 96.001, 89.999, None]
    # The first three lines are first turns of three other sessions.
    assert [c.session_id for c in calls[:3]] == ["mc-1", "mc-2", "mc-3"]


@needs_data
def test_round_trip(conversation, tmp_path):
    calls, report = conversation
    out = tmp_path / "mc.jsonl"
    write_trace(out, calls, header=dict(HEADER))
    trace = load_trace(out)
    assert trace.num_calls == 12_031 and len(trace.sessions) == report.sessions
    key = lambda c: (c.session_id, c.turn)  # noqa: E731
    assert sorted(trace.calls(), key=key) == sorted(calls, key=key)


@needs_data
def test_cli(tmp_path):
    head = tmp_path / "head.jsonl"
    head.write_text("".join(SRC.read_text().splitlines(keepends=True)[:2000]))
    out = tmp_path / "mc.jsonl.gz"
    assert main([str(head), "-o", str(out)]) == 0
    trace = load_trace(out)
    assert trace.num_calls == 2000 and 1 < len(trace.sessions) < 2000
    assert trace.header["block_size"] == BLOCK and trace.header["converted_by"] == "traces.importers.mooncake"
    assert "license" in trace.header and "source" in trace.header
    assert trace.header["calls"] == 2000 and trace.header["sessions"] == len(trace.sessions)


# ------------------------------------------------------------------ synthetic


def test_sessions_branches_and_shared_context(tmp_path):
    src = tmp_path / "t.jsonl"
    src.write_text("\n".join([
        _row(0, 1100, 10, [0, 1, 2]),  # 1: session A, complete blocks [0, 1]
        _row(1000, 700, 5, [0, 9]),  # 2: shares only block 0 with line 1: new session B
        _row(2000, 1700, 20, [0, 1, 3, 4]),  # 3: extends line 1 -> A turn 1
        _row(3000, 1650, 20, [0, 1, 5, 6]),  # 4: extends line 1 again -> branch, new session
        _row(4000, 2100, 0, [0, 1, 3, 7, 8]),  # 5: extends line 3 (A's last) -> A turn 2
        _row(5000, 2100, 7, [0, 1, 3, 7, 8]),  # 6: same prompt again -> A turn 3
        _row(6000, 600, 5, [0, 11]),  # 7: extends line 2's complete block [0] only
        _row(7000, 600, 5, [0, 13]),  # 8: extends line 7's complete block [0] only
    ]) + "\n")
    calls, report = convert([src])  # block 0 has 4 successors: not shared context
    assert [c.session_id for c in calls] == ["mc-1", "mc-2", "mc-1", "mc-4", "mc-1", "mc-1", "mc-2", "mc-2"]
    assert [c.turn for c in calls] == [0, 0, 1, 0, 2, 3, 1, 2]
    assert report.branches == 1 and report.follow_ups == 5 and report.sessions == 3
    assert report.calls_per_session == {4: 1, 3: 1, 1: 1}
    assert report.shared_context_blocks == 0
    assert report.output_zero == 1 and calls[4].output_tokens == 1
    assert calls[0].gap_s == 2.0 and calls[2].gap_s == 2.0 and calls[4].gap_s == 1.0
    assert calls[2].prompt[:2] == calls[0].prompt[:2]
    assert report.follow_up_shares[0] == pytest.approx(1024 / 1700)
    assert report.follow_up_shares[2] == 1.0

    # With max_fanout 3, block 0 (4 successors) is shared context, like a system
    # prompt: lines 7 and 8 no longer continue anything.
    calls, report = convert([src], max_fanout=3)
    assert [c.session_id for c in calls] == ["mc-1", "mc-2", "mc-1", "mc-4", "mc-1", "mc-1", "mc-7", "mc-8"]
    assert report.shared_context_blocks == 1 and report.follow_ups == 3
    assert report.max_parent_fanout == 3  # block 1 of line 1 is followed by 2, 3 and 5


def test_malformed_rows_rejected(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join([
        _row(0, 1100, 10, [0, 1, 2]),
        "{oops",
        json.dumps({"timestamp": 1, "input_length": 10, "output_length": 1, "hash_ids": "0,1"}),
        _row(2, 10, 1, [0, "x"]),
        _row(3, 2000, 1, [0, 1]),  # 2 blocks cannot hold 2000 tokens
        _row(4, 512, 1, [0, 1]),  # 512 tokens fill one block: the second is empty
        json.dumps({"timestamp": 5, "input_length": 10, "hash_ids": [0]}),
        _row(6, 0, 1, [0]),
        _row(7, 10, -1, [0]),
        _row(True, 10, 1, [0]),
        "[1, 2]",
        "",
        _row(8000, 1500, 10, [0, 1, 7]),  # line 13: valid follow-up of line 1
    ]) + "\n")
    calls, report = convert([src])
    got = {int(w.rsplit(":", 1)[1]): r for w, r in report.rejected}
    assert all(w.startswith(f"{src}:") for w, _ in report.rejected)
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert got[2].startswith("not valid JSON")
    assert got[3].startswith("hash_ids: expected a non-empty array")
    assert got[4].startswith("hash_ids[1]: expected an integer")
    assert got[5].startswith("input_length 2000 does not fit 2 blocks")
    assert got[6].startswith("input_length 512 does not fit 2 blocks")
    assert got[7] == "output_length: missing"
    assert got[8].startswith("input_length: expected an integer >= 1")
    assert got[9].startswith("output_length: expected an integer >= 0")
    assert got[10].startswith("timestamp: expected a finite number")
    assert got[11] == "not a JSON object"
    assert len(calls) == 2 and [c.turn for c in calls] == [0, 1]
    assert calls[1].gap_s is None and calls[0].gap_s == 8.0
    assert "rejected: " in report.render()


def test_gzip_several_files_and_progress(tmp_path):
    a = tmp_path / "a.jsonl.gz"
    a.write_bytes(gzip.compress((_row(0, 600, 3, [0, 1]) + "\n" + _row(10, 1200, 3, [0, 1, 2]) + "\n").encode()))
    b = tmp_path / "b.jsonl"
    b.write_text(_row(0, 600, 3, [0, 1]) + "\n")
    seen: list[int] = []
    calls, report = convert([a, b], progress=seen.append)
    assert seen[-1] == a.stat().st_size + b.stat().st_size
    # Hash ids are remapped per file: ids and sessions get a per-file prefix.
    assert [c.session_id for c in calls] == ["mc0-1", "mc0-1", "mc1-1"]
    assert calls[0].prompt == (("mc0:0", 512), ("mc0:1", 88))
    assert calls[2].prompt == (("mc1:0", 512), ("mc1:1", 88))
    out = tmp_path / "o.jsonl"
    assert main([str(a), str(b), "-o", str(out)]) == 0
    assert load_trace(out).num_calls == 3


def test_missing_file_and_empty(tmp_path):
    calls, report = convert([tmp_path / "absent.jsonl"])
    assert calls == [] and report.rejected[0][0].endswith("absent.jsonl:0")
    assert "calls" in ImportReport().render()
    assert main([str(tmp_path / "absent.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 1
