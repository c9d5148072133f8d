"""A request: one LLM call of one session as the engine sees it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EMPTY = np.empty(0, dtype=np.int64)


@dataclass(slots=True, eq=False)
class Request:
    """One LLM call in flight.

    ``hashes`` covers every full block of the call's whole token sequence
    (prompt then output), so cached-block hashes never need recomputing (a
    ``range`` of fresh ids for a call that shares nothing: ``own_block_ids``).
    ``num_tokens`` is the tokens known so far (prompt + generated);
    ``num_computed`` those whose KV is in the request's blocks. While the
    request sits in the scheduler's lazy decode batch (``lazy``), those two
    counters are not updated step by step; the scheduler writes them back
    when the request leaves the batch (it finishes or is preempted).
    """

    rid: int
    session: object  # cwsim.workload.SessionState
    turn: int
    prompt_len: int
    output_len: int
    hashes: Sequence[int]
    arrival: float
    num_generated: int = 0
    num_computed: int = 0
    #: the block table is ``table[:nblk]`` (``blocks``); ``table`` has room for the
    #: whole call, so appending a block is a store. A freed table is dropped, never
    #: reused, so views of it (prefix-lookup hints) stay valid.
    table: np.ndarray | None = None
    nblk: int = 0
    num_cached_blocks: int = 0
    admitted: bool = False
    first_scheduled: float = -1.0
    first_token: float = -1.0
    finish: float = -1.0
    cached_tokens: int = 0
    computed_prompt_tokens: int = 0
    recomputed_tokens: int = 0
    preemptions: int = 0
    done: object = None  # simpy.Event set on finish
    #: (blocks, gens) that held this request's leading hashes: a fast path for prefix lookup
    hint: tuple | None = None
    #: running order: the scheduler numbers each admission (re-admissions included)
    seq: int = 0
    #: in the scheduler's decode batch (``cwsim.scheduler``): ``num_computed`` and
    #: ``num_generated`` are then stale, derived from the step counter as
    #: ``num_computed = step + c_off`` until the request leaves the batch
    lazy: bool = False
    c_off: int = 0
    #: async scheduling (``Scheduler(async_scheduling=True)``): tokens to be sampled by steps in
    #: flight, tokens scheduled whose output has not arrived, and in-flight tokens of a preempted
    #: request whose output is stale (vLLM's num_output_placeholders, num_in_flight_tokens,
    #: num_stale_output_tokens)
    placeholders: int = 0
    in_flight: int = 0
    stale: int = 0
    #: what a policy sees of it (``cwsim.policy_adapter.SimRequestView``), made at arrival
    view: object = None
    #: its blocks from this index on are cached unlisted (``BlockPool.cache_unlisted_blocks``): content
    #: no other request will ask for (a single-call session's own blocks); past the end: none
    unlisted_from: int = 1 << 62

    @property
    def blocks(self) -> np.ndarray:
        """The block table (a view)."""
        return _EMPTY if self.table is None else self.table[: self.nblk]

    @blocks.setter
    def blocks(self, blocks) -> None:
        self.table = np.array(blocks, dtype=np.int64)
        self.nblk = len(self.table)

    def append_blocks(self, blocks) -> None:
        """Add blocks at the end of the table (growing it if the call outgrows it)."""
        k, n = self.nblk, len(blocks)
        table = self.table
        if table is None or k + n > len(table):
            table = np.empty(max(2 * k + n, 16), dtype=np.int64)
            table[:k] = self.blocks
            self.table = table
        table[k : k + n] = blocks
        self.nblk = k + n

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + self.num_generated
