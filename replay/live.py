"""A trace replayed against a live vLLM server, closed loop, with its KV events and metrics recorded.

``run_live(trace, LiveConfig(server=URL, events=ENDPOINT, ...), out_dir)``
drives the trace's sessions through a vLLM OpenAI server (``cwreplay serve``
starts one) the way ``cwsim run`` drives its engine, in wall-clock seconds:

- the arrival rule is :class:`replay.closed_loop.ClosedLoop`'s (the oracle's
  too): call k+1 of a session is due when call k has returned and call k's gap
  times ``time_scale`` has passed; ``--agents`` sessions at once, or each at
  its recorded start (``--arrivals trace``);
- prompts are token-id lists from :class:`replay.tokens.TokenBook` (the
  oracle's deterministic tokens), and an output segment is the tokens the
  server really generated (logprob tokens as ``token_id:N``, or
  ``return_token_ids`` when streaming), so shared prefixes fall on
  the same block boundaries as in the simulator;
- every call asks for exactly its trace's output length (``max_tokens =
  min_tokens``, ``ignore_eos``, temperature 0) and carries ``session_id`` and
  ``vllm_xargs`` (turn, tool name and category of the response);
- an async HTTP client (aiohttp) streams each answer (time to first token) with
  at most ``max_in_flight`` requests open;
- the KV events are read as they come (:class:`replay.kv_events.EventStream`:
  every sequence number checked, gaps filled from the replay endpoint or
  reported) and ``/metrics`` is scraped before and after.

Files (``out_dir``), written as things finish: ``requests.csv`` (the ``cwsim
run`` columns, then ``sent_s, ttft_s, e2e_s``; times in seconds from the
attempt's start), ``sessions.csv``, ``evictions.csv`` (``step`` = the event
batch's sequence number, ``time_s``, ``block_hash``, ``attempt``),
``outputs.jsonl`` (generated tokens), ``run.json`` (what is being run and each
attempt's counters), and last, atomically, ``summary.json`` with ``source:
"vllm"`` and the ``cwsim run`` keys. A run stopped by a fault or Ctrl-C keeps
every finished session and writes a summary marked ``partial``; ``resume=True``
runs the unfinished sessions again from their first call (against the same
server or a fresh one) and sums the attempts.
"""

from __future__ import annotations

import asyncio
import csv
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cwsim.metrics import REQUEST_FIELDS, SESSION_FIELDS
from replay.closed_loop import ClosedLoop
from replay.kv_events import EventStream, KvEventError
from replay.server_metrics import cache_config, delta, parse_metrics
from replay.tokens import TokenBook
from traces.files import atomic_write_text, ensure_folder
from traces.format import Trace

LIVE_REQUEST_FIELDS = [*REQUEST_FIELDS, "sent_s", "ttft_s", "e2e_s"]
EVICTION_FIELDS = ["step", "time_s", "block_hash", "attempt"]
#: the files of a run (``--resume`` keeps them; a fresh run removes them first)
RUN_FILES = ("summary.json", "requests.csv", "sessions.csv", "evictions.csv", "outputs.jsonl", "run.json")


class ReplayError(RuntimeError):
    """The run cannot go on: one line naming the server, the endpoint or the file."""


class ReplayInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) during a run: ``out_dir`` holds the ``sessions_done`` finished sessions."""

    def __init__(self, sessions_done: int, out_dir: Path):
        super().__init__(sessions_done, out_dir)
        self.sessions_done = sessions_done
        self.out_dir = out_dir


@dataclass(frozen=True, slots=True)
class LiveConfig:
    server: str
    events: str | None = None  #: the KV event PUB endpoint; None: no eviction count
    events_replay: str | None = None  #: its replay endpoint; None: a lost batch is an error
    time_scale: float = 1.0
    max_sessions: int | None = None
    arrivals: str = "concurrent"
    agents: int = 4
    max_in_flight: int = 64
    request_timeout_s: float = 600.0
    settle_s: float = 0.5  #: wait after the last call before the final event catch-up and /metrics
    #: stream answers (first token timed by the client, one chunk per token); off: one JSON answer per
    #: call, the first token timed by the server's per-request metrics (queue + prefill), far cheaper
    stream: bool = False
    #: the policy the server runs (``cwreplay serve --policy``): recorded in summary.json, simulated by the comparison
    policy: str = "vllm"
    #: the trace the server's predictor was fitted on (``cwreplay serve --predictor-trace``): recorded,
    #: and what the comparison fits the simulated policy's predictor on
    predictor_trace: str | None = None
    #: the policy's settings on the server (``cwreplay serve --setting``, ``(name, value)`` pairs): recorded,
    #: and given to the simulated policy by the comparison
    policy_settings: tuple[tuple[str, object], ...] = ()
    #: warm the server before the clock starts (``replay.warmup``: the first calls' shapes, then the prefix
    #: cache emptied through vLLM's dev-mode ``/reset_prefix_cache``); off: the first wave pays its one-off costs
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"--max-in-flight must be >= 1, got {self.max_in_flight}")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ValueError(f"--max-sessions must be >= 1, got {self.max_sessions}")


@dataclass
class LiveResult:
    summary: dict
    out_dir: Path


# --------------------------------------------------------------------------- resume bookkeeping
def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def finished_sessions(out: Path) -> list[str]:
    """The sessions ``sessions.csv`` lists as finished, in finish order."""
    return [r["session_id"] for r in _rows(out / "sessions.csv")]


def keep_finished(out: Path, finished: set[str]) -> None:
    """Drop the calls of unfinished sessions from ``requests.csv`` and ``outputs.jsonl`` (they run again)."""
    req = out / "requests.csv"
    if req.exists():
        rows = [r for r in _rows(req) if r["session_id"] in finished]
        tmp = req.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, LIVE_REQUEST_FIELDS)
            w.writeheader()
            w.writerows(rows)
        tmp.replace(req)
    outs = out / "outputs.jsonl"
    if outs.exists():
        lines = [ln for ln in outs.read_text().splitlines() if ln and json.loads(ln)["session_id"] in finished]
        atomic_write_text(outs, "".join(ln + "\n" for ln in lines))


def load_outputs(out: Path) -> dict[tuple[str, int], list[int]]:
    """The tokens each finished call generated (``outputs.jsonl``)."""
    got = {}
    path = out / "outputs.jsonl"
    if path.exists():
        for ln in path.read_text().splitlines():
            if ln:
                d = json.loads(ln)
                got[(d["session_id"], int(d["turn"]))] = d["tokens"]
    return got


def plan(trace: Trace, config: LiveConfig, out: Path, resume: bool) -> tuple[list, dict]:
    """The sessions this attempt runs (indices into the trace's first ``max_sessions``) and the run state.

    A fresh run removes an earlier run's files; ``resume`` keeps the finished sessions and checks
    that ``out`` holds a run of the same trace and sessions.
    """
    sessions = list(trace.sessions[: config.max_sessions or None])
    ids = [s.session_id for s in sessions]
    state_path = out / "run.json"
    if resume and state_path.exists():
        state = json.loads(state_path.read_text())
        if state.get("sessions") != ids:
            raise ReplayError(f"--resume: {state_path} is a run of other sessions (trace "
                              f"{state.get('trace')!r}); give the same --trace and --max-sessions, or a new --out")
        done = set(finished_sessions(out))
        keep_finished(out, done)
    else:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        state = {"trace": trace.source, "sessions": ids, "attempts": []}
        done = set()
    todo = [i for i, s in enumerate(sessions) if s.session_id not in done]
    return [sessions[i] for i in todo], state


# --------------------------------------------------------------------------- one call
@dataclass(slots=True)
class _Done:
    si: int
    turn: int
    due: float
    sent: float
    first_token: float
    finish: float
    first_scheduled: float | None
    cached: int
    tokens: list[int]


def request_body(call, prompt, model: str, session_id: str, stream: bool) -> dict:
    """The ``/v1/completions`` body of ``call``; ``prompt`` its token ids (a list, or ``msgspec.Raw`` JSON)."""
    return completion_body(prompt, model, call.output_tokens, session_id, call.turn, [t.name for t in call.tools],
                           [t.category for t in call.tools], stream)


def completion_body(prompt, model: str, output_tokens: int, session_id: str, turn: int, tool_names: list[str],
                    tool_categories: list[str], stream: bool) -> dict:
    """A replay's ``/v1/completions`` body: exactly ``output_tokens`` generated greedily, the session's hints for
    the policy plugin, and the generated ids in the answer (``cwreplay calibrate --server`` times the same)."""
    # the response's tool calls as flat lists of strings (what vLLM's vllm_xargs accepts), read by the policy plugin
    xargs = {"turn": turn, "tool_names": tool_names, "tool_categories": tool_categories}
    body = {"model": model, "prompt": prompt, "max_tokens": output_tokens, "min_tokens": output_tokens,
            "ignore_eos": True, "temperature": 0.0, "session_id": session_id, "vllm_xargs": xargs}
    if stream:  # generated ids in each chunk (the prompt's ids once, in the first)
        body.update(stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    else:  # generated ids as "token_id:N" logprob tokens: return_token_ids would echo the whole prompt
        body.update(logprobs=0, return_tokens_as_token_ids=True)
    return body


class _Client:
    """The HTTP side: one completion per call, on one aiohttp session (a connection per call in flight).

    aiohttp, not httpx: httpx's async client (anyio, h11, httpcore) cost 1.4-2.6 ms of the
    client's CPU per call here, aiohttp under half of that (experiments/bench_replay_client.py).
    """

    def __init__(self, session, url: str, model: str, t0: float, stream: bool):
        import msgspec

        self.session, self.url, self.model, self.t0, self.stream = session, url, model, t0, stream
        self._endpoint = url.rstrip("/") + "/v1/completions"
        self._enc = msgspec.json.Encoder()
        self._dec = msgspec.json.Decoder()
        from replay.completion_answer import DECODER

        self._answer = DECODER

    def now(self) -> float:
        return time.monotonic() - self.t0

    async def complete(self, si: int, call, prompt, session_id: str, due: float) -> _Done:
        where = f"session {session_id!r} turn {call.turn}"
        body = self._enc.encode(request_body(call, prompt, self.model, session_id, self.stream))
        sent = self.now()
        try:
            async with self.session.post(self._endpoint, data=body, headers=_JSON) as r:
                if r.status != 200:
                    raise self._error(r.status, (await r.read()).decode(errors="replace"), where)
                if self.stream:
                    tokens, first, cached, queue_ms = await self._streamed(r, where)
                else:
                    tokens, first, cached, queue_ms = self._whole(await r.read(), where, sent)
        except _transport_errors() as e:
            raise ReplayError(f"server {self.url}: {type(e).__name__} during {where} "
                              f"({e or 'connection lost'}): is the server running?") from None
        if len(tokens) != call.output_tokens:
            raise ReplayError(f"server {self.url}: {where}: generated {len(tokens)} tokens, the trace says "
                              f"{call.output_tokens}")
        finish = self.now()
        sched = None if queue_ms is None else sent + queue_ms / 1000.0
        return _Done(si, call.turn, due, sent, first, finish, sched, int(cached), tokens)

    def _error(self, status: int, text: str, where: str) -> ReplayError:
        return ReplayError(f"server {self.url}: HTTP {status} for {where}: {text.replace(chr(10), ' ')[:300]}")

    def _whole(self, raw: bytes, where: str, sent: float):
        """One JSON answer; the first token's time from the server's per-request metrics (queue + prefill)."""
        try:
            d = self._answer.decode(raw)
            lp = d.choices[0].logprobs
            tokens = [int(t[9:]) for t in lp.tokens]  # "token_id:N"
        except (ValueError, IndexError, AttributeError):
            raise ReplayError(f"server {self.url}: malformed answer to {where}") from None
        m = d.metrics
        queue_ms, ttft_ms = (None, None) if m is None else (m.queue_time_ms, m.time_to_first_token_ms)
        first = -1.0 if queue_ms is None or ttft_ms is None else sent + (queue_ms + ttft_ms) / 1000.0
        details = None if d.usage is None else d.usage.prompt_tokens_details
        return tokens, first, (details or {}).get("cached_tokens") or 0, queue_ms

    async def _streamed(self, r, where: str):
        """A streamed answer (server-sent events, ``data: ...`` blocks); the first token timed here."""
        from replay.completion_answer import CHUNK_DECODER

        first, tokens, cached, queue_ms, finished = -1.0, [], 0, None, False
        rest = b""
        async for data in r.content.iter_any():
            *events, rest = (rest + data).split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: "):
                    continue
                if ev == b"data: [DONE]":
                    finished = True
                    break
                try:
                    chunk = CHUNK_DECODER.decode(ev[6:])
                except ValueError:
                    raise ReplayError(f"server {self.url}: malformed chunk in the answer to {where}") from None
                if chunk.choices:
                    got = chunk.choices[0].token_ids
                    if got:
                        if first < 0:
                            first = self.now()
                        tokens += got
                if chunk.usage is not None:
                    cached = (chunk.usage.prompt_tokens_details or {}).get("cached_tokens") or 0
                    queue_ms = None if chunk.metrics is None else chunk.metrics.queue_time_ms
            if finished:
                break
        if not finished:
            raise ReplayError(f"server {self.url}: the answer to {where} ended before [DONE]")
        return tokens, first, cached, queue_ms


_JSON = {"content-type": "application/json"}


def _transport_errors() -> tuple:
    """What a lost, refused or silent connection raises (aiohttp's errors and its timeouts)."""
    import aiohttp

    return (aiohttp.ClientError, asyncio.TimeoutError, OSError)


# --------------------------------------------------------------------------- the run
class _Writer:
    """The CSV and JSONL files of one attempt, appended as calls and sessions finish."""

    def __init__(self, out: Path, attempt: int):
        self.attempt = attempt
        self._files = {}
        self._w = {}
        for name, fields in (("requests", LIVE_REQUEST_FIELDS), ("sessions", SESSION_FIELDS),
                             ("evictions", EVICTION_FIELDS)):
            path = out / f"{name}.csv"
            new = not path.exists()
            f = open(path, "a", newline="")
            self._files[name] = f
            self._w[name] = csv.writer(f)
            if new:
                self._w[name].writerow(fields)
        self._files["outputs"] = open(out / "outputs.jsonl", "a")

    def call(self, sid: str, d: _Done, call, calls_rows: list) -> None:
        ttft = d.first_token - d.sent if d.first_token >= 0 else ""
        calls_rows.append([sid, d.turn, _r(d.due), "" if d.first_scheduled is None else _r(d.first_scheduled),
                           _r(d.first_token), _r(d.finish), call.prompt_tokens, call.output_tokens, d.cached, "", 0,
                           _r(d.sent), ttft if ttft == "" else _r(ttft), _r(d.finish - d.sent)])

    def session(self, sid: str, rows: list, outputs: list, start: float, end: float, prompt: int, cached: int) -> None:
        """A finished session: its calls, its tokens and its row, flushed together."""
        self._w["requests"].writerows(rows)
        for turn, tokens in outputs:
            self._files["outputs"].write(json.dumps({"session_id": sid, "turn": turn, "tokens": tokens}) + "\n")
        self._w["sessions"].writerow([sid, len(rows), _r(start), _r(end), _r(end - start), prompt, cached, "", 0])
        for f in self._files.values():
            f.flush()

    def evictions(self, seq: int, t: float, hashes: list[int]) -> None:
        w = self._w["evictions"]
        for h in hashes:
            w.writerow([seq, _r(t), h, self.attempt])

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _r(x: float) -> float:
    return round(x, 6)


async def _get(session, url: str, path: str) -> bytes:
    """GET ``path``: the answer's body, or a one-line ``ReplayError`` naming the server."""
    try:
        async with session.get(url.rstrip("/") + path) as r:
            if r.status != 200:
                raise ReplayError(f"server {url}: GET {path} answered HTTP {r.status}")
            return await r.read()
    except _transport_errors() as e:
        raise ReplayError(f"server {url} unreachable ({type(e).__name__} on GET {path}: {e or 'no answer'})") from None


async def _served_model(client, url: str) -> str:
    r = await _get(client, url, "/v1/models")
    try:
        return json.loads(r)["data"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError):
        raise ReplayError(f"server {url}: GET /v1/models lists no model") from None


async def _scrape(client, url: str) -> str:
    return (await _get(client, url, "/metrics")).decode(errors="replace")


def _check_ipc(endpoint: str | None, flag: str) -> None:
    if endpoint and endpoint.startswith("ipc://") and not Path(endpoint[6:]).exists():
        raise ReplayError(f"{flag} {endpoint}: no such socket (is the server running, with KV events?)")


class _Attempt:
    """One attempt at a run: the sessions still to do, against one server."""

    def __init__(self, trace: Trace, sessions: list, config: LiveConfig, out: Path, state: dict, vocab_size: int,
                 on_progress):
        self.trace, self.sessions, self.config, self.out, self.state = trace, sessions, config, out, state
        self.book = TokenBook(vocab_size)
        self.on_progress = on_progress
        self.counts = {"evicted_blocks": 0, "stored_blocks": 0, "event_batches": 0, "cleared": 0,
                       "gaps_recovered": 0, "batches_recovered": 0}
        self.sessions_done = 0
        self.vocab_size = vocab_size
        self.writer: _Writer | None = None
        self.t0 = 0.0
        self.t0_unix = 0.0

    def _events(self, batches) -> None:
        for b in batches:
            self.counts["event_batches"] += 1
            self.counts["stored_blocks"] += b.stored
            self.counts["cleared"] += b.cleared
            if b.removed:
                self.counts["evicted_blocks"] += len(b.removed)
                self.writer.evictions(b.seq, time.monotonic() - self.t0, b.removed)

    async def _pump(self, stream: EventStream) -> None:
        while True:
            self._events(await stream.receive())

    async def run(self) -> dict:
        import aiohttp

        cfg = self.config
        # a connection per call in flight; a call may wait request_timeout_s for each read
        connector = aiohttp.TCPConnector(limit=cfg.max_in_flight, limit_per_host=cfg.max_in_flight)
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=cfg.request_timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as client:
            model = await _served_model(client, cfg.server)
            if cfg.events is not None:  # before the warm-up: a wrong flag is named before any work
                _check_ipc(cfg.events, "--events")
                _check_ipc(cfg.events_replay, "--events-replay")
            warm = await self._warm_up(client, model) if cfg.warmup else None
            before_text = await _scrape(client, cfg.server)
            stream = EventStream(cfg.events, cfg.events_replay) if cfg.events is not None else None
            pump = None
            self.writer = _Writer(self.out, len(self.state["attempts"]))
            try:
                if stream is not None:
                    await stream.start()
                self.t0, self.t0_unix = time.monotonic(), time.time()  # (the wall clock: to align a server's step log)
                if stream is not None:
                    pump = asyncio.create_task(self._pump(stream))
                await self._loop(_Client(client, cfg.server, model, self.t0, cfg.stream), pump)
                await asyncio.sleep(cfg.settle_s)
                if pump is not None:
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)
                    self._events(await stream.catch_up())
                after_text = await _scrape(client, cfg.server)
            finally:
                if pump is not None and not pump.done():
                    pump.cancel()
                    await asyncio.gather(pump, return_exceptions=True)
                self.writer.close()
                if stream is not None:
                    self.counts["gaps_recovered"] = stream.gaps_recovered
                    self.counts["batches_recovered"] = stream.batches_recovered
                    stream.close()
        return {"server": cfg.server, "events": cfg.events, **self.counts,
                "metrics": delta(parse_metrics(before_text), parse_metrics(after_text)),
                "cache_config": cache_config(after_text), "wall_s": time.monotonic() - self.t0, "warmup": warm,
                "t0_unix": self.t0_unix}

    async def _warm_up(self, client, model: str) -> dict:
        from replay.calibrate_server import cache_config as pool_shape
        from replay.warmup import warm_up, warmup_waves

        cfg = self.config
        block_size, blocks = pool_shape(await _scrape(client, cfg.server), cfg.server)  # the waves fit the pool
        waves = warmup_waves(self.sessions, cfg.agents, block_size, blocks)
        return await warm_up(client, cfg.server, model, waves, self.vocab_size, cfg.stream)

    async def _loop(self, http: _Client, pump) -> None:
        import msgspec

        loop = ClosedLoop(self.sessions, self.config.arrivals, self.config.agents, self.config.time_scale)
        sem = asyncio.Semaphore(self.config.max_in_flight)
        pending: set[asyncio.Task] = set()
        rows: dict[int, list] = {}
        gen: dict[int, list] = {}
        start: dict[int, float] = {}
        acc: dict[int, list[int]] = {}

        last: dict[int, tuple[tuple, bytes]] = {}  # a session's previous prompt: its segments and ids as JSON
        enc = msgspec.json.Encoder()

        def prompt_json(si: int, call):
            """The prompt's token ids as a JSON array; the previous prompt's reused when it is a prefix
            (agent turns), so a call encodes only its new segments."""
            segs = tuple(call.prompt)
            prev = last.get(si)
            if prev is not None and segs[: len(prev[0])] == prev[0]:
                inner = prev[1]
                new = segs[len(prev[0]):]
                if new:
                    more = enc.encode(self.book.prompt(new))[1:-1]
                    inner = inner + b"," + more if inner and more else inner or more
            else:
                inner = enc.encode(self.book.prompt(segs))[1:-1]
            last[si] = (segs, inner)
            return msgspec.Raw(b"[" + inner + b"]")

        async def one(si: int, turn: int, due: float) -> _Done:
            s = self.sessions[si]
            call = s.calls[turn]
            async with sem:
                return await http.complete(si, call, prompt_json(si, call), s.session_id, due)

        try:
            while loop or pending:
                for due, si, turn in loop.pop_due(http.now()):
                    if turn == 0:
                        start[si] = due
                    pending.add(asyncio.create_task(one(si, turn, due)))
                nxt = loop.next_time()
                wait = None if nxt is None else max(0.0, nxt - http.now())
                watch = pending | ({pump} if pump is not None else set())
                if not watch:  # every active session is in a tool gap, and no event stream to watch
                    await asyncio.sleep(wait or 0.0)
                    continue
                done, _ = await asyncio.wait(watch, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                if pump is not None and pump in done:
                    pump.result()  # the event stream failed: raises its KvEventError
                for task in done - {pump}:
                    pending.discard(task)
                    d = task.result()
                    s = self.sessions[d.si]
                    call = s.calls[d.turn]
                    if call.output_segment is not None:
                        self.book.record_output(call.output_segment, d.tokens)
                    self.writer.call(s.session_id, d, call, rows.setdefault(d.si, []))
                    gen.setdefault(d.si, []).append((d.turn, d.tokens))
                    a = acc.setdefault(d.si, [0, 0])
                    a[0] += call.prompt_tokens
                    a[1] += d.cached
                    if loop.finished(d.si, d.turn, d.finish):
                        self.writer.session(s.session_id, rows.pop(d.si), gen.pop(d.si), start.pop(d.si), d.finish,
                                            *acc.pop(d.si))
                        last.pop(d.si, None)
                        self.sessions_done += 1
                        if self.on_progress is not None:
                            self.on_progress(len(s.calls))
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)


def summarize(out: Path, state: dict, *, partial: bool = False, **extra) -> dict:
    """The run's summary from its files (every finished session, all attempts) and each attempt's counters."""
    import numpy as np

    reqs, sess = _rows(out / "requests.csv"), _rows(out / "sessions.csv")
    prompt = sum(int(r["prompt_tokens"]) for r in reqs)
    cached = sum(int(r["cached_tokens"]) for r in reqs)
    times = np.array([float(r["duration_s"]) for r in sess]) if sess else np.zeros(1)
    attempts = state["attempts"]
    m = {k: sum(a["metrics"].get(k, 0.0) for a in attempts) for k in sorted(set().union(*(a["metrics"] for a in attempts)))}
    cc = next((a["cache_config"] for a in reversed(attempts) if a.get("cache_config")), {})
    e2e = [float(r["e2e_s"]) for r in reqs]
    ttft = [float(r["ttft_s"]) for r in reqs if r["ttft_s"] != ""]
    return {
        "source": "vllm",
        "policy": state["config"].get("policy", "vllm"),
        "trace": state["trace"],
        "partial": partial,
        **extra,
        "sessions": len(sess),
        "sessions_in_trace": len(state["sessions"]),
        "requests": len(reqs),
        "evicted_blocks": sum(a["evicted_blocks"] for a in attempts),
        "harmful_evictions": None,
        "prefix_hit_rate": cached / prompt if prompt else 0.0,
        "prompt_tokens": prompt,
        "cached_prompt_tokens": cached,
        "recomputed_prompt_tokens": None,
        "preemptions": int(m.get("preemptions", 0)),
        "total_session_time_s": float(times.sum()),
        "mean_session_time_s": float(times.mean()),
        "p99_session_time_s": float(np.percentile(times, 99)),
        "makespan_s": max((float(r["end_s"]) for r in sess), default=0.0),
        "offloaded_blocks": 0, "prefetched_blocks": 0, "swap_in_hits": 0, "swapped_in_tokens": 0,
        "cpu_evicted_blocks": 0,
        "kv_blocks": cc.get("num_gpu_blocks"),
        "block_size": cc.get("block_size"),
        "profile": None,
        "stored_blocks": sum(a["stored_blocks"] for a in attempts),
        "event_batches": sum(a["event_batches"] for a in attempts),
        "event_gaps_recovered": sum(a["gaps_recovered"] for a in attempts),
        "server_metrics": m,
        "mean_ttft_s": float(np.mean(ttft)) if ttft else None,
        "mean_e2e_s": float(np.mean(e2e)) if e2e else None,
        "outside_engine_s": outside_engine(e2e, m),
        "attempts": len(attempts),
        "config": state.get("config"),
        "wall_s": sum(a.get("wall_s", 0.0) for a in attempts),
        "warmup_s": sum((a.get("warmup") or {}).get("wall_s", 0.0) for a in attempts),
    }


def outside_engine(e2e: list[float], metrics: dict[str, float]) -> float | None:
    """The mean time a call spent outside vLLM's engine-core queue and steps under the run's load: its
    end-to-end latency as the client measured it (sent to last token received) less the engine core's
    queue and inference time (``/metrics``' ``request_queue_s`` + ``request_inference_s``, summed over the
    run's requests). That is the transit both ways, the API server's work, and the wait for the step in
    progress when the call came (vLLM queues a request between steps, and stamps it then); a profile's
    ``request_overhead_s`` is the first two (``replay.calibrate_steps.measured_request_overhead`` takes
    the third out with the server's step log). ``None`` without the figures (a server that does not export
    them, a run with no finished request)."""
    done = metrics.get("requests_finished", 0.0)
    engine = metrics.get("request_queue_s", 0.0) + metrics.get("request_inference_s", 0.0)
    if not e2e or done <= 0 or engine <= 0:
        return None
    return sum(e2e) / len(e2e) - engine / done


def run_live(trace: Trace, config: LiveConfig, out_dir: str | Path, *, resume: bool = False,
             vocab_size: int | None = None, on_progress=None) -> LiveResult:
    """Replay ``trace`` against ``config.server``; see the module docstring.

    ``ReplayError`` (one line) when the server, the events or the files fail; ``ReplayInterrupted``
    on Ctrl-C. Either way the finished sessions stay in ``out_dir`` and ``summary.json`` is
    written with ``"partial": true``.
    """
    from replay.tiny_model import TINY_VOCAB_SIZE

    out = ensure_folder(out_dir)
    sessions, state = plan(trace, config, out, resume)
    state["config"] = asdict(config)
    if vocab_size is None:
        vocab_size = TINY_VOCAB_SIZE
    state["vocab_size"] = vocab_size
    attempt = _Attempt(trace, sessions, config, out, state, vocab_size, on_progress)
    # a session's prompts use only its own outputs and shared prompt segments: a resumed
    # session starts from its first call and needs nothing from the finished ones
    _save_state(out, state)
    stopped = None
    try:
        record = asyncio.run(attempt.run())
    except (ReplayError, KvEventError) as e:
        stopped = e
    except (KeyboardInterrupt, asyncio.CancelledError) as e:
        stopped = e
    if stopped is not None:
        state["attempts"].append({"server": config.server, "events": config.events, **attempt.counts,
                                  "metrics": {}, "stopped_by": _why(stopped)})
        _save_state(out, state)
        _write_summary(out, summarize(out, state, partial=True, stopped_by=_why(stopped)))
        if isinstance(stopped, (KeyboardInterrupt, asyncio.CancelledError)):
            raise ReplayInterrupted(len(finished_sessions(out)), out) from None
        raise ReplayError(str(stopped)) from None
    state["attempts"].append(record)
    _save_state(out, state)
    summary = summarize(out, state)
    missing = summary["sessions_in_trace"] - summary["sessions"]
    if missing:
        summary = summarize(out, state, partial=True, stopped_by=f"error: {missing} session(s) did not finish")
    _write_summary(out, summary)
    return LiveResult(summary, out)


def _why(e: BaseException) -> str:
    return "interrupt" if isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)) else f"error: {e}"


def _save_state(out: Path, state: dict) -> None:
    atomic_write_text(out / "run.json", json.dumps(state, indent=1, default=str) + "\n")


def _write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=_nan) + "\n")


def _nan(x):
    return None if isinstance(x, float) and math.isnan(x) else str(x)
