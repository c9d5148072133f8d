"""A fresh server warmed before a replay's clock starts, and its prefix cache emptied again.

A vLLM server's first requests pay one-off costs that its later ones do not:
on the CPU machine here a fresh server's first wave of 8 prompts took 1.3-1.5 s
against 0.2 s simulated (buffers allocated, kernels built for each new shape),
0.5 s after a wave of prompts shorter than a block, 0.3-0.5 s on a server
that had already served prompts of the trace's sizes. ``cwsim`` models a
server in its steady state, so ``cwreplay run`` first sends (``warm_up``):

1. a wave of the run's first calls' shapes, all at once (each prompt fresh
   tokens of its first call's length, asking for its output length),
2. the same prompts grown to the second calls' lengths (a prefill on a
   cached prefix, as a session's next turn),

then empties the prefix cache (``POST /reset_prefix_cache``, an endpoint of
vLLM's dev mode: ``VLLM_SERVER_DEV_MODE=1``, which ``cwreplay serve`` sets)
and sends one request of a single token, so that the engine steps once and
publishes the ``AllBlocksCleared`` event before the run subscribes. After the
reset no block holds a hash, as on a fresh server: the free queue's order
differs only among blocks that hold nothing, so which cached block an
eviction takes, and every event and count after it, stay those of a fresh
server. The waves are sized to the pool (``pool_blocks``, from ``/metrics``)
so that the warm-up evicts nothing (no ``BlockRemoved`` event): a wave that
would not fit is cut to the calls that do.
"""

from __future__ import annotations

import asyncio
import json
import time

from replay.live import _JSON, ReplayError, _transport_errors, completion_body
from replay.tokens import segment_tokens


def warmup_waves(sessions: list, agents: int, block_size: int, pool_blocks: int) -> list[list[tuple[int, int]]]:
    """The two waves' (prompt tokens, output tokens) per request: the first ``agents`` sessions' first calls, then
    the same prompts grown to their second calls' lengths (a session of one call repeats its first).

    Sized so that the warm-up evicts nothing: the first wave fits the pool, and the second's new blocks (all but
    the first prompts' whole blocks, which it hits) fit the blocks the first never touched (freed blocks go to
    the free queue's tail, so the untouched ones are taken first); each wave is cut at its first call that
    does not fit."""
    firsts = [s.calls[0] for s in sessions[:agents]]
    seconds = [(s.calls[1] if len(s.calls) > 1 else s.calls[0]) for s in sessions[:agents]]
    blocks = lambda tokens: -(-tokens // block_size)  # noqa: E731
    room = max(0, pool_blocks - 1)  # vLLM's null block
    wave1 = []
    for c in firsts:
        if blocks(c.prompt_tokens + c.output_tokens) > room:
            break
        wave1.append((c.prompt_tokens, c.output_tokens))
        room -= blocks(c.prompt_tokens + c.output_tokens)
    wave2 = []
    for (p1, _), c in zip(wave1, seconds):
        p2 = max(p1, c.prompt_tokens)
        new = blocks(p2 + c.output_tokens) - p1 // block_size
        if new > room:
            break
        wave2.append((p2, c.output_tokens))
        room -= new
    return [wave1, wave2]


async def warm_up(session, url: str, model: str, waves: list[list[tuple[int, int]]], vocab: int,
                  stream: bool) -> dict:
    """Send the waves, reset the prefix cache, flush its event; ``{"requests", "prompt_tokens", "cached_tokens",
    "wall_s"}`` of what the warm-up sent (the server's counters count it too).

    ``ReplayError`` naming the server when a request fails or the server has no reset endpoint."""
    t0 = time.monotonic()
    endpoint = url.rstrip("/") + "/v1/completions"
    sent = 0
    totals = {"prompt_tokens": 0, "cached_tokens": 0}

    async def post(path: str, body: dict | None) -> tuple[int, bytes]:
        try:
            async with session.post(url.rstrip("/") + path, json=body, headers=_JSON) as r:
                return r.status, await r.read()
        except _transport_errors() as e:
            raise ReplayError(f"server {url}: {type(e).__name__} during the warm-up ({e or 'connection lost'}): "
                              "is the server running?") from None

    async def complete(prompt: list[int], n: int) -> None:
        status, raw = await post("/v1/completions",
                                 completion_body(prompt, model, n, "cwreplay-warmup", 0, [], [], stream))
        if status != 200:
            raise ReplayError(f"server {url}: HTTP {status} for a warm-up request to {endpoint}: "
                              f"{raw.decode(errors='replace')[:300]}")
        usage = _usage(raw, stream)
        if usage is None:
            raise ReplayError(f"server {url}: a warm-up answer from {endpoint} has no usage")
        totals["prompt_tokens"] += usage.get("prompt_tokens") or 0
        totals["cached_tokens"] += (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0

    prompts: list[list[int]] = []
    for w, wave in enumerate(waves):
        batch = []
        for k, (p, n) in enumerate(wave):
            if w == 0:
                prompts.append(segment_tokens(f"cwreplay-warmup-{k}", p, vocab))
            else:  # the next turn: the first prompt, grown (warmup_waves never shrinks it)
                prompts[k] = prompts[k] + segment_tokens(f"cwreplay-warmup-{k}-{w}", p - len(prompts[k]), vocab)
            batch.append(complete(prompts[k], n))
        await asyncio.gather(*batch)
        sent += len(batch)
    for _ in range(50):  # the last answers' blocks are freed a step after they are sent
        status, raw = await post("/reset_prefix_cache", None)
        if status in (404, 405):
            raise ReplayError(f"server {url}: POST /reset_prefix_cache: HTTP {status}: the warm-up empties the "
                              "prefix cache through vLLM's dev-mode endpoint; start the server with "
                              "VLLM_SERVER_DEV_MODE=1 (cwreplay serve does), or replay with --no-warmup")
        if status != 200:
            raise ReplayError(f"server {url}: POST /reset_prefix_cache: HTTP {status}: "
                              f"{raw.decode(errors='replace')[:300]}")
        try:
            if json.loads(raw).get("success") is True:
                break
        except (ValueError, AttributeError):
            raise ReplayError(f"server {url}: POST /reset_prefix_cache: an answer that is not "
                              f'{{"success": ...}}: {raw.decode(errors="replace")[:200]}') from None
        await asyncio.sleep(0.1)
    else:
        raise ReplayError(f"server {url}: POST /reset_prefix_cache kept answering success=false for 5 s "
                          "(is something else using the server?)")
    await complete(segment_tokens("cwreplay-warmup-flush", 1, vocab), 1)  # one step: the reset's event goes out
    return {"requests": sent + 1, **totals, "wall_s": time.monotonic() - t0}


def _usage(raw: bytes, stream: bool) -> dict | None:
    """The answer's ``usage`` (streamed: the last event that has one)."""
    try:
        if not stream:
            return json.loads(raw).get("usage")
        for line in reversed(raw.splitlines()):
            if line.startswith(b"data: {") and b'"usage"' in line:
                got = json.loads(line[6:]).get("usage")
                if got:
                    return got
    except (ValueError, AttributeError):
        pass
    return None
