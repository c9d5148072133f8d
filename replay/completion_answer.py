"""The fields of a whole (not streamed) vLLM ``/v1/completions`` answer that a replay reads.

Decoding into these types lets msgspec skip everything else: the logprobs'
offsets, values and top-k maps, one of each per generated token, are parsed
but never built (experiments/bench_replay_client.py).
"""

from __future__ import annotations

import msgspec


class Logprobs(msgspec.Struct):
    tokens: list[str]  # "token_id:N" with return_tokens_as_token_ids


class Choice(msgspec.Struct):
    logprobs: Logprobs | None = None


class Usage(msgspec.Struct):
    prompt_tokens_details: dict | None = None


class Metrics(msgspec.Struct):
    queue_time_ms: float | None = None
    time_to_first_token_ms: float | None = None


class Answer(msgspec.Struct):
    choices: list[Choice]
    usage: Usage | None = None
    metrics: Metrics | None = None


DECODER = msgspec.json.Decoder(Answer)


class StreamChoice(msgspec.Struct):
    token_ids: list[int] | None = None


class StreamChunk(msgspec.Struct):
    """One server-sent event of a streamed answer (``return_token_ids``, ``include_usage``)."""

    choices: list[StreamChoice] = []
    usage: Usage | None = None
    metrics: Metrics | None = None


CHUNK_DECODER = msgspec.json.Decoder(StreamChunk)
