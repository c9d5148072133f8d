"""Tests of the LMCache agent-trace importer (traces/importers/lmcache_agent.py)
on the real proxy logs in ../shared/data/traces/lmcache-agent-trace/miniswe,
and on small synthetic logs written here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from traces.importers.lmcache_agent import (
    HEADER,
    SYSTEM_TOKENS,
    ImportReport,
    convert,
    estimate_tokens,
    main,
)
from traces.reader import load_trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
SRC = SHARED / "lmcache-agent-trace" / "miniswe"

needs_data = pytest.mark.skipif(
    not SRC.is_dir(), reason=f"real traces not present at {SRC} (shared data folder is absent)"
)

# Hand-checked session: 6 rows, not in timestamp order in the file.
ONE = "189f0222310bd8eee310f204e91b9c84"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def converted():
    if not SRC.is_dir():
        pytest.skip(f"real traces not present at {SRC}")
    return convert([SRC])


def _session(calls, sid):
    out = [c for c in calls if c.session_id == sid]
    assert [c.turn for c in out] == list(range(len(out)))
    return out


# --------------------------------------------------------------------------- real data


@needs_data
def test_whole_data_set(converted):
    calls, report = converted
    assert isinstance(report, ImportReport)
    assert report.files_read == 20 and report.sessions == 20
    assert report.calls == len(calls) == report.rows == 402
    assert report.rejected == []
    assert report.non_append_only == 0
    assert report.format_errors == 6
    assert sum(report.tool_categories.values()) == 402 - 6
    text = report.render()
    assert "sessions" in text and "format errors" in text


@needs_data
def test_hand_checked_session(converted):
    calls, _ = converted
    path = SRC / f"{ONE}.jsonl"
    rows = _rows(path)
    stamps = [r["timestamp"] for r in rows]
    assert stamps != sorted(stamps)  # the file is not in call order
    rows.sort(key=lambda r: r["timestamp"])
    s = _session(calls, ONE)
    assert len(s) == 6
    # Turn order = timestamp order; timestamp_s is the request time in seconds.
    assert [c.timestamp_s for c in s] == [r["timestamp"] / 1e6 for r in rows]
    # Prompt k: system placeholder, task, then (output, observation) pairs.
    assert [len(c.prompt) for c in s] == [2, 4, 6, 8, 10, 12]
    assert s[0].prompt[0][1] == SYSTEM_TOKENS
    assert s[0].prompt[1] == (s[0].prompt[1][0], estimate_tokens(rows[0]["input"]))
    assert s[0].prompt[1][1] == 1270  # 5080 characters / 4
    for k, (prev, cur) in enumerate(zip(s, s[1:])):
        # Call k+1 extends call k's prompt + output by one observation.
        assert cur.prompt[: len(prev.prompt)] == prev.prompt
        assert cur.prompt[len(prev.prompt)] == (prev.output_segment, prev.output_tokens)
        assert len(cur.prompt) == len(prev.prompt) + 2
        new_obs = rows[k + 1]["input"][len(rows[k]["input"]) + 2 :]
        assert cur.prompt[-1][1] == estimate_tokens(new_obs)
        assert prev.output_tokens == estimate_tokens(rows[k]["output"])
    # Tools (commands read by hand): grep, grep, grep, sed -i, grep, submit.
    assert [[t.category for t in c.tools] for c in s] == [
        ["grep"], ["grep"], ["grep"], ["edit"], ["grep"], ["submit"]
    ]
    assert all(t.name == "bash" for c in s for t in c.tools)
    # gap_s = interval to the next request; the last call has none.
    for k in range(5):
        assert s[k].gap_s == pytest.approx((rows[k + 1]["timestamp"] - rows[k]["timestamp"]) / 1e6)
        assert s[k].tools[0].duration_s == s[k].gap_s
    assert s[5].gap_s is None and s[5].tools[0].duration_s == 0.0
    assert s[0].gap_s == pytest.approx(2.513449)
    assert all(c.latency_s is None for c in s)


@needs_data
def test_every_session_append_only(converted):
    calls, _ = converted
    by: dict[str, list] = {}
    for c in calls:
        by.setdefault(c.session_id, []).append(c)
    for sc in by.values():
        ts = [c.timestamp_s for c in sc]
        assert ts == sorted(ts)
        for prev, cur in zip(sc, sc[1:]):
            n = len(prev.prompt)
            assert cur.prompt[:n] == prev.prompt
            assert cur.prompt[n] == (prev.output_segment, prev.output_tokens)
            assert cur.gap_s is None or cur.gap_s >= 0


@needs_data
def test_cross_session_system_segment(converted):
    calls, _ = converted
    firsts = [c for c in calls if c.turn == 0]
    assert len(firsts) == 20
    assert len({c.prompt[0] for c in firsts}) == 1  # same id and count everywhere
    assert firsts[0].prompt[0][0].startswith("sys:")
    # Task messages are shared exactly where the logged first inputs are equal
    # (two sessions of the data run the same task: 19 distinct tasks).
    distinct = {min(_rows(f), key=lambda r: r["timestamp"])["input"] for f in SRC.glob("*.jsonl")}
    assert len(distinct) == 19
    assert len({c.prompt[1][0] for c in firsts}) == len(distinct)
    # Without the placeholder only those equal tasks are shared.
    calls0, report0 = convert([SRC], system_tokens=0)
    assert report0.system_tokens == 0
    firsts0 = [c for c in calls0 if c.turn == 0]
    assert len({c.prompt[0][0] for c in firsts0}) == len(distinct)
    assert all(c.prompt[0][0].startswith("user:") for c in firsts0)


@needs_data
def test_decode_subtraction(converted):
    calls, _ = converted
    calls2, report2 = convert([SRC / f"{ONE}.jsonl"], decode_s_per_token=0.005)
    base = _session(calls, ONE)
    assert report2.decode_s_per_token == 0.005
    for a, b in zip(base, calls2):
        if a.gap_s is None:
            assert b.gap_s is None
        else:
            assert b.gap_s == pytest.approx(max(0.0, a.gap_s - a.output_tokens * 0.005), abs=1e-6)


@needs_data
def test_deterministic_and_cli(tmp_path, converted):
    calls, _ = converted
    again, _ = convert(sorted(SRC.glob("*.jsonl"), reverse=True))  # file order does not matter
    assert [c.to_line() for c in calls] == [c.to_line() for c in again]
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl.gz"
    assert main([str(SRC), "-o", str(a)]) == 0
    assert main([str(SRC), "-o", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes()
    trace = load_trace(a)
    assert trace.num_calls == 402 and len(trace.sessions) == 20
    for key in ("source", "license", "converted_by"):
        assert trace.header[key] == HEADER[key]
    assert [c.to_line() for c in trace.calls()] == [c.to_line() for c in calls]


@needs_data
def test_no_text_leak(tmp_path):
    out = tmp_path / "t.jsonl"
    assert main([str(SRC), "-o", str(out)]) == 0
    written = out.read_text()
    # Any common substring of 40 characters holds a 20-character window of the
    # source text starting at a multiple of 20: look those up first.
    windows = {written[i : i + 20] for i in range(len(written) - 19)}
    texts: list[str] = []
    for f in sorted(SRC.glob("*.jsonl")):
        rows = _rows(f)
        by: dict[str, str] = {}
        for r in rows:
            if len(r["input"]) > len(by.get(r["session_id"], "")):
                by[r["session_id"]] = r["input"]  # the longest input holds all the others
            texts.append(r["output"])
        texts.extend(by.values())
    checked = 0
    for text in texts:
        for i in range(0, len(text) - 19, 20):
            checked += 1
            if text[i : i + 20] in windows:
                for j in range(max(0, i - 20), i + 1):
                    piece = text[j : j + 40]
                    assert len(piece) < 40 or piece not in written, "source text leaked into the trace"
    assert checked > 30_000  # about 800k characters of distinct source text


# --------------------------------------------------------------------------- synthetic logs


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _row(ts, inp, out, sid="s1") -> str:
    return json.dumps({"timestamp": ts, "input": inp, "output": out, "session_id": sid})


def _out(cmd: str) -> str:
    return f"THOUGHT: synthetic.\n\n```bash\n{cmd}\n```"


def test_malformed_rows_rejected_with_line(tmp_path):
    t0 = 1_000_000_000
    p = _write(
        tmp_path / "bad.jsonl",
        [
            _row(t0, "task A", _out("ls")),
            "this is not json",
            "[1, 2]",
            json.dumps({"timestamp": t0 + 1, "output": "x", "session_id": "s1"}),
            json.dumps({"timestamp": "noon", "input": "a", "output": "x", "session_id": "s1"}),
            _row(t0 + 2, "", "x"),
            _row(t0 + 3, "a", "x", sid=""),
            json.dumps({"timestamp": t0 + 4, "input": "a", "output": None, "session_id": "s1"}),
            "",
            _row(t0 + 2_000_000, "task A\n\nobs 1", _out("cat f.py")),
        ],
    )
    calls, report = convert([p])
    where = [w for w, _ in report.rejected]
    assert where == [f"{p}:{n}" for n in (2, 3, 4, 5, 6, 7, 8)]
    reasons = [r for _, r in report.rejected]
    assert reasons[0].startswith("not valid JSON")
    assert reasons[1] == "not a JSON object"
    assert reasons[2] == "input: missing"
    assert reasons[3].startswith("timestamp:")
    assert reasons[4] == "input: empty"
    assert reasons[5].startswith("session_id:")
    assert reasons[6].startswith("output:")
    assert report.rows == 9 and report.calls == 2 == len(calls)
    assert [t.category for c in calls for t in c.tools] == ["find", "read"]
    assert calls[0].gap_s == 2.0
    assert f"rejected: {p}:2: not valid JSON" in report.render()


def test_non_append_only_and_format_errors(tmp_path):
    t = 5_000_000
    lines = [
        _row(t * 1, "sys-less task", _out("grep -rn foo .")),
        _row(t * 2, "sys-less task\n\nobs one", "no command block here"),
        _row(t * 3, "sys-less task\n\nobs one\n\nformat error msg", _out("sed -i s/a/b/ x.py")),
        # Not an extension: the context was cut back to the task.
        _row(t * 4, "sys-less task\n\nsummary", _out("pytest -q")),
        _row(t * 5, "sys-less task\n\nsummary\n\nobs four", _out("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT")),
    ]
    p = _write(tmp_path / "s.jsonl", list(reversed(lines)))  # file order reversed
    calls, report = convert([p], system_tokens=50)
    assert report.non_append_only == 1
    assert report.format_errors == 1
    assert [[t.category for t in c.tools] for c in calls] == [["grep"], [], ["edit"], ["test"], ["submit"]]
    assert [len(c.prompt) for c in calls] == [2, 4, 6, 4, 6]
    c0, c1, c2, c3, c4 = calls
    assert c2.prompt[:4] == c1.prompt
    # Call 3 keeps system + task, then the previous output (at a new place, so
    # under a new chained id) and the new message.
    assert c3.prompt[:2] == c0.prompt
    assert c3.prompt[2][1] == c2.output_tokens and c3.prompt[2][0].startswith("asst:")
    assert c3.prompt[2][0] not in {seg for c in (c0, c1, c2) for seg, _ in c.prompt} | {c2.output_segment}
    assert c4.prompt[:4] == c3.prompt and c4.prompt[4][0] == c3.output_segment
    assert c0.prompt[0] == (c0.prompt[0][0], 50)
    assert c0.prompt[1][1] == estimate_tokens("sys-less task")
    assert [c.gap_s for c in calls] == [5.0, 5.0, 5.0, 5.0, None]


def test_equal_texts_equal_ids_and_counts(tmp_path):
    p = _write(
        tmp_path / "two.jsonl",
        [
            _row(1_000_000, "same task", _out("ls"), sid="a"),
            _row(2_000_000, "same task", _out("ls"), sid="b"),
            _row(3_000_000, "same task\n\nobs", _out("ls -la"), sid="a"),
            _row(4_000_000, "same task\n\nobs", _out("ls -l"), sid="b"),
        ],
    )
    calls, report = convert([p])
    a = [c for c in calls if c.session_id == "a"]
    b = [c for c in calls if c.session_id == "b"]
    assert a[0].prompt == b[0].prompt and a[0].output_segment == b[0].output_segment
    assert a[1].prompt == b[1].prompt  # same history so far
    assert a[1].output_segment != b[1].output_segment  # outputs differ
    assert report.sessions == 2
    for c in calls:
        text = json.dumps(c.to_json())
        assert "same task" not in text and "obs" not in text


def test_gzip_output_and_empty_input(tmp_path):
    p = _write(tmp_path / "g.jsonl", [_row(0, "task", _out("ls"))])
    out = tmp_path / "o.jsonl.gz"
    assert main([str(p), "-o", str(out)]) == 0
    with gzip.open(out, "rt") as f:
        assert json.loads(f.readline())["converted_by"] == "traces.importers.lmcache_agent"
    assert main([str(tmp_path / "nothing"), "-o", str(tmp_path / "x.jsonl")]) == 1
