"""The recording reverse proxy: an ASGI app (Starlette) that forwards to the upstream with aiohttp.

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

The upstream client is aiohttp's, not httpx's: on the project's machine one request
through ``httpx.AsyncClient`` costs about 1.3 ms against 0.3 ms through
``aiohttp.ClientSession`` (``experiments/bench_record.py`` measures the whole proxy),
and the proxy's budget is under 1 ms per call.
"""

from __future__ import annotations

import contextlib
import json
import zlib
from urllib.parse import urlsplit
from collections.abc import Callable

import aiohttp
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from recorder.recording import Recording
from recorder.responses import StreamReader, read_body

__all__ = ["api_of", "make_app"]

_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
        "transfer-encoding", "upgrade", "host", "content-length", "accept-encoding"}
_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


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


class _Broken(Exception):
    """The upstream broke off a streamed answer."""


class _PassThrough(StreamingResponse):
    """A streamed answer that, when the upstream breaks off, breaks off too (no final chunk).
    ``after`` is run once the answer is complete (the recording's work, off the client's path)."""

    after: Callable[[], None] | None = None

    async def stream_response(self, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except _Broken:
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.after is not None:
            self.after()


class _Deferred:
    """The recording's work on finished calls, run after their answers are sent (off the client's
    path), and in any case before the next call is matched to a session or the recording closes."""

    def __init__(self):
        self._jobs: dict[object, Callable[[], None]] = {}

    def add(self, f: Callable[[], None]) -> Callable[[], None]:
        key = object()
        self._jobs[key] = f

        def run() -> None:
            job = self._jobs.pop(key, None)
            if job is not None:
                job()
        return run

    def run_all(self) -> None:
        for key in list(self._jobs):
            job = self._jobs.pop(key, None)
            if job is not None:
                job()


def _background(f: Callable[[], None]) -> BackgroundTask:
    async def run() -> None:  # on the event loop (a sync BackgroundTask would go to a thread)
        f()
    return BackgroundTask(run)


def _decoder(encoding: str) -> Callable[[bytes], bytes] | None:
    """Incremental decoder for a content encoding the upstream used anyway (identity: None)."""
    if encoding in ("gzip", "x-gzip", "deflate"):
        d = zlib.decompressobj(47 if encoding != "deflate" else 15)
        return d.decompress
    return None


def _raw_headers(headers, length: int | None) -> list[tuple[bytes, bytes]]:
    out = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()
           if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")]
    if length is not None:
        out.append((b"content-length", str(length).encode()))
    return out


def _error(api: str | None, status: int, message: str) -> Response:
    """An error answer in the API's own format (the upstream gave none)."""
    if api == "messages":
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
    else:
        body = {"error": {"message": message, "type": "upstream_error", "code": status}}
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def make_app(upstream: str, recording: Recording | None, hints: bool = False, timeout_s: float = 600.0,
             log: Callable[[str], None] = lambda line: None) -> Starlette:
    """The proxy app. ``recording`` is closed when the app shuts down; ``log`` gets one line per failure."""
    base = upstream.rstrip("/")
    u = urlsplit(base)
    shown = f"{u.scheme}://{u.hostname}" + (f":{u.port}" if u.port else "") + u.path
    state: dict = {}
    deferred = _Deferred()

    @contextlib.asynccontextmanager
    async def lifespan(app):
        state["client"] = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0, sock_read=timeout_s),
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60), auto_decompress=False,
            trust_env=False, skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))
        try:
            yield
        finally:
            await state["client"].close()
            if recording is not None:
                deferred.run_all()
                recording.close()

    def failed(start, status: int, kind: str, out=None, message: str = "") -> None:
        if start is not None:
            recording.fail(start, status, kind, out)
        log(f"{kind}: {message or status}" + (f" (session {start.session_id})" if start is not None else ""))

    async def proxy(request: Request) -> Response:
        body = await request.body()
        api = api_of(request.method, request.url.path) if recording is not None else None
        headers = [(k, v) for k, v in request.headers.items() if k not in _HOP]
        headers.append(("accept-encoding", "identity"))
        start = None
        if api is not None:
            try:
                data = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict):
                deferred.run_all()
                start = recording.begin(api, data, request.headers.get("x-session-id"))
                if hints:
                    xargs = data.get("vllm_xargs")
                    data["vllm_xargs"] = {**(xargs if isinstance(xargs, dict) else {}), **start.hints()}
                    body = json.dumps(data, ensure_ascii=False).encode()
                    headers = [(k, v) for k, v in headers if k != "x-session-id"]
                    headers.append(("x-session-id", start.session_id))
        url = base + request.url.path + (f"?{request.url.query}" if request.url.query else "")
        client: aiohttp.ClientSession = state["client"]
        try:
            resp = await client.request(request.method, url, headers=headers, data=body, allow_redirects=False)
        except TimeoutError:
            failed(start, 504, "timeout", message=f"upstream {shown} timed out")
            return _error(api, 504, f"upstream {shown} timed out (cwsim record)")
        except aiohttp.ClientError as e:
            failed(start, 502, "unreachable", message=f"upstream {shown} unreachable ({type(e).__name__})")
            return _error(api, 502, f"upstream {shown} unreachable: {type(e).__name__} (cwsim record)")
        decode = _decoder(resp.headers.get("content-encoding", "").lower())
        if resp.headers.get("content-type", "").startswith("text/event-stream"):
            response = _PassThrough(b"")
            response.body_iterator = _stream(resp, start, decode, failed, response)
            response.status_code = resp.status
            response.raw_headers = _raw_headers(resp.headers, None)
            return response
        try:
            content = await resp.read()
        except (aiohttp.ClientError, TimeoutError) as e:
            failed(start, 502, "broken", message=f"upstream {shown} broke off its answer ({type(e).__name__})")
            return _error(api, 502, f"upstream {shown} broke off its answer (cwsim record)")
        finally:
            resp.release()
        background = None
        if start is not None:
            if resp.status < 400:
                t_done = recording.clock()
                background = _background(deferred.add(
                    lambda: recording.finish(start, read_body(api, decode(content) if decode else content), t_done)))
            else:
                failed(start, resp.status, "upstream_error", message=f"upstream answered {resp.status}")
        response = Response(content, status_code=resp.status, background=background)
        response.raw_headers = _raw_headers(resp.headers, len(content))
        return response

    async def _stream(resp: aiohttp.ClientResponse, start, decode, failed_cb, response: _PassThrough):
        reader = StreamReader(start.api) if start is not None else None
        try:
            async for chunk in resp.content.iter_any():
                yield chunk
                if reader is not None:
                    reader.feed(decode(chunk) if decode else chunk)
        except (aiohttp.ClientError, TimeoutError) as e:
            kind = "timeout" if isinstance(e, TimeoutError) else "broken"
            failed_cb(start, resp.status, kind, reader.out if reader else None,
                      f"upstream {shown} broke off a stream ({type(e).__name__})")
            raise _Broken() from None
        except BaseException:  # the client went away: the generator is cancelled or closed
            failed_cb(start, resp.status, "client_closed", reader.out if reader else None,
                      "the client closed a stream")
            raise
        finally:
            resp.release()
        if start is None:
            return
        out = reader.finish()
        if resp.status >= 400 or out.error:
            failed_cb(start, resp.status, "stream_error" if out.error else "upstream_error", out,
                      f"upstream answered {resp.status}" + (f" with a stream error {out.error}" if out.error else ""))
        else:
            t_done = recording.clock()
            response.after = deferred.add(lambda: recording.finish(start, out, t_done))

    routes = [Route("/{path:path}", proxy, methods=_METHODS)]
    return Starlette(routes=routes, lifespan=lifespan)
