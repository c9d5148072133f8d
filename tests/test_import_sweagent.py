"""Tests of the SWE-agent importer (traces/importers/sweagent.py) on a synthetic,
hand-written fixture that follows SWE-agent's documented .traj schema
(tests/data/sweagent/example.traj: no real trajectory data)."""

from __future__ import annotations

import json
from pathlib import Path


from traces.importers.sweagent import (
    CHARS_PER_TOKEN,
    HEADER,
    ImportReport,
    classify_action,
    convert,
    find_trajectories,
    main,
)
from traces.reader import load_trace

FIXTURE = Path(__file__).resolve().parent / "data" / "sweagent" / "example.traj"


def _data() -> dict:
    return json.loads(FIXTURE.read_text())


def _save(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def _est(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def test_fixture_follows_schema():
    d = _data()
    assert set(d) >= {"trajectory", "history", "info", "environment"}
    assert all(set(s) >= {"action", "observation", "response", "thought", "execution_time", "state", "query"}
               for s in d["trajectory"])
    assert all(set(m) >= {"role", "content", "message_type", "agent"} for m in d["history"])
    assert set(d["info"]["model_stats"]) >= {"tokens_sent", "tokens_received", "api_calls"}


def test_hand_checked_calls():
    calls, report = convert([FIXTURE])
    assert isinstance(report, ImportReport)
    assert (report.files_read, report.sessions, report.calls) == (1, 1, 6)
    assert report.rejected == [] and report.prompts_from_query == 1 and report.scaled_sessions == 1
    assert {c.session_id for c in calls} == {"sweagent/example"}
    # Prompt k: system, demonstration, task, then (action, observation) pairs.
    assert [len(c.prompt) for c in calls] == [3, 5, 7, 9, 11, 13]
    assert [c.prompt[0][0].split(":")[0] for c in calls] == ["system"] * 6
    assert calls[0].prompt[1][0].startswith("user:") and calls[1].prompt[3][0].startswith("assistant:")
    # Tools: name, category, duration (= the step's execution_time).
    assert [(t.name, t.category, t.duration_s) for c in calls for t in c.tools] == [
        ("find_file", "find", 0.25),
        ("open", "read", 0.5),
        ("grep", "grep", 0.75),
        ("edit", "edit", 1.5),
        ("cd", "test", 3.25),
        ("submit", "submit", 0.125),
    ]
    # No timestamps in a trajectory: the gap is the tool duration.
    assert all(c.gap_s is None and c.timestamp_s is None and c.latency_s is None for c in calls)
    assert [c.next_gap_s for c in calls] == [0.25, 0.5, 0.75, 1.5, 3.25, 0.125]
    # System and demonstration keep their unscaled text estimate.
    hist = _data()["history"]
    assert calls[0].prompt[0][1] == _est(hist[0]["content"])
    assert calls[0].prompt[1][1] == _est(hist[1]["content"])
    # Totals match model_stats per call: api_calls 7 counts a re-query that is
    # not in the history, so the 6 calls get 6/7 of the totals.
    assert sum(c.prompt_tokens for c in calls) == 2100 * 6 // 7 == 1800
    assert sum(c.output_tokens for c in calls) == 245 * 6 // 7 == 210
    assert report.sent_residual_tokens == 0
    assert report.tool_categories["submit"] == 1


def test_prefix_sharing_turn_to_turn():
    calls, _ = convert([FIXTURE])
    for prev, cur in zip(calls, calls[1:]):
        n = len(prev.prompt)
        assert cur.prompt[:n] == prev.prompt
        assert cur.prompt[n] == (prev.output_segment, prev.output_tokens)
        assert cur.prompt[n + 1][0].startswith("user:")
    ids = [s for c in calls for s, _ in c.prompt] + [c.output_segment for c in calls]
    counts: dict[str, set[int]] = {}
    for c in calls:
        for s, k in c.prompt:
            counts.setdefault(s, set()).add(k)
    assert all(len(v) == 1 for v in counts.values())  # one count per segment
    assert len(set(ids)) == 13 + 1  # 13 messages of the last prompt + its answer


def test_history_mode_equals_query_mode(tmp_path):
    d = _data()
    for step in d["trajectory"]:
        del step["query"]
    p = _save(tmp_path / "run" / "example.traj", d)
    calls_h, report_h = convert([p])
    calls_q, _ = convert([FIXTURE])
    assert report_h.prompts_from_history == 1 and report_h.prompts_from_query == 0
    assert [(c.prompt, c.output_tokens, c.output_segment, c.tools) for c in calls_h] == [
        (c.prompt, c.output_tokens, c.output_segment, c.tools) for c in calls_q
    ]


def test_query_with_elided_observation(tmp_path):
    # As SWE-agent's last_n_observations does: from step 3 on, the first
    # observation (history index 4) is sent in a shortened form.
    d = _data()
    for step in d["trajectory"][3:]:
        step["query"][4]["content"] = "Old environment output: (3 lines omitted)"
    p = _save(tmp_path / "run" / "example.traj", d)
    calls, report = convert([p])
    assert report.prompts_from_query == 1
    c2, c3 = calls[2], calls[3]
    assert c3.prompt[:4] == c2.prompt[:4]  # up to the elided message
    assert c3.prompt[4][0] != c2.prompt[4][0]
    assert c3.prompt[5][0] != c2.prompt[5][0]  # chained ids: everything after differs
    assert c3.prompt[4][1] < c2.prompt[4][1]
    for prev, cur in zip(calls[3:], calls[4:]):  # append-only again afterwards
        assert cur.prompt[: len(prev.prompt)] == prev.prompt


def test_cross_session_sharing(tmp_path):
    a = _data()
    b = _data()
    b["history"][2]["content"] = "A different synthetic task for the second session."
    for step in b["trajectory"]:
        step["query"][2]["content"] = b["history"][2]["content"]
    b["info"]["model_stats"]["tokens_sent"] = 3000  # another scale factor
    pa = _save(tmp_path / "run" / "a.traj", a)
    pb = _save(tmp_path / "run" / "b.traj", b)
    calls, report = convert(find_trajectories([tmp_path]))
    assert report.sessions == 2
    first = {c.session_id: c for c in calls if c.turn == 0}
    assert set(first) == {"run/a", "run/b"}
    ca, cb = first["run/a"], first["run/b"]
    assert ca.prompt[:2] == cb.prompt[:2]  # system + demonstration: same ids, same counts
    assert ca.prompt[2][0] != cb.prompt[2][0]
    assert pa.exists() and pb.exists()


def test_unscaled_without_stats(tmp_path):
    d = _data()
    d["info"]["model_stats"] = {"tokens_sent": 0, "tokens_received": 0, "api_calls": 0}
    calls, report = convert([_save(tmp_path / "x" / "x.traj", d)])
    assert report.unscaled_sessions == 1 and report.scaled_sessions == 0
    hist = d["history"]
    assert [n for _, n in calls[-1].prompt] == [_est(m["content"]) for m in hist[:-2]]
    assert [c.output_tokens for c in calls] == [_est(m["content"]) for m in hist if m["role"] == "assistant"]


def test_function_calling_tool_name(tmp_path):
    d = _data()
    msg = d["history"][3]
    msg["tool_calls"] = [{"id": "call_0", "type": "function",
                          "function": {"name": "bash", "arguments": json.dumps({"command": msg["action"]})}}]
    for step in d["trajectory"]:
        step.pop("query")
    calls, _ = convert([_save(tmp_path / "fc" / "fc.traj", d)])
    assert calls[0].tools[0].name == "bash" and calls[0].tools[0].category == "find"
    assert calls[1].tools[0].name == "open"


def test_malformed_files_rejected(tmp_path):
    text = FIXTURE.read_text()
    truncated = tmp_path / "truncated.traj"
    truncated.write_text(text[: len(text) // 2])
    no_history = _data()
    del no_history["history"]
    bad_history = _data()
    bad_history["history"] = {"role": "system"}
    bad_message = _data()
    bad_message["history"][5] = {"content": "no role"}
    not_object = tmp_path / "list.traj"
    not_object.write_text("[]")
    no_calls = _data()
    no_calls["history"] = no_calls["history"][:3]
    no_calls["trajectory"] = []
    paths = [
        truncated,
        _save(tmp_path / "no_history.traj", no_history),
        _save(tmp_path / "bad_history.traj", bad_history),
        _save(tmp_path / "bad_message.traj", bad_message),
        not_object,
        tmp_path / "missing.traj",
        _save(tmp_path / "no_calls.traj", no_calls),
        FIXTURE,
        FIXTURE,
    ]
    calls, report = convert(paths)
    reasons = dict(report.rejected)
    assert reasons[str(truncated)].startswith("not valid JSON")
    assert reasons[str(tmp_path / "no_history.traj")] == "no history"
    assert reasons[str(tmp_path / "bad_history.traj")] == "history is not a non-empty list"
    assert reasons[str(tmp_path / "bad_message.traj")] == "history[5] is not an object with a role"
    assert reasons[str(not_object)] == "not a JSON object"
    assert reasons[str(tmp_path / "missing.traj")].startswith("unreadable")
    assert report.rejected[-1] == (str(FIXTURE), "duplicate session id 'sweagent/example'")
    assert len(report.rejected) == 7
    assert report.empty == [str(tmp_path / "no_calls.traj")]
    assert report.sessions == 1 and len(calls) == 6
    rendered = report.render()
    assert f"rejected: {truncated}: not valid JSON" in rendered


def test_classify_action():
    assert classify_action("str_replace_editor view /a.py") == "read"
    assert classify_action("str_replace_editor str_replace /a.py --old_str x --new_str y") == "edit"
    assert classify_action("search_dir foo src") == "grep"
    assert classify_action("scroll_down") == "read"
    assert classify_action("pip install -e .") == "install"
    assert classify_action("git diff") == "git"
    assert classify_action("") == "other"


def test_cli_deterministic_no_text(tmp_path):
    a, b = tmp_path / "a.jsonl.gz", tmp_path / "b.jsonl"
    assert main([str(FIXTURE.parent), "-o", str(a)]) == 0
    assert main([str(FIXTURE), "-o", str(tmp_path / "a2.jsonl.gz")]) == 0
    assert a.read_bytes() == (tmp_path / "a2.jsonl.gz").read_bytes()
    assert main([str(FIXTURE), "-o", str(b)]) == 0
    trace = load_trace(a)
    assert trace.num_calls == 6
    assert trace.header["converted_by"] == HEADER["converted_by"] == "traces.importers.sweagent"
    written = b.read_text()
    d = _data()
    texts = [m["content"] for m in d["history"]] + [s["observation"] for s in d["trajectory"]]
    for t in texts:
        for i in range(max(1, len(t) - 39)):
            piece = t[i : i + 40]
            assert len(piece) < 40 or piece not in written
    assert main([str(tmp_path / "empty_dir_missing"), "-o", str(tmp_path / "x.jsonl")]) == 1
