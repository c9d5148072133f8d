"""The recording reverse proxy: a plain ASGI app (served by uvicorn) that forwards to the upstream.

Every request goes to ``upstream + path`` unchanged (hop-by-hop headers
aside, and ``Accept-Encoding: identity`` so that the answer can be read as it
passes), and the upstream's status, headers and bytes come back unchanged:
a server-sent-events answer chunk by chunk as the chunks arrive, anything
else whole. ``POST .../chat/completions``, ``.../completions`` (OpenAI) and
``.../messages`` (Anthropic) are LLM calls and are recorded
(:class:`recorder.recording.Recording`); every other path is only passed
through. With ``hints`` the forwarded body of an LLM call gets the session
and tool hints in ``vllm_xargs`` and the request an ``X-Session-ID`` header
(``docs/record.md``).

Failures: an unreachable upstream answers 502 and a timeout 504, with an
error body in the API's format; an upstream that breaks off a stream breaks
off the answer to the client too (the connection is closed without the
final chunk). All are recorded (:meth:`Recording.fail`).

Cost per call (the budget is under 1 ms; ``experiments/bench_record.py`` measures
the whole proxy): the upstream client is :mod:`recorder.upstream` (httptools parsing,
kept-alive connections: about half of aiohttp's cost, a third of httpx's); the app is
plain ASGI (Starlette's request, response and routing objects cost about 0.1 ms a
call); the recording's work runs a few milliseconds after the events it records
(:class:`_Jobs`).
"""

from __future__ import annotations

import asyncio
import json
import zlib
from collections import deque
from collections.abc import Callable
from urllib.parse import urlsplit

from recorder.recording import CallStart, Recording
from recorder.responses import StreamReader, read_body
from recorder.upstream import Answer, Broken, Unreachable, Upstream

__all__ = ["api_of", "make_app"]

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding", "expect"}
_HOP_OUT = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}


def api_of(method: str, path: str) -> str | None:
    """Which recorded API a request is (``chat``, ``completions``, ``messages``), or None."""
    if method != "POST":
        return None
    path = path.rstrip("/")
    if path.endswith("/chat/completions"):
        return "chat"
    if path.endswith("/completions"):
        return "completions"
    if path.endswith("/messages"):
        return "messages"
    return None


class _Jobs:
    """The recording's work on the calls (reading a request, finishing a call, noting a failure),
    queued as the events happen and run in that order ``delay_s`` later, off the calls' paths.

    On a machine with few cores, the process that a forwarded request or an answer wakes (the
    upstream, the agent) is often put on the proxy's core and waits for the proxy to yield it: work
    done right after a send delays the very call it records (``experiments/bench_record.py``
    measured 0.2-0.3 ms a call; after a 1 ms delay still as much, as the loop's timer can fire at
    once after a long wait: 5 ms is past it). Run in order, the jobs leave the recording as if each
    had run at once; :meth:`run_all` runs what is queued before anything that needs the recording
    up to date (a call whose hints go upstream with it, the close). A job that raises is logged
    and skipped.
    """

    def __init__(self, log: Callable[[str], None], delay_s: float = 0.005):
        self._queue: deque[Callable[[], None]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._log = log
        self.delay_s = delay_s

    def add(self, job: Callable[[], None]) -> None:
        self._queue.append(job)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.delay_s, self.run_all)

    def run_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._queue:
            job = self._queue.popleft()
            try:
                job()
            except Exception as e:  # a bug in the recording must not stop the others (or the agent)
                self._log(f"recording error, a call is missing from the trace ({type(e).__name__}: {e})")


class _Call:
    """A recorded call on its way: its :class:`CallStart` once its request is read (None: not a JSON object)."""

    __slots__ = ("api", "start")

    def __init__(self, api: str):
        self.api = api
        self.start: CallStart | None = None


def _decoder(encoding: str) -> Callable[[bytes], bytes] | None:
    """Incremental decoder for a content encoding the upstream used anyway (identity: None)."""
    if encoding in ("gzip", "x-gzip", "deflate"):
        d = zlib.decompressobj(47 if encoding != "deflate" else 15)
        return d.decompress
    return None


def _raw_headers(headers: list[tuple[bytes, bytes]], length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(k, v) for k, v in headers if k.lower() not in _HOP_OUT]
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    return out


async def _answer(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(send, api: str | None, status: int, message: str) -> None:
    """An error answer in the API's own format (the upstream gave none)."""
    if api == "messages":
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
    else:
        body = {"error": {"message": message, "type": "upstream_error", "code": status}}
    data = json.dumps(body).encode()
    await _answer(send, status, [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
                  data)


async def _disconnect(receive) -> None:
    """Returns once the client has gone (the request's body is read by then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def make_app(upstream: str, recording: Recording | None, hints: bool = False, timeout_s: float = 600.0,
             log: Callable[[str], None] = lambda line: None):
    """The proxy, an ASGI app. ``recording`` is closed when the app shuts down (ASGI lifespan);
    ``log`` gets one line per failure."""
    base = upstream.rstrip("/")
    u = urlsplit(base)
    shown = f"{u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "") + u.path
    state: dict = {}
    jobs = _Jobs(log)

    async def lifespan(receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                state["client"] = Upstream(base, connect_timeout_s=10.0, read_timeout_s=timeout_s)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    state["client"].close()
                finally:
                    if recording is not None:
                        jobs.run_all()
                        recording.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def read(call: _Call, body: bytes, header: str | None, t_in: float) -> dict | None:
        """Read the call's request (:meth:`Recording.begin`) if it is a JSON object; returns the object."""
        try:
            data = json.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        call.start = recording.begin(call.api, data, header, t_in)
        return data

    def failed(call: _Call | None, status: int, kind: str, out=None, message: str = "") -> None:
        """Queue the failure's note in the trace and its log line."""
        t = recording.clock() if call is not None else 0.0

        def job() -> None:
            start = call.start if call is not None else None
            if start is not None:
                recording.fail(start, status, kind, out, t)
            log(f"{kind}: {message or status}" + (f" (session {start.session_id})" if start is not None else ""))
        jobs.add(job)

    async def proxy(scope, receive, send) -> None:
        parts = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away before its request was whole
            parts.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        method = scope["method"]
        api = api_of(method, scope["path"]) if recording is not None else None
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        headers = [(k, v) for k, v in headers if k not in _HOP]
        headers.append(("accept-encoding", "identity"))
        call = None
        if api is not None:
            named = next((v for k, v in headers if k == "x-session-id"), None)
            call, t_in = _Call(api), recording.clock()
            if not hints:
                jobs.add(lambda: read(call, body, named, t_in))
            else:  # the hints go upstream with the call: it is read now, the recording brought up to date first
                jobs.run_all()
                data = read(call, body, named, t_in)
                if call.start is not None:
                    xargs = data.get("vllm_xargs")
                    data["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), **call.start.hints()}
                    body = json.dumps(data, ensure_ascii=False).encode()
                    headers = [(k, v) for k, v in headers if k != "x-session-id"]
                    headers.append(("x-session-id", call.start.session_id))
        query = scope.get("query_string") or b""
        target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1") + \
            (f"?{query.decode('latin-1')}" if query else "")  # as sent, not requoted
        try:
            resp = await state["client"].request(method, target, headers, body)
        except TimeoutError:
            failed(call, 504, "timeout", message=f"upstream {shown} timed out")
            return await _error(send, api, 504, f"upstream {shown} timed out (cwsim record)")
        except (Unreachable, Broken) as e:
            failed(call, 502, "unreachable", message=f"upstream {shown} unreachable ({e})")
            return await _error(send, api, 502, f"upstream {shown} unreachable: {e} (cwsim record)")
        decode = _decoder(resp.header("content-encoding").lower())
        if resp.header("content-type").startswith("text/event-stream"):
            await send({"type": "http.response.start", "status": resp.status, "headers": _raw_headers(resp.headers, None)})
            relay = asyncio.ensure_future(_relay(send, resp, call, decode))
            gone = asyncio.ensure_future(_disconnect(receive))
            await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
            for task in (gone, relay):
                task.cancel()  # the client went away: the relay stops (and records that)
            await asyncio.gather(relay, gone, return_exceptions=True)
            return
        try:
            content = await resp.read()
        except (Broken, TimeoutError) as e:
            failed(call, 502, "broken", message=f"upstream {shown} broke off its answer ({type(e).__name__})")
            return await _error(send, api, 502, f"upstream {shown} broke off its answer (cwsim record)")
        if call is not None:
            if resp.status < 400:
                t_done = recording.clock()
                jobs.add(lambda: call.start and recording.finish(
                    call.start, read_body(api, decode(content) if decode else content), t_done))
            else:
                failed(call, resp.status, "upstream_error", message=f"upstream answered {resp.status}")
        await _answer(send, resp.status, _raw_headers(resp.headers, len(content)), content)

    async def _relay(send, resp: Answer, call: _Call | None, decode) -> None:
        """A streamed answer, chunk by chunk as the chunks arrive; when the upstream breaks off, the answer
        breaks off too (no final chunk: the connection is closed)."""
        reader = StreamReader(call.api) if call is not None else None
        sending = None  # a chunk on its way to the client, not yet read
        try:
            async for chunk in resp.chunks():
                sending = chunk
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sending = None
                if reader is not None:
                    reader.feed(decode(chunk) if decode else chunk)
        except (Broken, TimeoutError) as e:
            kind = "timeout" if isinstance(e, TimeoutError) else "broken"
            failed(call, resp.status, kind, reader.out if reader else None,
                   f"upstream {shown} broke off a stream ({type(e).__name__})")
            return
        except asyncio.CancelledError:  # the client went away: so does the upstream's connection
            resp.close()
            if reader is not None and sending is not None:  # it may have got it (and closed after it)
                reader.feed(decode(sending) if decode else sending)
            if reader is not None and reader.ended:  # after the answer's last event: a whole answer
                finished(call, resp, reader)
            else:
                failed(call, resp.status, "client_closed", reader.out if reader else None,
                       "the client closed a stream")
            raise
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if call is not None:
            finished(call, resp, reader)

    def finished(call: _Call, resp: Answer, reader: StreamReader) -> None:
        """A streamed answer went to the client whole: queue its line (or its failure, for an error stream)."""
        out = reader.finish()
        if resp.status >= 400 or out.error:
            failed(call, resp.status, "stream_error" if out.error else "upstream_error", out,
                   f"upstream answered {resp.status}" + (f" with a stream error {out.error}" if out.error else ""))
        else:
            t_done = recording.clock()
            jobs.add(lambda: call.start and recording.finish(call.start, out, t_done))

    async def app(scope, receive, send) -> None:
        if scope["type"] == "http":
            await proxy(scope, receive, send)
        elif scope["type"] == "lifespan":
            await lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})  # not an API the proxy speaks

    return app
