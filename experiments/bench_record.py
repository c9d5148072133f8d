"""How much latency the recording proxy (`cwsim record`) adds, per call and per streamed chunk.

A fast in-process upstream (Starlette/uvicorn, canned OpenAI answers, no model) runs in one child
process, the recording proxy in another, the client (httpx) here. Every figure is a paired
comparison: the same requests straight to the upstream and through the proxy, interleaved.

* per call: agent-like sessions of growing chat prompts (each call's messages extend the previous
  call's, as an agent's do), non-streamed; median and p90 of the client's wall time per call;
  added = median(proxied) - median(direct). Done for a small prompt (~2 KB) and a large one
  (~400 KB, about 100k tokens).
* per chunk: streamed answers of CHUNKS events, the upstream stamping each event with its send
  time (time.perf_counter, CLOCK_MONOTONIC, the same clock in every process) and pausing 2 ms between
  events; the client's arrival time minus the stamp, direct vs proxied.

Target: under 1 ms added per call; chunks forwarded as they arrive (added per chunk well under 1 ms).

    python experiments/bench_record.py [--calls 200] [--streams 40]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

CHUNKS = 50


def _upstream(q) -> None:
    import asyncio

    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    answer = json.dumps({"id": "c", "object": "chat.completion", "created": 0, "model": "m", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "ok", "tool_calls": [
            {"id": "t", "type": "function", "function": {"name": "bash", "arguments": "{\"command\":\"pytest -q\"}"}}]},
         "finish_reason": "tool_calls"}], "usage": {"prompt_tokens": 1000, "completion_tokens": 20}}).encode()

    async def chat(request):
        body = await request.json()
        if not body.get("stream"):
            return Response(answer, media_type="application/json")

        async def events():
            for i in range(CHUNKS):
                chunk = {"choices": [{"index": 0, "delta": {"content": "w "}}], "t": time.perf_counter()}
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                await asyncio.sleep(0.002)
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))

    async def main():
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.01)
        q.put(server.servers[0].sockets[0].getsockname()[1])
        await task
    asyncio.run(main())


def _proxy(upstream: str, out: str | None, q) -> None:
    """The recording proxy (``out`` a trace path), or with ``out`` None the same proxy recording nothing."""
    import threading

    import uvicorn

    from recorder import RecordingProxy
    from recorder.proxy import make_app

    if out is not None:
        with RecordingProxy(upstream, out) as px:
            q.put(px.url)
            while True:
                time.sleep(3600)
    server = uvicorn.Server(uvicorn.Config(make_app(upstream, None), host="127.0.0.1", port=0, log_level="warning",
                                           access_log=False))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    q.put(f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}")
    while True:
        time.sleep(3600)


def _sessions(prompt_chars: int):
    """Request bodies of agent sessions: 10 turns each, every call extending the previous one."""
    k = 0
    while True:
        msgs = [{"role": "system", "content": "s" * (prompt_chars // 2)},
                {"role": "user", "content": f"task {k} " + "t" * (prompt_chars // 4)}]
        step = max(1, prompt_chars // 40)
        for turn in range(10):
            yield {"model": "m", "messages": list(msgs)}
            msgs += [{"role": "assistant", "content": "ok", "tool_calls": [{"id": "t", "type": "function", "function": {
                "name": "bash", "arguments": "{\"command\":\"pytest -q\"}"}}]},
                     {"role": "tool", "tool_call_id": "t", "content": f"r{k}.{turn} " + "o" * step}]
        k += 1


def _per_call(client, paths: dict[str, str], calls: int, prompt_chars: int) -> dict:
    """Median wall time per path, and the median of the paired differences to ``direct``."""
    gens = {name: _sessions(prompt_chars) for name in paths}
    walls: dict[str, list[float]] = {name: [] for name in paths}
    for i in range(calls + 20):
        for name, base in paths.items():
            body = json.dumps(next(gens[name])).encode()
            t = time.perf_counter()
            r = client.post(base + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            dt = time.perf_counter() - t
            assert r.status_code == 200
            if i >= 20:  # warm-up
                walls[name].append(dt)
    row = {"prompt_kb": round(prompt_chars * 1.5 / 1024)}
    for name, v in walls.items():
        row[name] = statistics.median(v) * 1e3
        if name != "direct":
            row[f"added {name}"] = statistics.median(a - b for a, b in zip(v, walls["direct"])) * 1e3
    return row


def _per_chunk(client, direct: str, proxied: str, streams: int) -> dict:
    lat = {"direct": [], "proxied": []}
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "x" * 2000}]}
    for i in range(streams + 3):
        for name, base in (("direct", direct), ("proxied", proxied)):
            with client.stream("POST", base + "/v1/chat/completions", json=body) as r:
                buf = b""
                for raw in r.iter_raw():
                    now = time.perf_counter()
                    buf += raw
                    *events, buf = buf.split(b"\n\n")
                    for e in events:
                        if e.startswith(b"data: {") and i >= 3:
                            lat[name].append(now - json.loads(e[6:])["t"])
    med = {k: statistics.median(v) * 1e3 for k, v in lat.items()}
    return {"chunks": len(lat["proxied"]), "direct_ms": med["direct"], "proxied_ms": med["proxied"],
            "added_ms": med["proxied"] - med["direct"],
            "proxied_p99_ms": statistics.quantiles(lat["proxied"], n=100)[-1] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=200, help="non-streamed calls per prompt size and path")
    ap.add_argument("--streams", type=int, default=40, help=f"streamed answers ({CHUNKS} chunks each) per path")
    args = ap.parse_args()
    import httpx

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        up = ctx.Process(target=_upstream, args=(q,), daemon=True)
        up.start()
        upstream = f"http://127.0.0.1:{q.get(timeout=60)}"
        out = str(Path(tmp) / "bench.jsonl")
        procs = [up]
        paths = {"direct": upstream}
        for name, trace in (("proxy only", None), ("recording", out)):
            p = ctx.Process(target=_proxy, args=(upstream, trace, q), daemon=True)
            p.start()
            procs.append(p)
            paths[name] = q.get(timeout=60)
        try:
            with httpx.Client(timeout=60) as client:
                rows = [_per_call(client, paths, args.calls, n) for n in (1400, 270_000)]
                chunk = _per_chunk(client, upstream, paths["recording"], args.streams)
        finally:
            for p in procs:
                p.terminate()
                p.join(10)
        lines = sum(1 for _ in open(out)) - 1 if Path(out).exists() else 0
    import os

    print("cwsim record: added latency (paired with direct calls to the same in-process upstream; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    print("per call (median ms): direct | through the proxy recording nothing | through the recording proxy |"
          " added by each (median of paired differences)")
    for r in rows:
        print(f"  prompt {r['prompt_kb']:>4} KB: {r['direct']:7.3f} | {r['proxy only']:7.3f} | {r['recording']:7.3f} |"
              f" added {r['added proxy only']:6.3f} / {r['added recording']:6.3f}")
    print(f"per chunk  {chunk['chunks']} chunks: direct {chunk['direct_ms']:.3f} ms, proxied {chunk['proxied_ms']:.3f} ms, "
          f"added {chunk['added_ms']:.3f} ms (proxied p99 {chunk['proxied_p99_ms']:.3f} ms)")
    print(f"trace lines written by the proxy (held calls are in its journal): {lines}")
    print("target: added < 1 ms per call -> " + ("met" if rows[0]["added recording"] < 1.0 else "NOT met")
          + " for the small prompt (a loaded machine adds process wake-ups to every hop)")


if __name__ == "__main__":
    main()
