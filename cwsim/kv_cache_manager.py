"""Per-request KV block management on top of the pool, as vLLM's KVCacheManager.

``get_computed_blocks`` finds the longest cached prefix (never the whole
sequence: the last token is always recomputed, as in vLLM);
``allocate_slots`` admits new tokens only if enough blocks are free counting
the evictable hit blocks it is about to take out of the free queue, touches
the hits before popping new blocks (so a request never evicts its own hits),
and caches the blocks that the scheduled tokens will fill; ``free`` releases a
request's blocks tail first.
"""

from __future__ import annotations

import numpy as np

from cwsim import native
from cwsim.block_pool import BlockPool
from cwsim.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int):
        self.pool = pool
        self.block_size = block_size

    def get_computed_blocks(self, req: Request) -> tuple[np.ndarray, int]:
        """Cached prefix blocks for a request that has no computed tokens yet."""
        hits = self.longest_prefix(req)
        return hits, len(hits) * self.block_size

    def longest_prefix(self, req: Request) -> np.ndarray:
        max_blocks = (req.num_tokens - 1) // self.block_size
        return self.pool.find_longest_prefix(req.hashes, max_blocks, req.hint)

    def allocate_slots(self, req: Request, num_new_tokens: int, new_computed: np.ndarray | None = None,
                       reserve: int = 0, full_sequence_must_fit: bool = False) -> np.ndarray | None:
        """Blocks for ``num_new_tokens`` more tokens, or None if the pool cannot hold them
        (with ``reserve`` blocks left free: vLLM's watermark). ``full_sequence_must_fit``
        (vLLM's admission check, ``scheduler_reserve_full_isl``): also None unless the blocks
        the request's whole current sequence needs beyond its hits fit."""
        pool, bs = self.pool, self.block_size
        n_hit = 0 if new_computed is None else len(new_computed)
        total = req.num_computed + n_hit * bs + num_new_tokens
        n_new = -(-total // bs) - req.nblk - n_hit
        if n_hit:
            r = pool.ref[new_computed]
            hit_free = r == 0
            n_evictable_hits = int(np.count_nonzero(hit_free))
        else:
            n_evictable_hits = 0
        if not pool.growable:
            if full_sequence_must_fit:
                need = -(-req.num_tokens // bs) - req.nblk - n_hit
                if max(need, 0) + n_evictable_hits + reserve > pool.num_free:
                    return None
            if n_new + n_evictable_hits + reserve > pool.num_free:
                return None
        if n_hit:
            pool._touch(new_computed, r, hit_free, n_evictable_hits)  # pool.touch, reusing the counts above
        new = pool.get_new_blocks(n_new) if n_new > 0 else _EMPTY
        if req.table is None:  # room for the whole call
            req.table = np.empty(max(-(-(req.prompt_len + req.output_len) // bs), n_hit + len(new)), dtype=np.int64)
        if n_hit:
            req.append_blocks(new_computed)
        if len(new):
            req.append_blocks(new)
        if n_hit:
            req.num_cached_blocks = max(req.num_cached_blocks, req.nblk - len(new))
        self.cache_blocks(req, min(total, req.num_tokens))
        return new

    def hand_out(self, reqs: list[Request], blocks: np.ndarray) -> None:
        """Append ``blocks[i]`` to the block table of ``reqs[i]`` (a request may repeat): the blocks
        a decode step's (or a jump's) new blocks go to, in order."""
        for req, b in zip(reqs, blocks.tolist(), strict=True):
            k = req.nblk
            if req.table is not None and k < len(req.table):
                req.table[k] = b
                req.nblk = k + 1
            else:
                req.append_blocks((b,))

    def cache_blocks_of(self, items) -> None:
        """``cache_blocks`` for many ``(request, num_tokens)`` at once (one pool call, and one for the
        unlisted blocks)."""
        bs = self.block_size
        blocks, hashes = [], []
        unlisted, unlisted_hashes = [], []
        for req, num_tokens in items:
            n_full = num_tokens // bs
            k = req.num_cached_blocks
            if n_full == k + 1:  # the common case: one block
                if k < req.unlisted_from:
                    blocks.append(req.table[k : n_full])
                    hashes.append(req.hashes[k])
                else:
                    unlisted.append(req.table[k : n_full])
                    unlisted_hashes.append(req.hashes[k])
                req.num_cached_blocks = n_full
            elif n_full > k:
                u = min(max(k, req.unlisted_from), n_full)  # listed below u (in the batch's order), unlisted from u
                if u > k:
                    blocks.append(req.table[k:u])
                    hashes += req.hashes[k:u]
                if n_full > u:
                    unlisted.append(req.table[u:n_full])
                    unlisted_hashes += req.hashes[u:n_full]
                req.num_cached_blocks = n_full
        if blocks:
            self.pool.cache_full_blocks(blocks[0] if len(blocks) == 1 else np.concatenate(blocks), hashes)
        if unlisted:
            self.pool.cache_unlisted_blocks(unlisted[0] if len(unlisted) == 1 else np.concatenate(unlisted),
                                            unlisted_hashes)

    def cache_next_blocks(self, reqs: list[Request]) -> None:
        """``cache_blocks_of`` with each request's next block: what decode steps fill (a request may
        repeat: its blocks in turn)."""
        self.cache_blocks_of(next_block_items(reqs, self.block_size))

    def cache_blocks(self, req: Request, num_tokens: int) -> None:
        """Give hashes to the request's blocks that ``num_tokens`` tokens fill (listed, or unlisted from
        ``req.unlisted_from`` on)."""
        self.cache_blocks_of(((req, num_tokens),))

    def free(self, req: Request, now: float = 0.0, reason: str = "finish") -> None:
        cached = req.blocks[: req.num_cached_blocks]
        hint = (cached, self.pool.gen[cached])
        if reason == "preempt":
            req.hint = hint
        elif req.session is not None:
            req.session.hint = hint
        self.pool.free_block_table(req.blocks, req, now, reason)
        req.table = None  # dropped, not reused: the hint above is a view of it
        req.nblk = 0
        req.num_cached_blocks = 0


def next_block_items(reqs: list[Request], block_size: int) -> list[tuple[Request, int]]:
    """``(request, num_tokens)`` that caches each request's next block, in turn (a request may repeat)."""
    items, cached = [], {}
    for req in reqs:
        n = cached[id(req)] = cached.get(id(req), req.num_cached_blocks) + 1
        items.append((req, n * block_size))
    return items


_EMPTY = np.empty(0, dtype=np.int64)

#: the Python class: the specification of the compiled one, and what runs where that was not built
PyKVCacheManager = KVCacheManager
_compiled = native.load("cwsim._kv_cache_manager")
#: whether ``KVCacheManager`` is the compiled class (``cwsim.native``)
NATIVE = _compiled is not None
if NATIVE:
    KVCacheManager = _compiled.KVCacheManager  # noqa: F811 - the same class, compiled
