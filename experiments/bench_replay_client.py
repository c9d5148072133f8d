"""Benchmark the live replay client's own overhead per call (target: under 1 ms).

What it measures
    The CPU time ``replay.live.run_live`` spends per LLM call: building the
    prompt's token ids (``TokenBook``), encoding the request, streaming and
    decoding the answer's chunks, the closed-loop bookkeeping and the result
    files. The server is a stand-in that answers at once (a separate process,
    so its CPU is not counted): it streams the answer the way vLLM 0.32's
    ``/v1/completions`` does with ``stream``, ``return_token_ids`` and
    ``include_usage`` (one chunk per token, the prompt's ids in the first, a
    usage chunk, ``[DONE]``), or, by default, as one JSON answer with the
    generated ids as logprob tokens (``token_id:N``), the usage and the
    per-request metrics. The client's CPU time (``time.process_time``)
    over the calls is the overhead: wall time would include the stand-in's.
    Two runs, of N and 2N sessions, after a warm-up (imports): the per-call
    figure is the difference over the extra calls, so the run's fixed costs
    (the HTTP client, the files, the final scrape) are left out; they are
    printed separately, spread over the calls of the larger run.

Run
    python experiments/bench_replay_client.py [--sessions 40] [--turns 10] [--agents 8] [--stream]

It prints calls, output tokens per call, client CPU ms per call and per output token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: the stand-in server: vLLM's streamed completion wire format, answered at once
STUB = r'''
import asyncio, json, sys

async def handle(reader, writer):
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            path = lines[0].split()[1]
            n = next((int(l.split(":")[1]) for l in lines if l.lower().startswith("content-length")), 0)
            body = json.loads(await reader.readexactly(n)) if n else {}
            if path == "/v1/models":
                data = b'{"data":[{"id":"stub"}]}'
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(data) + data)
            elif path == "/metrics":
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            elif not body.get("stream"):
                prompt, n = body["prompt"], body["max_tokens"]
                d = {"id": "x", "object": "text_completion", "created": 0, "model": "stub",
                     "choices": [{"index": 0, "text": "a" * n, "finish_reason": "length",
                                  "logprobs": {"text_offset": list(range(n)), "token_logprobs": [-1.5] * n,
                                               "tokens": ["token_id:%d" % (5 + i % 7) for i in range(n)],
                                               "top_logprobs": [{"token_id:%d" % (5 + i % 7): -1.5}
                                                                for i in range(n)]}}],
                     "usage": {"prompt_tokens": len(prompt), "completion_tokens": n,
                               "prompt_tokens_details": {"cached_tokens": 0}},
                     "metrics": {"queue_time_ms": 0.1, "time_to_first_token_ms": 1.0}}
                data = json.dumps(d).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                             % len(data) + data)
            else:
                out = []
                prompt = body["prompt"]
                for i in range(body["max_tokens"]):
                    ch = {"id": "x", "object": "text_completion", "created": 0, "model": "stub",
                          "choices": [{"index": 0, "text": "a", "logprobs": None, "finish_reason": None,
                                       "token_ids": [5 + i % 7]}]}
                    if i == 0:
                        ch["choices"][0]["prompt_token_ids"] = prompt
                    out.append(b"data: " + json.dumps(ch).encode() + b"\n\n")
                usage = {"id": "x", "created": 0, "model": "stub", "choices": [],
                         "usage": {"prompt_tokens": len(prompt), "completion_tokens": body["max_tokens"],
                                   "prompt_tokens_details": {"cached_tokens": 0}}}
                out.append(b"data: " + json.dumps(usage).encode() + b"\n\n")
                out.append(b"data: [DONE]\n\n")
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for piece in out:
                    writer.write(b"%x\r\n" % len(piece) + piece + b"\r\n")
                writer.write(b"0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass
    finally:
        writer.close()

async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(srv.sockets[0].getsockname()[1], flush=True)
    await srv.serve_forever()

asyncio.run(main())
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", type=int, default=40)
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--agents", type=int, default=8)
    ap.add_argument("--stream", action="store_true", help="stream the answers (one chunk per token)")
    args = ap.parse_args()

    from replay.live import LiveConfig, run_live
    from tests.oracle_workloads import agent_sessions
    from traces.format import Trace

    def make(n):
        return Trace(agent_sessions(n, args.turns, 0, system=2000, task=(200, 800), output=(20, 200),
                                    tool=(50, 1500), gap=(0, 0)), source="bench")

    stub = subprocess.Popen([sys.executable, "-c", STUB], stdout=subprocess.PIPE, text=True)
    try:
        port = int(stub.stdout.readline())
        cfg = LiveConfig(server=f"http://127.0.0.1:{port}", agents=args.agents, time_scale=0.0, settle_s=0.0, warmup=False,
                         stream=args.stream)

        def timed(trace):
            with tempfile.TemporaryDirectory() as tmp:
                cpu0, wall0 = time.process_time(), time.perf_counter()
                res = run_live(trace, cfg, tmp)
                cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            assert res.summary["requests"] == sum(len(s.calls) for s in trace.sessions), res.summary
            return cpu, wall

        timed(make(2))  # imports and first-use costs, not counted
        small, big = make(args.sessions), make(2 * args.sessions)
        (cpu_s, wall_s), (cpu_b, wall_b) = timed(small), timed(big)
    finally:
        stub.terminate()
        stub.wait()
    calls_s, calls_b = (sum(len(s.calls) for s in t.sessions) for t in (small, big))
    calls = [c for s in big.sessions for c in s.calls]
    extra = calls_b - calls_s
    print(json.dumps({
        "stream": args.stream,
        "calls": [calls_s, calls_b],
        "mean_prompt_tokens": round(sum(c.prompt_tokens for c in calls) / len(calls), 1),
        "mean_output_tokens": round(sum(c.output_tokens for c in calls) / len(calls), 1),
        "client_cpu_ms_per_call": round(1000 * (cpu_b - cpu_s) / extra, 3),
        "client_cpu_ms_per_call_with_fixed_costs": round(1000 * cpu_b / calls_b, 3),
        "wall_ms_per_call_with_stub": round(1000 * (wall_b - wall_s) / extra, 3),
    }, indent=1))


if __name__ == "__main__":
    main()
