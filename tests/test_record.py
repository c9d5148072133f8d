"""The recording proxy without vLLM: segments, session inference, line writing, crash recovery,
and the proxy against a small in-test upstream (raw bytes, errors, hint forwarding)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from recorder import RecordingProxy
from recorder.recording import Recording
from recorder.responses import Outcome, StreamReader, read_body
from recorder.segments import canonical_arguments, chain, prompt_units
from recorder.tools import tool_category
from recorder.writer import RecordingError, TraceAppender, journal_path, recover
from traces.reader import load_trace

# --------------------------------------------------------------------------- helpers


class ListWriter:
    """Collects what a Recording writes (held = journaled, lines = final)."""

    def __init__(self):
        self.held, self.lines, self.closed = [], [], False

    def hold(self, d):
        self.held.append(json.loads(json.dumps(d)))

    def write(self, d):
        self.lines.append(json.loads(json.dumps(d)))

    def close(self):
        self.closed = True


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def chat(*msgs):
    return {"model": "m", "messages": [{"role": r, "content": c} for r, c in msgs]}


def answer(text="", tools=(), prompt=None, completion=None):
    out = Outcome("chat", texts=[text] if text else [], tools=[(n, canonical_arguments(a)) for n, a in tools],
                  prompt_tokens=prompt,
                  output_tokens=completion)
    return out


def assistant(text, tools=()):
    m = {"role": "assistant", "content": text}
    if tools:
        m["tool_calls"] = [{"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": a}}
                           for i, (n, a) in enumerate(tools)]
    return m


# --------------------------------------------------------------------------- segments


def test_segment_ids_are_chained_salted_and_ignore_cache_markers():
    a = prompt_units("messages", {"system": "sys", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "text", "text": "there"}]}]})
    b = prompt_units("messages", {"system": [{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
                                  "messages": [{"role": "user", "content": [
                                      {"type": "text", "text": "hi"},
                                      {"type": "text", "text": "there", "cache_control": {"type": "ephemeral"}}]}]})
    assert [u.kind for u in a] == ["system", "user", "user"]  # one unit per content part
    assert chain(a, "s1") == chain(b, "s1")
    assert chain(a, "s1") != chain(a, "s2")  # salted
    other = prompt_units("messages", {"system": "other", "messages": [{"role": "user", "content": "hi"}]})
    assert chain(other, "s1")[1] != chain(a, "s1")[1]  # chained: same text after another prefix differs


def test_tool_arguments_are_canonical_json():
    m1 = assistant("", [("bash", '{"command": "ls", "timeout": 5}')])
    m2 = assistant(None, [("bash", '{"timeout":5,"command":"ls"}')])
    u1 = prompt_units("chat", {"messages": [m1]})
    u2 = prompt_units("chat", {"messages": [m2]})
    assert chain(u1, "s") == chain(u2, "s")


# --------------------------------------------------------------------------- categories


@pytest.mark.parametrize("name,args,category", [
    ("bash", '{"command": "cd /repo && python -m pytest -q"}', "test"),
    ("Bash", '{"command": "grep -rn foo src"}', "grep"),
    ("Read", '{"file_path": "/a.py"}', "read"),
    ("Edit", '{"file_path": "/a.py", "old_string": "x", "new_string": "y"}', "edit"),
    ("str_replace_editor", '{"command": "view", "path": "/a"}', "read"),
    ("str_replace_editor", '{"command": "str_replace", "path": "/a"}', "edit"),
    ("shell", '{"command": ["bash", "-lc", "git status"]}', "git"),
    ("Glob", '{"pattern": "**/*.py"}', "find"),
    ("TodoWrite", '{"todos": []}', "other"),
    ("bash", "not json", "other"),
])
def test_tool_category(name, args, category):
    assert tool_category(name, args) == category


# --------------------------------------------------------------------------- stream reader


def sse(*events):
    return b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def test_stream_reader_matches_the_whole_body_for_chat():
    body = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ab", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "bash", "arguments": '{"command":"ls"}'}}]}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "prompt_tokens_details": {"cached_tokens": 2}}}
    stream = sse({"choices": [{"index": 0, "delta": {"content": "a"}}]},
                 {"choices": [{"index": 0, "delta": {"content": "b"}}]},
                 {"choices": [{"index": 0, "delta": {"tool_calls": [
                     {"index": 0, "id": "1", "function": {"name": "bash", "arguments": '{"comm'}}]}}]},
                 {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'and":"ls"}'}}]}}]},
                 {"choices": [], "usage": body["usage"]})
    whole = read_body("chat", json.dumps(body).encode())
    r = StreamReader("chat")
    for i in range(0, len(stream), 7):  # chunk boundaries anywhere, even inside a line
        r.feed(stream[i:i + 7])
    streamed = r.finish()
    assert streamed.output_text == whole.output_text
    assert (streamed.prompt_tokens, streamed.output_tokens, streamed.cached_tokens) == (9, 4, 2)
    assert streamed.chunks == 4 and streamed.first_token_t is not None


def test_stream_reader_anthropic():
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 5, "cache_read_input_tokens": 32,
                                                         "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "Read",
                                                                       "input": {}}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"file_path"'}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": ': "/x"}'}},
        {"type": "message_delta", "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    ]
    r = StreamReader("messages")
    r.feed(b"".join(b"event: " + e["type"].encode() + b"\r\ndata: " + json.dumps(e).encode() + b"\r\n\r\n"
                    for e in events))
    out = r.finish()
    whole = read_body("messages", json.dumps({"content": [
        {"type": "text", "text": "hi"}, {"type": "tool_use", "id": "t", "name": "Read", "input": {"file_path": "/x"}}],
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 32, "output_tokens": 7}}).encode())
    assert out.output_text == whole.output_text
    assert (out.prompt_tokens, out.cached_tokens, out.output_tokens) == (37, 32, 7) == (
        whole.prompt_tokens, whole.cached_tokens, whole.output_tokens)


# --------------------------------------------------------------------------- sessions and lines


def test_sessions_turns_gaps_and_counts():
    w, clock = ListWriter(), Clock()
    rec = Recording(w, "salt", "r", clock=clock)
    sys_, task = ("system", "S" * 400), ("user", "T" * 100)
    b0 = chat(sys_, task)
    s0 = rec.begin("chat", b0)
    clock.t += 1.0
    tool = ("bash", json.dumps({"command": "pytest -q"}))
    rec.finish(s0, answer("ok", [tool], prompt=130, completion=12))
    assert w.lines == [] and len(w.held) == 1  # held until the next call (journaled)
    # another agent starting with the same system prompt but another task: a new session
    clock.t += 0.5
    o0 = rec.begin("chat", chat(sys_, ("user", "other task")))
    # the first agent's next call, after its tool ran 3 s
    clock.t += 2.5
    b1 = {"model": "m", "messages": b0["messages"] + [assistant("ok", [tool]), {"role": "tool", "content": "R" * 80}]}
    s1 = rec.begin("chat", b1)
    assert s1.session_id == s0.session_id and s1.turn == 1 and o0.session_id != s0.session_id
    assert s1.hints()["cw_prev_tool"] == "bash" and s1.hints()["cw_prev_category"] == "test"
    assert s1.hints()["cw_prev_gap_s"] == 3.0
    clock.t += 0.5
    rec.finish(s1, answer("done", prompt=175, completion=3))
    (line0,) = w.lines
    assert line0["turn"] == 0 and line0["gap_s"] == 3.0
    assert line0["tools"] == [{"name": "bash", "category": "test", "duration_s": 3.0}]
    assert sum(n for _, n in line0["prompt"]) == 130  # scaled to the usage
    # 130 tokens over 400 + 100 chars: 1 each, the other 128 in proportion (102.4 + 25.6, largest remainder)
    assert [n for _, n in line0["prompt"]] == [103, 27] and line0["latency_s"] == 1.0
    held1 = w.held[-1]
    p1 = held1["prompt"]
    assert p1[:2] == line0["prompt"] and p1[2] == [line0["output_segment"], 12]  # the answer is reused
    assert sum(n for _, n in p1) == 175 and p1[3][1] == 175 - 130 - 12
    # an exact repeat of a finished prompt is a new session, a failed call is not a turn
    rep = rec.begin("chat", b1)
    assert rep.session_id not in (s0.session_id, o0.session_id)
    b2 = {"model": "m", "messages": b1["messages"] + [assistant("done"), {"role": "user", "content": "more"}]}
    f = rec.begin("chat", b2)
    clock.t += 1
    rec.fail(f, 503, "upstream_error")
    clock.t += 1
    s2 = rec.begin("chat", b2)  # the retry continues the session
    assert s2.session_id == s0.session_id and s2.turn == 2
    rec.finish(s2, answer("x", prompt=190, completion=2))
    rec.close()
    assert w.closed
    mine = [d for d in w.lines if d["session_id"] == s0.session_id]
    assert [d["turn"] for d in mine] == [0, 1, 2]
    assert mine[1]["meta"]["failed_after"][0]["status"] == 503 and mine[1]["gap_s"] == 2.0
    assert "gap_s" not in mine[2]  # the last call's gap is unknown
    assert rec.calls == 3 and rec.failed == 1 and rec.sessions == 1  # o0 and rep never finished


def test_header_session_and_estimates_without_usage():
    w, clock = ListWriter(), Clock()
    rec = Recording(w, "salt", "r", clock=clock, known_turns={"agent-7": 4})
    s = rec.begin("chat", chat(("user", "x" * 40)), session_header="agent-7")
    out = answer("y" * 80)
    rec.finish(s, out)
    rec.close()
    (line,) = w.lines
    assert line["session_id"] == "agent-7" and line["turn"] == 4
    assert line["prompt"][0][1] == 10 and line["output_tokens"] == 20
    assert line["meta"]["tokens"] == "estimated, prompt estimated"


# --------------------------------------------------------------------------- writer


def test_writer_journal_and_recovery(tmp_path):
    out = tmp_path / "t.jsonl"
    w = TraceAppender(out, {"source": "test"})
    line = {"session_id": "a", "turn": 0, "prompt": [["x", 3]], "output_tokens": 1}
    w.hold(line)
    w.write(line)
    w.hold({**line, "turn": 1})
    # a crash here: the final line of turn 1 never came, and half a line is torn
    w._f.close()
    w._journal.close()
    with open(out, "ab") as f:
        f.write(b'{"session_id":"a","tu')
    with pytest.raises(RecordingError, match="exists"):
        TraceAppender(out, {})
    assert not journal_path(out).exists()  # recovered by the attempt above
    tr = load_trace(out)
    assert [c.turn for c in tr.sessions[0].calls] == [0, 1]
    assert recover(out) == 0
    w2 = TraceAppender(out, {}, append=True)
    assert w2.next_turns == {"a": 2}
    w2.close()
    with pytest.raises(RecordingError, match="plain .jsonl"):
        TraceAppender(tmp_path / "t.jsonl.gz", {})
    bad = tmp_path / "b.jsonl"
    bad.write_text("hello\n")
    with pytest.raises(RecordingError, match="not a cwtrace"):
        TraceAppender(bad, {}, append=True)
    w3 = TraceAppender(tmp_path / "c.jsonl", {})
    with pytest.raises(ValueError, match="output_tokens"):
        w3.write({**line, "output_tokens": 0})
    w3.close()


# --------------------------------------------------------------------------- the proxy, small upstream


class Upstream:
    """A small ASGI upstream in a thread: fixed answers, every request it got kept (a boundary we do not own)."""

    CHAT = {"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "fixed answer", "tool_calls": [
            {"id": "t1", "type": "function", "function": {"name": "bash",
                                                          "arguments": json.dumps({"command": "git diff"})}}]},
         "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35}}

    def __init__(self):
        self.got = []
        self.paths = []  # raw path and query of the other requests
        self.mode = "ok"

        async def chat_(request: Request):
            body = await request.json()
            self.got.append((dict(request.headers), body))
            if self.mode == "error":
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=503, headers={"x-up": "1"})
            if body.get("stream"):
                async def gen():
                    for i in range(4):
                        yield sse_chunk(i)
                        await _sleep(0.01)
                    if self.mode == "break":
                        raise RuntimeError("upstream dies mid-stream")
                    yield b"data: [DONE]\n\n"
                    if self.mode == "linger":  # the stream ends a while after its last event
                        await _sleep(0.5)
                return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-up": "1"})
            return Response(json.dumps(self.CHAT).encode(), media_type="application/json",
                            headers={"x-up": "1", "set-cookie": "a=1"})

        async def models(request):
            self.paths.append(request.scope["raw_path"] + b"?" + request.scope["query_string"])
            return JSONResponse({"data": [{"id": "m"}]})

        app = Starlette(routes=[Route("/v1/chat/completions", chat_, methods=["POST"]),
                                Route("/v1/models", models)])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="critical"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


async def _sleep(s):
    import anyio
    await anyio.sleep(s)


def sse_chunk(i):
    return b"data: " + json.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": f"w{i} "}}]}).encode() + b"\n\n"


@pytest.fixture
def upstream():
    with Upstream() as up:
        yield up


def _messages():
    return [{"role": "system", "content": "MARKER_SYS"}, {"role": "user", "content": "MARKER_USER"}]


def test_raw_bytes_and_headers_pass_unchanged(upstream, tmp_path):
    out = tmp_path / "t.jsonl"
    body = {"model": "m", "messages": _messages()}
    direct = httpx.post(upstream.url + "/v1/chat/completions", json=body)
    with RecordingProxy(upstream.url, out) as px:
        via = httpx.post(px.url + "/v1/chat/completions", json=body)
        with httpx.stream("POST", px.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            streamed = b"".join(r.iter_raw())
            stream_headers = r.headers
        models = httpx.get(px.url + "/v1/models")
        httpx.get(px.url + "/v1/models?after=a%2Fb&x=%20")
    assert via.status_code == 200 and via.content == direct.content
    assert via.headers["x-up"] == "1" and via.headers["set-cookie"] == "a=1"
    assert streamed == b"".join(sse_chunk(i) for i in range(4)) + b"data: [DONE]\n\n"
    assert stream_headers["content-type"].startswith("text/event-stream")
    assert models.json() == {"data": [{"id": "m"}]}  # passed through, not recorded
    assert upstream.paths == [b"/v1/models?", b"/v1/models?after=a%2Fb&x=%20"]  # path and query as sent
    tr = load_trace(out)
    assert tr.num_calls == 2 and tr.header["format"] == "cwtrace"
    assert b"MARKER" not in out.read_bytes() and b"fixed answer" not in out.read_bytes()


def test_chunks_are_forwarded_as_they_arrive(upstream, tmp_path):
    with RecordingProxy(upstream.url, tmp_path / "t.jsonl") as px:
        arrivals = []
        with httpx.stream("POST", px.url + "/v1/chat/completions",
                          json={"model": "m", "messages": _messages(), "stream": True}) as r:
            for _ in r.iter_raw():
                arrivals.append(time.perf_counter())
    # the upstream sleeps 10 ms between chunks: a buffering proxy would deliver them together
    assert len(arrivals) >= 4 and arrivals[-1] - arrivals[0] >= 0.025


def test_hints_reach_the_upstream(upstream, tmp_path):
    msgs = _messages()
    with RecordingProxy(upstream.url, tmp_path / "t.jsonl", hints=True) as px:
        first = httpx.post(px.url + "/v1/chat/completions",
                           json={"model": "m", "messages": msgs, "vllm_xargs": {"mine": 1}}).json()
        m = first["choices"][0]["message"]
        msgs = msgs + [m, {"role": "tool", "tool_call_id": "t1", "content": "diff"}]
        httpx.post(px.url + "/v1/chat/completions", json={"model": "m", "messages": msgs})
    (h0, b0), (h1, b1) = upstream.got
    sid = b0["vllm_xargs"]["session_id"]
    assert h0["x-session-id"] == sid and h1["x-session-id"] == sid
    assert b0["vllm_xargs"] == {"mine": 1, "session_id": sid, "cw_turn": 0, "cw_prev_tool": "", "cw_prev_category": "",
                                "cw_prev_tools": [], "cw_prev_categories": [], "cw_prev_gap_s": -1.0}
    x1 = b1["vllm_xargs"]
    assert (x1["cw_turn"], x1["cw_prev_tool"], x1["cw_prev_category"]) == (1, "bash", "git")
    assert x1["cw_prev_tools"] == ["bash"] and x1["cw_prev_gap_s"] >= 0
    assert b1["messages"] == msgs  # nothing else changed


def test_upstream_errors_pass_through_and_are_recorded(upstream, tmp_path):
    out = tmp_path / "t.jsonl"
    body = {"model": "m", "messages": _messages()}
    with RecordingProxy(upstream.url, out) as px:
        ok = httpx.post(px.url + "/v1/chat/completions", json=body).json()
        cont = {"model": "m", "messages": body["messages"] + [ok["choices"][0]["message"],
                                                              {"role": "tool", "content": "x"}]}
        upstream.mode = "error"
        err = httpx.post(px.url + "/v1/chat/completions", json=cont)
        upstream.mode = "break"
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", px.url + "/v1/chat/completions", json={**cont, "stream": True}) as r:
                for _ in r.iter_raw():
                    pass
        upstream.mode = "ok"
        httpx.post(px.url + "/v1/chat/completions", json=cont)
    log = list(px.log)  # complete once the proxy has closed (the recording's work runs just after each call)
    assert err.status_code == 503 and err.json() == {"error": {"message": "overloaded"}} and err.headers["x-up"] == "1"
    tr = load_trace(out)
    (s,) = tr.sessions
    assert [c.turn for c in s.calls] == [0, 1]
    lines = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    failed = lines[0]["meta"]["failed_after"]
    assert [f["status"] for f in failed] == [503, 200] and failed[1]["kind"] == "broken"
    assert failed[1]["output_events"] == 4
    assert any("upstream_error" in x for x in log) and any("broken" in x for x in log)


def test_a_recording_error_on_one_call_loses_only_that_call(upstream, tmp_path, monkeypatch):
    """The recording's work runs after the calls, in order; one that raises is logged and skipped,
    and neither the agent nor the other calls notice."""
    from recorder.recording import Recording

    real = Recording.finish
    seen = []

    def finish(self, start, out, t_done=None):
        seen.append(start.turn)
        if len(seen) == 2:
            raise KeyError("boom")
        return real(self, start, out, t_done)
    monkeypatch.setattr(Recording, "finish", finish)
    out = tmp_path / "t.jsonl"
    with RecordingProxy(upstream.url, out) as px:
        answers = [httpx.post(px.url + "/v1/chat/completions", json={"model": "m", "messages": [
            {"role": "user", "content": f"task {k}"}]}) for k in range(3)]
    assert [r.status_code for r in answers] == [200] * 3 and all(r.json() == Upstream.CHAT for r in answers)
    assert len(px.log) == 1 and px.log[0].startswith("recording error, a call is missing from the trace (KeyError")
    assert load_trace(out).num_calls == 2 and px.recording.calls == 2


def test_a_client_that_closes_a_stream_is_recorded_and_the_stream_stops(upstream, tmp_path):
    out = tmp_path / "t.jsonl"
    body = {"model": "m", "messages": _messages()}
    with RecordingProxy(upstream.url, out) as px:
        ok = httpx.post(px.url + "/v1/chat/completions", json=body).json()
        cont = {"model": "m", "stream": True, "messages": body["messages"] + [
            ok["choices"][0]["message"], {"role": "tool", "content": "x"}]}
        with httpx.stream("POST", px.url + "/v1/chat/completions", json=cont) as r:
            first = next(r.iter_raw())  # then the agent is stopped: the connection closes mid-stream
        time.sleep(0.1)  # the upstream would have sent its 4 chunks by now
    assert first == sse_chunk(0)
    (line,) = [json.loads(x) for x in out.read_text().splitlines()[1:]]
    (note,) = line["meta"]["failed_after"]
    assert note["kind"] == "client_closed" and note["status"] == 200 and 1 <= note.get("output_events", 0) < 4
    assert px.log == [f"client_closed: the client closed a stream (session {line['session_id']})"]


def test_a_client_that_closes_after_the_last_event_got_a_whole_answer(upstream, tmp_path):
    """SDKs stop reading at ``[DONE]`` and may close the connection before the stream's end: that call is
    recorded as answered, not as closed by the client."""
    out = tmp_path / "t.jsonl"
    upstream.mode = "linger"
    with RecordingProxy(upstream.url, out) as px:
        with httpx.stream("POST", px.url + "/v1/chat/completions",
                          json={"model": "m", "messages": _messages(), "stream": True}) as r:
            got = b""
            for chunk in r.iter_raw():
                got += chunk
                if b"[DONE]" in got:
                    break  # and close, while the upstream's stream is still open
    assert got.endswith(b"data: [DONE]\n\n") and px.log == []
    (call,) = load_trace(out).calls()
    assert call.output_tokens == 4  # the four streamed events


def test_unreachable_upstream_gets_502_in_the_apis_format(tmp_path):
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with RecordingProxy(f"http://127.0.0.1:{port}", tmp_path / "t.jsonl") as px:
        r = httpx.post(px.url + "/v1/messages", json={"model": "m", "max_tokens": 5,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        r2 = httpx.post(px.url + "/v1/chat/completions", json={"model": "m", "messages": _messages()})
    assert px.recording.failed == 2 and px.recording.unattached_failures == 2
    assert r.status_code == 502 and r.json()["type"] == "error" and "unreachable" in r.json()["error"]["message"]
    assert r2.status_code == 502 and "unreachable" in r2.json()["error"]["message"]


def test_cli_records_until_ctrl_c_and_closes_cleanly(upstream, tmp_path):
    out = tmp_path / "t.jsonl"
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    cwsim = os.path.join(os.path.dirname(sys.executable), "cwsim")
    p = subprocess.Popen([cwsim, "record", "--upstream", upstream.url, "-o", str(out), "--listen",
                          f"127.0.0.1:{port}"], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={"model": "m", "messages": _messages()})
                break
            except httpx.ConnectError:
                assert time.time() < deadline and p.poll() is None
                time.sleep(0.2)
        assert r.status_code == 200
        assert journal_path(out).exists()  # the call is held (journaled) until the session goes on
        p.send_signal(signal.SIGINT)
        err = p.communicate(timeout=60)[1]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "wrote 1 calls (1 sessions, 0 failed calls)" in " ".join(err.split())
    assert load_trace(out).num_calls == 1 and not journal_path(out).exists()
    # the same file again: refused with one line, exit 2
    p2 = subprocess.run([cwsim, "record", "--upstream", upstream.url, "-o", str(out), "--listen", "127.0.0.1:0"],
                        capture_output=True, text=True, timeout=60)
    assert p2.returncode == 2 and "exists" in p2.stderr and "Traceback" not in p2.stderr
