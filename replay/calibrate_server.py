"""A step-time profile measured through a live vLLM server's API: the times a replay waits for, fitted.

``calibrate_server(ServerCalibrationConfig(url), out_file)`` sends a designed
set of requests to a running server (``cwreplay serve``; nothing else may use
it meanwhile) and times each one from the client, as ``cwreplay run`` times
its calls (a whole answer, not streamed, and the body a replay sends:
``replay.live.completion_body``, generated ids as logprob tokens, which
costs the server work per token):

- **prefill**: one request of ``q`` new tokens on top of ``c`` prefix-cached
  tokens (a request of the same first ``c`` tokens ran first, untimed), one
  output token: one engine step of ``P = q``, ``A = q*c + q*(q+1)/2``, plus
  the request's own latency outside the engine (``R = 1``);
- **decode**: ``b`` requests at once whose prompts of ``L`` tokens are cached
  (each ran alone first, untimed, so the ``b`` join one small prefill step),
  generating ``n1`` tokens each, then again ``n2``: the batch's time (first
  sent to last answered) grows by ``n2 - n1`` decode steps of ``D = b``,
  ``C = b * (L + (n1 + n2 - 1) / 2)`` on average; the difference, per step,
  is the point (the request overhead and the prefill step cancel).

Between the design points it also times **check calls** of shapes the design
does not hold (``check``: ``q`` new tokens on ``c`` cached, ``n`` outputs: a
replay's call), one of each after every point, so that they share the
machine's load with the points; the fitted profile's prediction for each
(the request overhead, one prefill step, ``n - 1`` decode steps of one
sequence) is written beside its median in ``_fit["check"]``: the profile's
error on calls it was not fitted to.

The six terms (the five of ``docs/step-time-model.md`` and
``request_overhead_s``) are fitted together by :func:`replay.calibrate.fit`.
Then (``frontend``, on by default) the **frontend probe**
(``replay.frontend_share``): a decode batch timed quiet and while a side
client sends fully cached prompts, and the profile's ``frontend_step_share``
fitted by simulating the same probe with the fitted terms.
Why not the in-process engine (``replay.calibrate``): behind vLLM's API
server the engine core runs in a process of its own, with its own threads,
and a request pays the server's HTTP and input/output processing; on the
2-core CPU machine here its decode steps took 2.1 ms against 4.0 ms in
process, and its requests ~7 ms on top. The block size and pool come from
the server's ``/metrics`` (``vllm:cache_config_info``), the model's shape
from its folder (``/v1/models`` ``root``, or ``model``).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from replay.calibrate import FEATURES, TERMS, _device, _model_facts, fit
from replay.frontend_share import BATCH_PROMPT, DECODE_N, fit_share, probe_contention
from replay.live import ReplayError, _get, _transport_errors, completion_body
from replay.server_metrics import cache_config as server_cache_config
from replay.tokens import segment_tokens

SERVER_TERMS = TERMS + ["request_overhead_s"]
#: held-out calls (new tokens, cached tokens, output tokens) a calibration times by default
DEFAULT_CHECK = ((48, 128, 12), (200, 256, 24))


@dataclass(frozen=True, slots=True)
class ServerCalibrationConfig:
    url: str
    prefill_q: tuple[int, ...] = (16, 64, 128, 256, 480)
    prefill_c: tuple[int, ...] = (0, 256, 1024)
    decode_b: tuple[int, ...] = (1, 4, 8)
    decode_l: tuple[int, ...] = (64, 448)
    decode_n: tuple[int, int] = (8, 72)  #: output tokens of the short and the long run of a decode point
    #: held-out calls (new tokens, cached tokens, output tokens), timed between the points, not fitted
    check: tuple[tuple[int, int, int], ...] = DEFAULT_CHECK
    repeats: int = 7
    #: the server's --max-num-batched-tokens: a prefill point must fit one step
    max_num_batched_tokens: int = 2048
    model: str | None = None  #: the served model's folder, when /v1/models does not name one here
    timeout_s: float = 120.0
    #: also measure how much the frontend's work slows the steps, and fit ``frontend_step_share``
    #: (``replay.frontend_share``): a side client's fully cached prompts of ``frontend_prompt`` tokens
    frontend: bool = True
    frontend_prompt: int = 2000

    @property
    def frontend_batch(self) -> int:
        """The probe's decode batch: one sequence fewer than the design's biggest (the side client's)."""
        return max(1, max(self.decode_b) - 1)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError("--repeats must be >= 1")
        n1, n2 = self.decode_n
        if not 1 <= n1 < n2:
            raise ValueError(f"decode output lengths must be 1 <= n1 < n2, got {self.decode_n}")
        big = max([*self.prefill_q, *(q for q, _, _ in self.check)])
        if big > self.max_num_batched_tokens:
            raise ValueError(f"a prefill of {big} new tokens (a point or a check call) does not fit one step of "
                             f"--max-num-batched-tokens {self.max_num_batched_tokens}")
        if any(q < 1 or c < 0 or n < 1 for q, c, n in self.check):
            raise ValueError(f"a check call needs >= 1 new token and >= 1 output token, got {self.check}")
        if self.frontend_prompt < 1:
            raise ValueError(f"the frontend probe's prompt needs >= 1 token, got {self.frontend_prompt}")


def predicted_call_s(profile, q: int, c: int, n: int, budget: int | None = None) -> float:
    """What ``profile`` says one request of ``q`` new tokens on ``c`` cached, ``n`` outputs, takes alone:
    its latency outside the engine, its prefill (one step, or with a step budget ``budget`` the chunks
    vLLM's scheduler gives a lone request, each attending to all before it; the last one gives its first
    token), then ``n - 1`` decode steps."""
    from cwsim.steptime import prefill_attn_pairs

    t, done = profile.request_overhead_s, c
    for start in range(0, q, budget or q):
        chunk = min(budget or q, q - start)
        t += profile.step_time(chunk, prefill_attn_pairs(chunk, done), 0, 0)
        done += chunk
    return t + sum(profile.step_time(0, 0, 1, q + c + k) for k in range(1, n))


def cache_config(metrics_text: str, url: str) -> tuple[int, int]:
    """(block size, pool blocks) from the server's ``vllm:cache_config_info`` gauge, or a ``ReplayError``."""
    cc = server_cache_config(metrics_text)
    if set(cc) != {"block_size", "num_gpu_blocks"}:
        raise ReplayError(f"server {url}: GET /metrics has no vllm:cache_config_info with block_size and "
                          "num_gpu_blocks (is it a vLLM server?)")
    return cc["block_size"], cc["num_gpu_blocks"]


class _Prober:
    """Times one completion at a time from the client, on one aiohttp session, with a replay's request body."""

    def __init__(self, session, url: str, model: str, vocab: int):
        self.session, self.url, self.model, self.vocab = session, url, model, vocab
        self._n = 0

    def fresh(self, length: int) -> list[int]:
        """Tokens no earlier request had: no prefix hit."""
        self._n += 1
        return segment_tokens(f"calibrate-server-{self._n}", length, self.vocab)

    async def complete(self, prompt: list[int], n: int) -> tuple[float, int]:
        """(seconds from send to answer, the prompt's cached tokens)."""
        # the body a replay sends (a non-streamed call: generated ids as logprob tokens, the plugin's hints)
        body = completion_body(prompt, self.model, n, "calibrate-server", 0, [], [], stream=False)
        t = time.perf_counter()
        try:
            async with self.session.post(self.url.rstrip("/") + "/v1/completions", json=body) as r:
                raw = await r.read()
                if r.status != 200:
                    raise ReplayError(f"server {self.url}: HTTP {r.status} for a calibration request: "
                                      f"{raw.decode(errors='replace')[:300]}")
        except _transport_errors() as e:
            raise ReplayError(f"server {self.url}: {type(e).__name__} during calibration "
                              f"({e or 'connection lost'}): is the server running?") from None
        dt = time.perf_counter() - t
        try:
            d = json.loads(raw)
            got = d["usage"]["completion_tokens"]
            cached = (d["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        except (ValueError, KeyError, TypeError):
            raise ReplayError(f"server {self.url}: malformed answer to a calibration request") from None
        if got != n:
            raise ReplayError(f"server {self.url}: a calibration request generated {got} tokens, not {n}")
        return dt, int(cached)


async def _measure(config: ServerCalibrationConfig, on_point=None) -> tuple[list[dict], dict, str, dict | None]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, connect=5, sock_read=config.timeout_s)
    async with aiohttp.ClientSession(timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=max(config.decode_b))) as session:
        from replay.tiny_model import TINY_VOCAB_SIZE

        try:
            served = json.loads(await _get(session, config.url, "/v1/models"))["data"][0]
            model_id = served["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ReplayError(f"server {config.url}: GET /v1/models lists no model") from None
        model_dir = config.model or served.get("root")
        vocab = TINY_VOCAB_SIZE
        if model_dir and (Path(model_dir) / "config.json").is_file():
            vocab = json.loads((Path(model_dir) / "config.json").read_text()).get("vocab_size", TINY_VOCAB_SIZE)
        p = _Prober(session, config.url, model_id, vocab)
        for _ in range(3):  # the first requests pay one-off costs
            await p.complete(p.fresh(256), 4)
        points = []
        checks = {shape: [] for shape in config.check}

        async def point_done() -> None:
            for (q, c, n), times in checks.items():
                prefix = p.fresh(c)
                if c:
                    await p.complete(prefix, 1)
                t, cached = await p.complete(prefix + p.fresh(q), n)
                _expect_cached(config.url, f"check call q={q} c={c}", cached, c)
                times.append(t)
            if on_point is not None:
                on_point(points[-1])
        for q in config.prefill_q:
            for c in config.prefill_c:
                times = []
                for _ in range(config.repeats):
                    prefix = p.fresh(c)
                    if c:
                        await p.complete(prefix, 1)
                    t, cached = await p.complete(prefix + p.fresh(q), 1)
                    _expect_cached(config.url, f"prefill q={q} c={c}", cached, c)
                    times.append(t)
                points.append({"kind": "prefill", "q": q, "c": c, "R": 1, "S": 1, "P": q,
                               "A": q * c + q * (q + 1) / 2.0, "D": 0, "C": 0, "t": statistics.median(times)})
                await point_done()
        n1, n2 = config.decode_n
        for b in config.decode_b:
            for L in config.decode_l:
                diffs = []
                for _ in range(config.repeats):
                    batch = {}
                    for n in (n1, n2):
                        prompts = [p.fresh(L) for _ in range(b)]
                        for pr in prompts:  # cached first: the b join one small prefill step
                            await p.complete(pr, 1)
                        t = time.perf_counter()
                        await asyncio.gather(*(p.complete(pr, n) for pr in prompts))
                        batch[n] = time.perf_counter() - t
                    diffs.append((batch[n2] - batch[n1]) / (n2 - n1))
                t = statistics.median(diffs)
                if t <= 0:
                    raise ReplayError(f"server {config.url}: calibration decode b={b} L={L}: {n2} tokens took no "
                                      f"longer than {n1} (a noisy machine? try more --repeats)")
                points.append({"kind": "decode", "b": b, "L": L, "R": 0, "S": 1, "P": 0, "A": 0.0, "D": b,
                               "C": b * (L + (n1 + n2 - 1) / 2.0), "t": t})
                await point_done()
        probe = None
        if config.frontend:
            probe = await probe_contention(p, config.frontend_batch, config.frontend_prompt, config.repeats)
            if on_point is not None:
                on_point({"kind": "frontend", "t": probe["loaded_ms"][-1] / 1e3})
        return points, {shape: statistics.median(ts) for shape, ts in checks.items()}, model_dir, probe


def _expect_cached(url: str, what: str, cached: int, c: int) -> None:
    if cached != c:
        raise ReplayError(f"server {url}: calibration {what}: the server cached {cached} tokens, not {c} (is its "
                          "pool big enough, and is nothing else using it?)")


async def _server_facts(url: str) -> str:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        return (await _get(session, url, "/metrics")).decode(errors="replace")


def _ms(ts: list[float]) -> str:
    return " / ".join(f"{t:.1f}" for t in ts)


def calibrate_server(config: ServerCalibrationConfig, out_file: str | os.PathLike, *, name: str | None = None,
                     on_point=None):
    """Measure, fit and write the profile to ``out_file`` (atomically); return it.

    ``ReplayError`` (one line, naming the server) when the server cannot be reached or answers
    wrongly; ``ValueError`` for a bad design or when the model's folder is unknown here."""
    from cwsim.steptime import StepTimeProfile
    from traces.files import atomic_write_text, ensure_parent

    out = ensure_parent(out_file)
    wall0 = time.perf_counter()
    block_size, kv_blocks = cache_config(asyncio.run(_server_facts(config.url)), config.url)
    for c in [*config.prefill_c, *(c for _, c, _ in config.check)]:
        if c % block_size:
            raise ValueError(f"every prefix length must be a multiple of the server's block size {block_size} "
                             f"(only whole blocks are cached), got {c}")
    usable = kv_blocks - 1  # vLLM's null block
    need = max([-(-(q + c) // block_size) for q in config.prefill_q for c in config.prefill_c]
               + [b * -(-(L + config.decode_n[1]) // block_size) for b in config.decode_b for L in config.decode_l]
               + [-(-(q + c + n) // block_size) for q, c, n in config.check]
               + ([-(-config.frontend_prompt // block_size)
                   + config.frontend_batch * -(-(BATCH_PROMPT + DECODE_N[1]) // block_size)]
                  if config.frontend else []))
    if need > usable:
        raise ValueError(f"the design needs {need} blocks at once, the server's pool has {usable}: a calibration "
                         f"server wants a big pool (cwreplay serve --kv-blocks), or a smaller design")
    points, checked, model_dir, probe = asyncio.run(_measure(config, on_point))
    if not model_dir or not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"the served model's folder {model_dir!r} is not readable here: give --model DIR")
    coef, err, mape = fit(points, SERVER_TERMS)
    model, kv_bytes, weights = _model_facts(Path(model_dir), block_size)
    import vllm

    device = _device()
    profile = StepTimeProfile(
        name=name or f"measured-server-{Path(model_dir).name}", model=model, gpu=device, **coef,
        kv_bytes_per_token=kv_bytes, weights_bytes=weights,
        gpu_mem_bytes=weights + kv_blocks * block_size * kv_bytes,
        source=(f"measured on {device} through vLLM {vllm.__version__}'s OpenAI server at {config.url}: "
                f"{len(points)} design points ({config.repeats} repeats each) of whole requests timed by the "
                f"client, fitted by replay.calibrate_server (least squares on relative error); "
                f"MAPE {100 * mape['all']:.1f}%"),
        notes="terms " + ", ".join(f"{k} = {coef[k]:.4g} +- {err[k]:.2g}" for k in SERVER_TERMS),
    )
    check = [{"q": q, "c": c, "n": n, "t": t, "predicted": predicted_call_s(profile, q, c, n)}
             for (q, c, n), t in checked.items()]
    for ch in check:
        ch["error"] = ch["predicted"] / ch["t"] - 1.0
    if check:
        profile = replace(profile, source=profile.source + "; held-out calls " + ", ".join(
            f"{ch['q']} new on {ch['c']} cached x {ch['n']} out {100 * ch['error']:+.0f}%" for ch in check))
    frontend = None
    if probe is not None:
        share, grid = fit_share(profile.to_json(), probe["ratio"], batch=config.frontend_batch,
                                side_prompt=config.frontend_prompt, block_size=block_size,
                                max_num_batched_tokens=config.max_num_batched_tokens)
        profile = replace(profile, frontend_step_share=share, notes=profile.notes + (
            f"; frontend_step_share = {share:.3g}: decode steps {probe['ratio']:.2f}x as long while fully cached "
            f"{config.frontend_prompt}-token prompts arrived (replay.frontend_share)"
            + ("" if probe["consistent"] else
               f"; the probe's rounds disagree (quiet {_ms(probe['quiet_ms'])} ms, loaded {_ms(probe['loaded_ms'])} ms:"
               f" the machine was not steady): the share is uncertain, probe again on a quiet machine")))
        frontend = {**probe, "share": share, "grid": grid}
    d = profile.to_json()
    d["_fit"] = {"stderr": err, "mape": mape, "points": points, "check": check, "frontend": frontend,
                 "config": {**asdict(config), "block_size": block_size, "kv_blocks": kv_blocks},
                 "features": {t: FEATURES[t] for t in SERVER_TERMS}, "wall_s": time.perf_counter() - wall0}
    atomic_write_text(out, json.dumps(d, indent=1) + "\n")
    return profile
