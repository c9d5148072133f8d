"""Run a recording: open the trace, serve the proxy on a loopback port, close cleanly.

:func:`record` is what ``cwsim record`` runs (blocking until Ctrl-C);
:class:`RecordingProxy` runs the same proxy in a background thread, for tests
and notebooks::

    with RecordingProxy("http://127.0.0.1:8000", "trace.jsonl") as proxy:
        client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="x")
        ...
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import uvicorn

from recorder.proxy import make_app
from recorder.recording import Recording
from recorder.writer import RecordingError, TraceAppender

__all__ = ["RecordingProxy", "open_recording", "parse_listen", "record"]

DEFAULT_LISTEN = "127.0.0.1:8790"


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; ``PORT`` alone means loopback) as (host, port)."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port)
        if not 0 <= p <= 65535:
            raise ValueError
    except ValueError:
        raise RecordingError(f"--listen {listen}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}") from None
    return host, p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_upstream(upstream: str) -> str:
    """The upstream as shown in the header: scheme, host, port and path (never credentials or a query)."""
    try:
        u = urlsplit(upstream)
        port = u.port
    except ValueError:
        u = port = None
    if u is None or u.scheme not in ("http", "https") or not u.hostname:
        raise RecordingError(f"--upstream {upstream}: expected an http(s) URL such as http://127.0.0.1:8000")
    host = f"[{u.hostname}]" if ":" in u.hostname else u.hostname
    return f"{u.scheme}://{host}" + (f":{port}" if port else "") + u.path.rstrip("/")


def _salt(salt_file: str | os.PathLike | None) -> str:
    """A fresh secret salt, or the one kept in ``salt_file`` (created, mode 0600, when missing)."""
    if salt_file is None:
        return secrets.token_hex(16)
    p = Path(salt_file)
    if p.exists():
        salt = p.read_text().strip()
        if not salt:
            raise RecordingError(f"--salt-file {p}: empty")
        return salt
    salt = secrets.token_hex(16)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(salt + "\n")
    return salt


def open_recording(out, upstream: str, hints: bool = False, append: bool = False,
                   salt_file: str | os.PathLike | None = None) -> Recording:
    """The trace file opened (after recovering a crashed recording of it) and a fresh :class:`Recording`."""
    upstream_shown = _check_upstream(upstream)
    name = secrets.token_hex(3)
    header = {
        "source": "cwsim record",
        "recording": name,
        "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "upstream": upstream_shown,
        "hints": hints,
        "segment_ids": "chained sha256 of the content with a secret salt of the recording (not stored)",
        "tokens": "upstream usage; per segment estimated (4 chars/token) and scaled to it",
        "docs": "docs/record.md",
    }
    writer = TraceAppender(out, header, append=append)
    rec = Recording(writer, _salt(salt_file), name, known_turns=writer.next_turns)
    rec.recovered = writer.recovered
    return rec


def _bind(listen: str) -> socket.socket:
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RecordingError(f"--listen {listen}: cannot listen there ({e.strerror})") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def _server(app, graceful_s: float) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=graceful_s,
                            access_log=False, server_header=False, date_header=False, proxy_headers=False)
    return uvicorn.Server(config)


def _stderr(line: str) -> None:
    print(f"cwsim record: {line}", file=sys.stderr, flush=True)


def record(upstream: str, out, listen: str = DEFAULT_LISTEN, hints: bool = False, append: bool = False,
           timeout_s: float = 600.0, salt_file=None, log: Callable[[str], None] = _stderr,
           on_ready: Callable[[str], None] | None = None) -> Recording:
    """Record until interrupted (Ctrl-C: in-flight calls get ``graceful_s`` = 5 s to finish, then the
    held calls are written and the file closed). Returns the closed recording (its counters)."""
    sock = _bind(listen)
    try:
        rec = open_recording(out, upstream, hints, append, salt_file)
    except BaseException:
        sock.close()
        raise
    try:
        host, port = sock.getsockname()[:2]
        if not is_loopback(host):
            log(f"listening on {host}, not loopback: anyone who reaches port {port} can use the upstream")
        server = _server(make_app(upstream, rec, hints, timeout_s, log), 5)
        if on_ready is not None:
            on_ready(f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}")
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:
            pass  # uvicorn re-raises the Ctrl-C it handled: the stop the user asked for
    finally:
        rec.close()
        sock.close()
    return rec


class RecordingProxy:
    """The recording proxy in a background thread (loopback, a free port): ``url`` once entered."""

    def __init__(self, upstream: str, out, hints: bool = False, append: bool = False, timeout_s: float = 600.0,
                 salt_file=None, listen: str = "127.0.0.1:0"):
        self.sock = _bind(listen)
        try:
            self.recording = open_recording(out, upstream, hints, append, salt_file)
        except BaseException:
            self.sock.close()
            raise
        self.log: list[str] = []
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self._server = _server(make_app(upstream, self.recording, hints, timeout_s, self.log.append), 1)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RecordingError("the recording proxy did not start")
            threading.Event().wait(0.01)
        return self

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.recording.close()
        self.sock.close()

    def __exit__(self, *exc) -> None:
        self.close()
