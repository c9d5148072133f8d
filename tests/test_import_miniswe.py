"""Tests of the mini-swe-agent importer (traces/importers/miniswe.py) on the real
trajectories in ../shared/data/traces, and of the bundled trace made from them."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest

from traces.importers.miniswe import (
    CATEGORIES,
    ImportReport,
    classify_command,
    convert,
    find_trajectories,
    main,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared/data/traces"
SRC = SHARED / "mini-swe-agent-deepseek"
BUNDLED = REPO / "traces/data/miniswe-deepseek.jsonl.gz"

needs_data = pytest.mark.skipif(
    not SRC.is_dir(), reason=f"real traces not present at {SRC} (shared data folder is absent)"
)

ONE = "deepseek_chat_dev/pvlib__pvlib-python-1072"


def _traj(session: str) -> Path:
    run, instance = session.split("/")
    return SRC / run / instance / f"{instance}.traj.json"


@pytest.fixture(scope="module")
def everything():
    return convert(find_trajectories([SRC]))


@pytest.fixture(scope="module")
def one_session():
    path = _traj(ONE)
    data = json.loads(path.read_text())
    calls, report = convert([path])
    return data, calls, report


# ------------------------------------------------------------------ one session, hand-checked


@needs_data
def test_one_session_counts(one_session):
    data, calls, report = one_session
    assistants = [m for m in data["messages"] if m["role"] == "assistant"]
    with_usage = [m for m in assistants if m["extra"]["response"].get("usage")]
    assert len(calls) == len(with_usage) == 74
    assert report.sessions == 1 and report.calls == 74 and not report.rejected
    assert {c.session_id for c in calls} == {ONE}
    assert [c.turn for c in calls] == list(range(74))
    for call, m in zip(calls, with_usage):
        usage = m["extra"]["response"]["usage"]
        assert call.prompt_tokens == usage["prompt_tokens"]
        assert call.output_tokens == usage["completion_tokens"]
    assert report.residual_calls == 0 and report.non_append_only == 0
    # The first prompt is the system prompt and the task; the answer of turn 0
    # is message 2 of the file.
    assert len(calls[0].prompt) == 2
    assert calls[0].prompt[0][0].startswith("sys:") and calls[0].prompt[1][0].startswith("task:")
    assert calls[0].output_segment.endswith(":m2")


@needs_data
def test_one_session_prefix_sharing(one_session):
    _, calls, _ = one_session
    for prev, cur in zip(calls, calls[1:]):
        n = len(prev.prompt)
        assert cur.prompt[:n] == prev.prompt
        seg, count = cur.prompt[n]
        assert seg == prev.output_segment
        # The answer is reused whole: its segment has completion_tokens tokens.
        assert count == prev.output_tokens
        assert len(cur.prompt) == n + 2  # answer + tool output


@needs_data
def test_one_session_tools_and_timing(one_session):
    data, calls, _ = one_session
    cats = [c.tools[0].category for c in calls]
    assert all(len(c.tools) == 1 and c.tools[0].name == "bash" for c in calls)
    # Checked by reading the file: turn 0 `pwd && ls -la`, 2 `cat ... | head | tail`,
    # 7 `cat > reproduce_issue.py << 'EOF'`, 8 `python reproduce_issue.py`,
    # 10 `pip install numpy pandas -q`, 17 `grep -n ...`, 18 `sed -i ...`,
    # 50 `cd /testbed && python -m pytest ...`, 65 `cd /testbed && git status`,
    # 73 `echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat patch.txt`.
    expected = {0: "find", 2: "read", 7: "edit", 8: "python", 10: "install", 17: "grep",
                18: "edit", 50: "test", 65: "git", 73: "submit"}
    assert {k: cats[k] for k in expected} == expected
    msgs = data["messages"]
    # Turn 1 is message 4; its tool result is message 5, the one before it message 3.
    a_ts, tool_ts, prev_tool_ts = (msgs[i]["extra"]["timestamp"] for i in (4, 5, 3))
    c = calls[1]
    assert c.tools[0].duration_s == pytest.approx(tool_ts - a_ts, abs=1e-3)
    assert c.gap_s == pytest.approx(tool_ts - a_ts, abs=1e-3)
    assert c.latency_s == pytest.approx(a_ts - prev_tool_ts, abs=1e-3)
    assert c.timestamp_s == pytest.approx(prev_tool_ts, abs=1e-3)
    # The first call has no earlier timestamp: no latency, an estimated start.
    assert calls[0].latency_s is None and calls[0].timestamp_s < msgs[2]["extra"]["timestamp"]
    # The final submit has no tool message: duration 0, no gap.
    assert calls[-1].tools[0].duration_s == 0.0 and calls[-1].gap_s is None
    ts = [c.timestamp_s for c in calls]
    assert ts == sorted(ts)


# ------------------------------------------------------------------ all sessions


@needs_data
def test_all_sessions(everything):
    calls, report = everything
    assert report.files_read == 58
    assert report.sessions + len(report.empty) == 58 and not report.rejected
    assert report.calls == len(calls) > 4000
    assert report.residual_calls == 0 and report.non_append_only == 0
    assert set(report.tool_categories) <= set(CATEGORIES)
    assert report.tool_categories["submit"] > 0
    fig = report.figures
    assert fig["sessions"] == report.sessions
    assert 0.95 < fig["median reuse share (prev prompt + answer)"] <= 1.0
    text = report.render()
    assert "median prompt tokens" in text and "skipped (no LLM calls)" in text


@needs_data
def test_cross_session_system_segment(everything):
    calls, _ = everything
    sys_ids: dict[str, set] = {}
    for c in calls:
        if c.turn == 0:
            run = c.session_id.split("/")[0]
            sys_ids.setdefault(run, set()).add(c.prompt[0])
    assert len(sys_ids) == 3
    for run, ids in sys_ids.items():
        # One (id, count) per run: the system prompt is byte-identical across its sessions.
        assert len(ids) == 1, run
        assert next(iter(ids))[0].startswith("sys:")
    # Runs are different models: no sharing across runs.
    assert len({next(iter(ids))[0] for ids in sys_ids.values()}) == 3


@needs_data
def test_deterministic():
    paths = [_traj(ONE), _traj("deepseek_reasoner_dev/sqlfluff__sqlfluff-2419")]
    a, _ = convert(paths)
    b, _ = convert(paths)
    assert [c.to_line() for c in a] == [c.to_line() for c in b]


_ALLOWED_STR = re.compile(r"^(?:[0-9a-f]{8}:m\d+(?:v\d+)?|sys:[0-9a-f]{8}|task:[0-9a-f]{8})$")


@needs_data
def test_no_text_leak(everything, one_session):
    calls, _ = everything
    data, _, _ = one_session
    session_ids = {c.session_id for c in calls}

    def strings(v):
        if isinstance(v, str):
            yield v
        elif isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)

    # Structure: every string of every line is an id, a tool name or a category.
    for c in calls:
        for s in strings(c.to_json()):
            assert s in session_ids or s == "bash" or s in CATEGORIES or _ALLOWED_STR.match(s), s
    # Sample: no 40-character piece of the session's messages is in the output.
    lines = "\n".join(c.to_line() for c in calls)
    pieces = []
    for m in data["messages"]:
        text = m.get("content") or ""
        for start in range(0, max(0, len(text) - 40), max(40, len(text) // 5)):
            pieces.append(text[start : start + 40])
        for a in (m.get("extra") or {}).get("actions") or []:
            pieces.append(a["command"][:40])
    pieces = [p for p in pieces if len(p) == 40]
    assert len(pieces) > 100
    for p in pieces:
        assert p not in lines


@needs_data
def test_bundled_matches_fresh_conversion(everything, tmp_path):
    assert BUNDLED.is_file()
    out = tmp_path / "fresh.jsonl.gz"
    assert main([str(SRC), "-o", str(out)]) == 0
    assert out.read_bytes() == BUNDLED.read_bytes()
    with gzip.open(BUNDLED, "rt") as f:
        header = json.loads(f.readline())
        first = json.loads(f.readline())
    assert header["format"] == "cwtrace" and header["converted_by"] == "traces.importers.miniswe"
    assert "814 (41a1e33)" in header["source"] and header["license"].startswith("MIT")
    calls, _ = everything
    assert first == calls[0].to_json()


# ------------------------------------------------------------------ malformed input


@needs_data
def test_malformed_files_rejected(tmp_path):
    good = _traj("deepseek_reasoner_dev/pvlib__pvlib-python-1606")
    raw = good.read_text()
    d = tmp_path / "run_x"
    d.mkdir()
    truncated = d / "truncated.traj.json"
    truncated.write_text(raw[: len(raw) // 2])
    no_messages = d / "nomsg.traj.json"
    no_messages.write_text(json.dumps({"messages": [], "instance_id": "nomsg"}))
    data = json.loads(raw)
    first_a = next(i for i, m in enumerate(data["messages"]) if m["role"] == "assistant")
    del data["messages"][first_a]["extra"]["response"]["usage"]
    no_usage = d / "nousage.traj.json"
    no_usage.write_text(json.dumps(data))
    ok = d / "pvlib__pvlib-python-1606" / "pvlib__pvlib-python-1606.traj.json"
    ok.parent.mkdir()
    shutil.copy(good, ok)

    calls, report = convert([truncated, no_messages, no_usage, ok])
    reasons = dict(report.rejected)
    assert set(reasons) == {str(truncated), str(no_messages), str(no_usage)}
    assert "not valid JSON" in reasons[str(truncated)]
    assert "no messages" in reasons[str(no_messages)]
    assert f"assistant message {first_a}" in reasons[str(no_usage)] and "usage" in reasons[str(no_usage)]
    assert report.files_read == 4 and report.sessions == 1
    assert calls and {c.session_id for c in calls} == {"run_x/pvlib__pvlib-python-1606"}
    text = report.render()
    for p in (truncated, no_messages, no_usage):
        assert str(p) in text


# ------------------------------------------------------------------ classifier (no data needed)


@pytest.mark.parametrize(
    "cmd, cat",
    [
        ("cd /testbed && python -m pytest tests/x.py -xvs 2>&1 | tail -50", "test"),
        ("cat f.py | grep -n foo", "read"),
        ("grep -rn foo src | head", "grep"),
        ("sed -n '1,20p' a.py", "read"),
        ("sed -i 's/a/b/' a.py", "edit"),
        ("cat > r.py << 'EOF'\nimport x\nEOF", "edit"),
        ("python r.py", "python"),
        ("pip install -e .", "install"),
        ("pip list | grep numpy", "other"),
        ("git diff -- a.py > patch.txt", "git"),
        ("find . -name '*.py' -exec grep -l x {} \\;", "find"),
        ("echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT && cat patch.txt", "submit"),
        ("cp a.py a.py.bak", "other"),
        ("python -c \"\nopen('a.py', 'w').write('x')\n\"", "edit"),
    ],
)
def test_classify_command(cmd, cat):
    assert classify_command(cmd) == cat


def test_classify_remembers_file_writing_scripts():
    writers: set[str] = set()
    body = "with open('src/a.py') as f:\n    s = f.read()\nopen('src/a.py', 'w').write(s)\n"
    assert classify_command(f"cat > fix.py << 'EOF'\n{body}EOF", writers) == "edit"
    assert classify_command("cd /testbed && python fix.py", writers) == "edit"
    assert classify_command("python other.py", writers) == "python"


def test_report_render_empty():
    assert "files read" in ImportReport().render()
