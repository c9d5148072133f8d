"""Tests of the TraceLab importer (traces/importers/tracelab.py) on the 19 example
rows in ../shared/data/traces/tracelab-example, plus synthetic malformed input."""

from __future__ import annotations

import gzip
import json
import re
from datetime import datetime
from pathlib import Path

import pytest

from traces.format import Call
from traces.importers.tracelab import CATEGORIES, ImportReport, convert, main, tool_category
from traces.reader import load_trace

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
SRC = SHARED / "tracelab-example"
SANITIZED = SRC / "round_trace.sanitized.jsonl"
DERIVED = SRC / "round_trace.derived.jsonl"

needs_data = pytest.mark.skipif(
    not SANITIZED.is_file(), reason=f"TraceLab example rows not present at {SRC} (shared data folder is absent)"
)

SEG_RE = re.compile(r"^tl:[0-9a-f]{12}:(ext|\d+|\d+:out)$")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sessions(calls: list[Call]) -> dict[str, list[Call]]:
    out: dict[str, list[Call]] = {}
    for c in calls:
        out.setdefault(c.session_id, []).append(c)
    return out


def _shared(prev: Call, cur: Call) -> int:
    seq = list(prev.prompt) + [(prev.output_segment, prev.output_tokens)]
    n = 0
    for (a, na), (b, nb) in zip(seq, cur.prompt):
        if a != b:
            break
        n += min(na, nb)
        if na != nb:
            break
    return n


@pytest.fixture(scope="module")
def sanitized():
    return convert([SANITIZED])


# ------------------------------------------------------------------ the example rows


@needs_data
def test_counts_and_round_trip(sanitized, tmp_path):
    calls, report = sanitized
    assert isinstance(report, ImportReport)
    assert (report.files_read, report.lines_read, report.calls, report.sessions) == (1, 19, 19, 2)
    assert report.rejected == []
    assert report.token_mismatch == 0 and report.prefix_clamped == 0
    assert report.external_prefix_sessions == 2  # both sessions start with a cached system prompt
    rows = _rows(SANITIZED)
    for c, r in zip(calls, rows):  # file order is kept
        assert c.prompt_tokens == r["input_tokens_total"]
        assert c.output_tokens == r["output_tokens"]
        assert c.prompt[-1][1] == r["newly_append_tokens"]
        assert all(SEG_RE.match(s) for s, _ in c.prompt)
    out = tmp_path / "tl.jsonl.gz"
    assert main([str(SANITIZED), "-o", str(out), "-q"]) == 0
    trace = load_trace(out)
    assert trace.header["converted_by"] == "traces.importers.tracelab"
    assert "license" in trace.header and "source" in trace.header
    assert sorted(trace.calls(), key=lambda c: (c.session_id, c.turn)) == sorted(
        calls, key=lambda c: (c.session_id, c.turn)
    )


@needs_data
def test_claude_session_hand_checked(sanitized):
    calls, _ = sanitized
    claude = [c for c in calls if c.session_id.startswith("claude:")]
    assert [c.turn for c in claude] == list(range(10))
    assert sum(c.prompt_tokens for c in claude) == 418_193
    assert sum(c.output_tokens for c in claude) == 9_423
    key = claude[0].prompt[0][0].split(":")[1]
    ext, r0, r1, r2 = (f"tl:{key}:{x}" for x in ("ext", 0, 1, 2))
    # Round 0: 27,217 tokens cached from outside the session + 5,055 new.
    assert claude[0].prompt == ((ext, 27217), (r0, 5055))
    assert claude[0].output_segment == f"tl:{key}:0:out"
    # Round 1 reads 29,380 cached tokens: the cut falls inside round 0's new segment.
    assert claude[1].prompt == ((ext, 27217), (r0, 2163), (r1, 6360))
    # Round 2 reads 35,738 = round 1's prompt minus 2 tokens.
    assert claude[2].prompt == ((ext, 27217), (r0, 2163), (r1, 6358), (f"tl:{key}:2", 2854))
    rows = [r for r in _rows(SANITIZED) if r["provider"] == "claude"]
    for prev, cur, row in zip(claude, claude[1:], rows[1:]):
        assert _shared(prev, cur) == row["prefix_tokens"]  # sharing is exactly the cache read
        assert cur.prompt[: len(cur.prompt) - 2] == prev.prompt[: len(cur.prompt) - 2]
    # Claude's cache read never reaches the previous answer.
    assert not any(s.endswith(":out") for c in claude for s, _ in c.prompt)
    # Tools: names and categories (no command in the public rows: Bash is "shell").
    assert [(t.name, t.category) for t in claude[0].tools] == [("Bash", "shell"), ("WebSearch", "web")]
    cats = [t.category for c in claude for t in c.tools]
    assert cats.count("web") == 4 and cats.count("edit") == 2 and cats.count("shell") == 3
    assert [t.duration_s for t in claude[0].tools] == [0.86, 19.291]
    # Timing: submission at the user message, completion at the last tool_use block,
    # gap until the last tool result of round 1's input.
    t0 = datetime.fromisoformat("2026-06-01T05:40:20.151+00:00").timestamp()
    assert claude[0].timestamp_s == pytest.approx(t0)
    assert claude[0].latency_s == pytest.approx(11.496)
    assert claude[0].gap_s == pytest.approx(19.291)
    assert claude[4].gap_s == pytest.approx(19.913)  # human think time before round 5's user message
    assert claude[-1].latency_s == pytest.approx(10.829)


@needs_data
def test_codex_session_reuses_answers(sanitized):
    calls, report = sanitized
    codex = [c for c in calls if c.session_id.startswith("codex:")]
    assert len(codex) == 9
    key = codex[0].prompt[0][0].split(":")[1]
    # Round 1 reads 9,600 cached tokens after a 9,324-token prompt: 276 of the answer.
    assert codex[1].prompt == (
        (f"tl:{key}:ext", 6912), (f"tl:{key}:0", 2412), (f"tl:{key}:0:out", 276), (f"tl:{key}:1", 317)
    )
    # Round 3 drops back to 3,456 cached tokens: a cut inside the external prefix.
    assert codex[3].prompt == ((f"tl:{key}:ext", 3456), (f"tl:{key}:3", 6696))
    assert report.prefix_into_output == 3
    assert {t.category for c in codex for t in c.tools} == {"shell"}
    assert codex[-1].gap_s is None and all(c.gap_s is not None for c in codex[:-1])


@needs_data
def test_commands_classified_when_present():
    calls, report = convert([DERIVED])
    assert report.rejected == [] and report.calls == 19
    bash = [t for c in calls for t in c.tools if t.name in ("Bash", "exec_command")]
    assert bash and all(t.category in CATEGORIES and t.category != "shell" for t in bash)
    # Same token structure as the sanitized rows (only ids differ).
    plain, _ = convert([SANITIZED])
    assert [[n for _, n in c.prompt] for c in calls] == [[n for _, n in c.prompt] for c in plain]


@needs_data
def test_gzip_stream_and_progress(sanitized, tmp_path):
    gz = tmp_path / "rounds.jsonl.gz"
    gz.write_bytes(gzip.compress(SANITIZED.read_bytes()))
    seen: list[int] = []
    calls, report = convert([gz], progress=seen.append)
    assert calls == sanitized[0]
    assert seen and seen[-1] == gz.stat().st_size
    # A truncated download: the rows before the break are kept, the break is reported.
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])
    calls, report = convert([cut])
    assert 0 < report.calls < 19
    assert len(report.rejected) == 1 and "unreadable from here on" in report.rejected[0][1]


@needs_data
def test_malformed_rows_rejected_rest_converted(tmp_path):
    rows = _rows(SANITIZED)[:10]  # the Claude session
    lines = [json.dumps(r) for r in rows]
    missing = dict(rows[3])
    del missing["prefix_tokens"]
    lines[3] = json.dumps(missing)  # line 4: missing field
    lines.insert(6, "{not json")  # line 7: bad JSON
    lines.append(json.dumps(rows[8]))  # line 12: duplicate round_index 8
    mism = dict(rows[5])
    mism["newly_append_tokens"] += 5  # total != prefix + new: repaired, counted
    lines[5] = json.dumps(mism)
    clamp = dict(rows[9])
    clamp["prefix_tokens"] = 10**6  # more than the previous prompt + answer
    clamp["input_tokens_total"] = 10**6 + 5
    clamp["newly_append_tokens"] = 5
    lines[10] = json.dumps(clamp)
    lines.insert(2, "")  # blank line 3: ignored
    src = tmp_path / "bad.jsonl"
    src.write_text("\n".join(lines) + "\n")

    calls, report = convert([src])
    where = [w for w, _ in report.rejected]
    assert where == [f"{src}:5", f"{src}:8", f"{src}:13"]
    reasons = [r for _, r in report.rejected]
    assert reasons[0] == "prefix_tokens: missing"
    assert reasons[1].startswith("not valid JSON")
    assert "round_index 8 after 9" in reasons[2]
    assert report.calls == 9 and report.sessions == 1
    assert report.token_mismatch == 1
    # Round 9 (10**6 cached) and, after the rejected round 3, round 4 (its cache read
    # exceeds round 2 + answer).
    assert report.prefix_clamped == 2
    assert [c.turn for c in calls] == list(range(9))
    assert calls[-1].prompt_tokens == 10**6 + 5
    assert "rejected: " in report.render()
    out = tmp_path / "out.jsonl"
    assert main([str(src), "-o", str(out), "-q"]) == 0
    assert load_trace(out).num_calls == 9


def test_bad_types_and_missing_file(tmp_path):
    src = tmp_path / "t.jsonl"
    good = {"session_id": "s", "round_index": 0, "input_tokens_total": 100, "prefix_tokens": 0,
            "newly_append_tokens": 100, "output_tokens": 0, "timing_events": [], "tools": []}
    src.write_text("\n".join([
        json.dumps(good),
        json.dumps([1, 2]),
        json.dumps({**good, "round_index": 1, "input_tokens_total": "many"}),
        json.dumps({**good, "round_index": 2, "tools": [{"tool_name": ""}]}),
        json.dumps({**good, "round_index": 3, "session_id": None}),
        json.dumps({**good, "round_index": 4, "input_tokens_total": 0, "newly_append_tokens": 0}),
        json.dumps({**good, "round_index": 7, "prefix_tokens": 40, "newly_append_tokens": 60,
                    "tools": [{"tool_name": "Grep", "tool_wall_latency_ms": None}]}),
    ]) + "\n")
    calls, report = convert([src, tmp_path / "absent.jsonl"])
    assert [w.rsplit(":", 1)[1] for w, _ in report.rejected] == ["2", "3", "4", "5", "6", "0"]
    assert report.rejected[0][1] == "not a JSON object"
    assert report.rejected[1][1].startswith("input_tokens_total: expected an integer")
    assert report.rejected[2][1].startswith("tools[0].tool_name")
    assert report.rejected[3][1].startswith("session_id")
    assert report.rejected[4][1].startswith("input_tokens_total: 0")
    assert report.rejected[5][1].startswith("unreadable")
    assert len(calls) == 2 and report.output_zero == 2 and report.round_index_gaps == 6
    assert calls[0].prompt == (("tl:" + calls[0].prompt[0][0].split(":")[1] + ":0", 100),)
    assert calls[1].prompt[0] == (calls[0].prompt[0][0], 40)  # cut inside round 0's segment
    assert calls[1].tools[0].category == "grep" and report.tools_without_latency == 1
    assert report.no_timing == 2 and calls[0].gap_s is None


@pytest.mark.parametrize(
    "name, tool_input, cat",
    [
        ("Read", None, "read"),
        ("Grep", None, "grep"),
        ("Glob", None, "find"),
        ("LS", None, "find"),
        ("Edit", None, "edit"),
        ("MultiEdit", None, "edit"),
        ("Write", None, "edit"),
        ("apply_patch", None, "edit"),
        ("TodoWrite", None, "plan"),
        ("update_plan", None, "plan"),
        ("WebFetch", None, "web"),
        ("Task", None, "agent"),
        ("mcp__github__search", None, "mcp"),
        ("write_stdin", None, "shell"),
        ("Bash", None, "shell"),
        ("Bash", {"command": "cd repo && python -m pytest -q"}, "test"),
        ("Bash", {"command": "grep -rn foo src"}, "grep"),
        ("exec_command", json.dumps({"cmd": "sed -n 1,40p a.py"}), "read"),
        ("shell", {"command": ["bash", "-lc", "ls -la"]}, "find"),
        ("SomethingNew", None, "other"),
    ],
)
def test_tool_category(name, tool_input, cat):
    assert tool_category(name, tool_input) == cat
    assert cat in CATEGORIES


def test_report_render_empty():
    text = ImportReport().render()
    assert "calls" in text and "rejected rows" in text
