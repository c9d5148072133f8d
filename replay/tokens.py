"""Token ids for a content-free trace, and the block hashes vLLM gives them.

A trace names tokens as ``(segment id, position)`` (trace format v1). To send a
trace to a real engine each segment needs token ids, with two properties:

- deterministic: the token at position ``i`` of segment ``s`` is a function of
  ``(s, i)`` alone (:func:`segment_tokens`), so a shorter occurrence of a
  segment is a prefix of a longer one, every run and every machine sends the
  same ids, and two calls share exactly the prefix their segment lists share;
- outputs are real: a call's ``output_segment`` holds the tokens the engine
  generated for that call (:class:`TokenBook` records them), so a later prompt
  that contains it hits the output's cached blocks exactly as it does in the
  simulator.

:func:`vllm_block_hashes` computes, from token ids alone, the hash vLLM 0.32
gives each full block with its default settings (``prefix_caching_hash_algo =
sha256``, ``NONE_HASH`` from the fixed seed ``"vllm-none-hash"``, no extra
keys), in the 64-bit form its KV events carry. It is this project's own
implementation of vLLM's documented scheme (``hash_block_tokens``), checked
against a real engine's ``BlockStored`` events by the oracle tests.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence

import numpy as np

#: token ids are drawn from [FIRST_TOKEN, vocab): 0-2 are the tiny tokenizer's specials
FIRST_TOKEN = 3
_MASK64 = (1 << 64) - 1


def _seed(segment_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(segment_id.encode(), digest_size=8).digest(), "little")


def segment_tokens(segment_id: str, n: int, vocab_size: int, start: int = 0) -> list[int]:
    """Token ids of positions ``start .. start + n - 1`` of segment ``segment_id``.

    Position ``i`` maps through splitmix64 of ``seed(segment_id) + i``: a pure
    function of the segment and the position.
    """
    with np.errstate(over="ignore"):
        x = np.arange(start, start + n, dtype=np.uint64) + np.uint64(_seed(segment_id))
        x = x * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    span = vocab_size - FIRST_TOKEN
    return (x % np.uint64(span) + np.uint64(FIRST_TOKEN)).astype(np.int64).tolist()


class TokenBook:
    """The token ids of every segment of a trace as the engine sees them.

    Prompt segments get :func:`segment_tokens`; an output segment gets the
    tokens the engine generated for the call that produced it, once
    :meth:`record_output` has been told them. A prompt that uses an output
    segment before its call has run falls back to deterministic tokens (the
    simulator cannot tell the difference; it does not arise in closed-loop
    sessions).
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self._outputs: dict[str, list[int]] = {}

    def record_output(self, segment_id: str, tokens: Sequence[int]) -> None:
        self._outputs[segment_id] = list(tokens)

    def output(self, segment_id: str) -> list[int] | None:
        return self._outputs.get(segment_id)

    def tokens(self, segment_id: str, n: int) -> list[int]:
        out = self._outputs.get(segment_id)
        if out is not None:
            if n <= len(out):
                return out[:n]
            return out + segment_tokens(segment_id, n - len(out), self.vocab_size, start=len(out))
        return segment_tokens(segment_id, n, self.vocab_size)

    def prompt(self, segments: Sequence[tuple[str, int]]) -> list[int]:
        ids: list[int] = []
        for seg_id, n in segments:
            ids += self.tokens(seg_id, n)
        return ids


def _sha256(obj) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


#: vLLM's root hash: sha256 of its fixed seed (PYTHONHASHSEED unset)
NONE_HASH = _sha256("vllm-none-hash")


def vllm_block_hashes(token_ids: Sequence[int], block_size: int, parent: bytes | None = None) -> list[bytes]:
    """vLLM's chained SHA-256 hash of each full block of ``token_ids`` (bytes)."""
    out: list[bytes] = []
    h = NONE_HASH if parent is None else parent
    for i in range(0, len(token_ids) - block_size + 1, block_size):
        h = _sha256((h, tuple(token_ids[i : i + block_size]), None))
        out.append(h)
    return out


def external_hash(h: bytes) -> int:
    """The 64-bit integer form of a block hash that vLLM's KV events carry."""
    return int.from_bytes(h, "big") & _MASK64
