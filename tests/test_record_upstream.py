"""The recording proxy's upstream client (recorder.upstream) against scripted raw servers: the bytes it
sends, keep-alive, a pooled connection the server closed, answers chunked, until close, broken, not
HTTP, HEAD, timeouts, an unreachable port and TLS."""

import asyncio
import logging
import os
import shutil
import socket
import ssl
import subprocess

import pytest

from recorder.upstream import Broken, Unreachable, Upstream

OK = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"


async def _read_request(reader) -> bytes | None:
    """One request (head and content-length body) as bytes, or None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0)
    return head + (await reader.readexactly(length) if length else b"")


class Server:
    """A raw TCP server: ``handle(k, reader, writer)`` per connection ``k``; keeps every request's bytes."""

    def __init__(self, handle, ssl_context=None):
        self.handle, self.ssl = handle, ssl_context
        self.requests: list[tuple[int, bytes]] = []
        self.connections = 0

    async def __aenter__(self):
        async def on_connect(reader, writer):
            k = self.connections
            self.connections += 1
            try:
                await self.handle(self, k, reader, writer)
            finally:
                writer.close()
        self.server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def next_request(self, k, reader):
        req = await _read_request(reader)
        if req is not None:
            self.requests.append((k, req))
        return req


async def answer_all(server, k, reader, writer, answer=OK):
    while await server.next_request(k, reader) is not None:
        writer.write(answer)
        await writer.drain()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))  # a hang fails the test instead of stalling the run


def test_the_request_bytes_and_keep_alive():
    async def main():
        async with Server(answer_all) as srv:
            up = Upstream(f"http://127.0.0.1:{srv.port}/base/")
            a = await up.request("POST", "/v1/chat/completions?x=%2F", [("content-type", "application/json")], b'{"a":1}')
            assert (a.status, a.header("Content-Type"), await a.read()) == (200, "application/json", b"{}")
            b = await up.request("GET", "/v1/models", [], b"")
            assert await b.read() == b"{}"
            up.close()
            return srv
    srv = run(main())
    assert srv.connections == 1  # the second request reused the first's connection
    host = f"host: 127.0.0.1:{srv.port}".encode()
    assert srv.requests == [
        (0, b"POST /base/v1/chat/completions?x=%2F HTTP/1.1\r\n" + host + b"\r\ncontent-type: application/json\r\n"
            b"content-length: 7\r\n\r\n{\"a\":1}"),
        (0, b"GET /base/v1/models HTTP/1.1\r\n" + host + b"\r\n\r\n")]


def test_a_pooled_connection_the_server_closed_is_replaced():
    async def once_then_close(server, k, reader, writer):
        """Answers a connection's first request; a second one on it is read and the connection closed."""
        await server.next_request(k, reader)
        writer.write(OK)
        await writer.drain()
        await server.next_request(k, reader)

    async def main():
        async with Server(once_then_close) as srv:
            up = Upstream(f"http://127.0.0.1:{srv.port}")
            for _ in range(3):
                a = await up.request("POST", "/x", [], b"{}")
                assert await a.read() == b"{}"
            up.close()
            return srv
    srv = run(main())
    # each later request went out on the pooled connection, which the server closed unanswered: sent again
    assert [k for k, _ in srv.requests] == [0, 0, 1, 1, 2]


def test_chunked_and_head_answers():
    chunked = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: text/event-stream\r\n\r\n"
               b"5\r\ndata:\r\n3\r\n 1\n\r\n0\r\n\r\n")

    async def scripted(server, k, reader, writer):
        while (req := await server.next_request(k, reader)) is not None:
            if req.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n")  # the length a GET would get
            else:
                writer.write(chunked)
            await writer.drain()

    async def main():
        async with Server(scripted) as srv:
            up = Upstream(f"http://127.0.0.1:{srv.port}")
            a = await up.request("GET", "/stream", [], b"")
            got = [c async for c in a.chunks()]
            h = await up.request("HEAD", "/", [], b"")
            head_body = await asyncio.wait_for(h.read(), 5)
            again = await asyncio.wait_for((await up.request("GET", "/stream", [], b"")).read(), 5)
            up.close()
            return got, head_body, h.status, again, srv.connections
    got, head_body, head_status, again, connections = run(main())
    assert b"".join(got) == again == b"data: 1\n" and head_body == b"" and head_status == 200
    assert connections == 2  # after a HEAD answer the connection is not reused (its body length is unknown)


def test_an_answer_until_the_connection_closes():
    async def http10(server, k, reader, writer):
        await server.next_request(k, reader)
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nall of it")
        await writer.drain()

    async def main():
        async with Server(http10) as srv:
            up = Upstream(f"http://127.0.0.1:{srv.port}")
            a = await up.request("GET", "/", [], b"")
            body = await a.read()
            up.close()
            return body
    assert run(main()) == b"all of it"


def test_broken_not_http_timeout_and_unreachable():
    async def scripted(server, k, reader, writer):
        req = await server.next_request(k, reader)
        if b"/broken" in req:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
        elif b"/garbage" in req:
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        elif b"/silent" in req:
            await asyncio.sleep(5)
        await writer.drain()

    async def main():
        async with Server(scripted) as srv:
            up = Upstream(f"http://127.0.0.1:{srv.port}", read_timeout_s=0.2)
            a = await up.request("GET", "/broken", [], b"")
            got = []
            with pytest.raises(Broken, match="mid-answer"):
                async for c in a.chunks():
                    got.append(c)
            assert b"".join(got) == b"0123456789"
            with pytest.raises(Broken, match="not HTTP"):
                await up.request("GET", "/garbage", [], b"")
            t = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError):
                await up.request("GET", "/silent", [], b"")
            assert asyncio.get_running_loop().time() - t < 2
            up.close()
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        with pytest.raises(Unreachable, match="ConnectionRefusedError"):
            await Upstream(f"http://127.0.0.1:{port}").request("GET", "/", [], b"")
    run(main())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a test certificate")
def test_https_upstream(tmp_path, monkeypatch):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the client trusts it as it trusts the system's CAs
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)

    async def main():
        async with Server(answer_all, server_ctx) as srv:
            up = Upstream(f"https://localhost:{srv.port}")
            a = await up.request("POST", "/v1/messages", [], b"{}")
            body = await a.read()
            up.close()
            return body, srv.requests
    body, requests = run(main())
    assert body == b"{}" and requests[0][1].startswith(b"POST /v1/messages HTTP/1.1\r\nhost: localhost:")
    assert os.environ["SSL_CERT_FILE"] == str(cert)


def test_bytes_on_an_idle_connection_drop_it(caplog):
    """The connection is closed quietly (no protocol error for asyncio to log) and not reused."""
    async def chatty(server, k, reader, writer):
        while await server.next_request(k, reader) is not None:
            writer.write(OK + OK)  # one answer more than was asked for
            await writer.drain()

    async def main():
        async with Server(chatty) as srv:
            up = Upstream(f"http://127.0.0.1:{srv.port}")
            first = await (await up.request("GET", "/", [], b"")).read()
            await asyncio.sleep(0.1)  # the extra answer arrives on the idle connection
            second = await (await up.request("GET", "/", [], b"")).read()
            up.close()
            return first, second, srv.connections
    with caplog.at_level(logging.ERROR):
        assert run(main()) == (b"{}", b"{}", 2)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
