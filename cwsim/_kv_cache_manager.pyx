# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=False
"""The KV cache manager compiled: ``cwsim.kv_cache_manager.PyKVCacheManager`` with its per-block work in C.

The specification is the Python class (``cwsim/kv_cache_manager.py``, whose docstring says what each
operation does, after vLLM's ``KVCacheManager``). This twin gives the same results over the compiled
pool core (``cwsim._block_pool.PoolCore``): it counts evictable hits and caches the blocks a request
filled by reading the request's block table and hashes in place, where the Python class slices and
concatenates them for the pool. ``tests/test_native.py`` holds the two to the same results.
"""

include "_digest.pxi"
include "_arrays.pxi"


import numpy as np

from cwsim._block_pool cimport PoolCore

cdef object _EMPTY = np.empty(0, dtype=np.int64)


cdef inline Py_ssize_t _cdiv(Py_ssize_t a, Py_ssize_t b):
    """Ceiling division, with Python's floor division (cdivision is off in this module: its divisions are Python's)."""
    return -(-a // b)


cdef class KVCacheManager:
    cdef public PoolCore pool
    cdef public Py_ssize_t block_size

    def __init__(self, PoolCore pool, Py_ssize_t block_size):
        self.pool = pool
        self.block_size = block_size

    def get_computed_blocks(self, req):
        """Cached prefix blocks for a request that has no computed tokens yet."""
        hits = self.longest_prefix(req)
        return hits, len(hits) * self.block_size

    def longest_prefix(self, req):
        cdef Py_ssize_t max_blocks = (req.prompt_len + req.num_generated - 1) // self.block_size
        return self.pool.find_longest_prefix(req.hashes, max_blocks, req.hint)

    def allocate_slots(self, req, Py_ssize_t num_new_tokens, new_computed=None, Py_ssize_t reserve=0,
                       bint full_sequence_must_fit=False):
        """Blocks for ``num_new_tokens`` more tokens, or None if the pool cannot hold them (see
        ``PyKVCacheManager.allocate_slots``)."""
        cdef PoolCore pool = self.pool
        cdef Py_ssize_t bs = self.block_size, i
        cdef Py_ssize_t n_hit = 0 if new_computed is None else len(new_computed)
        cdef Py_ssize_t nblk = req.nblk
        cdef Py_ssize_t num_tokens = req.prompt_len + req.num_generated
        cdef Py_ssize_t total = req.num_computed + n_hit * bs + num_new_tokens
        cdef Py_ssize_t n_new = _cdiv(total, bs) - nblk - n_hit
        cdef Py_ssize_t n_evictable_hits = 0, need, num_free
        cdef long long* hv
        if n_hit:
            new_computed = np.ascontiguousarray(new_computed, dtype=np.int64)
            hv = _i64(new_computed)
            for i in range(n_hit):
                if pool._ref[hv[i]] == 0:
                    n_evictable_hits += 1
        if not pool.growable:
            num_free = pool.queue.num_free_blocks
            if full_sequence_must_fit:
                need = _cdiv(num_tokens, bs) - nblk - n_hit
                if max(need, 0) + n_evictable_hits + reserve > num_free:
                    return None
            if n_new + n_evictable_hits + reserve > num_free:
                return None
        if n_hit:
            pool.touch_hits(new_computed, n_evictable_hits)
        new = pool.get_new_blocks(n_new) if n_new > 0 else _EMPTY
        cdef Py_ssize_t n_got = len(new)
        if req.table is None:  # room for the whole call
            req.table = np.empty(max(_cdiv(req.prompt_len + req.output_len, bs), n_hit + n_got), dtype=np.int64)
        if n_hit:
            req.append_blocks(new_computed)
        if n_got:
            req.append_blocks(new)
        if n_hit:
            req.num_cached_blocks = max(<Py_ssize_t>req.num_cached_blocks, <Py_ssize_t>req.nblk - n_got)
        self.cache_blocks_of(((req, min(total, num_tokens)),))
        return new

    def hand_out(self, list reqs, blocks):
        """Append ``blocks[i]`` to the block table of ``reqs[i]`` (see ``PyKVCacheManager``): a store
        into the table's data while it has room."""
        cdef long long* v = _i64(blocks)
        cdef Py_ssize_t i, k, n = _size(blocks)
        if len(reqs) != n:
            raise ValueError(f"hand_out: {len(reqs)} requests for {n} blocks")
        for i in range(n):
            req = reqs[i]
            k = req.nblk
            table = req.table
            if table is not None and k < len(table):
                if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>table):
                    raise ValueError("hand_out: a read-only block table")
                _i64(table)[k] = v[i]
                req.nblk = k + 1
            else:
                req.append_blocks((v[i],))

    def cache_blocks_of(self, items):
        """``cache_blocks`` for many ``(request, num_tokens)`` at once (see ``PyKVCacheManager``): the listed
        blocks of every request in turn, then the unlisted ones, as the Python class's two pool calls."""
        cdef PoolCore pool = self.pool
        cdef Py_ssize_t bs = self.block_size, n_full, k, u, j, m
        cdef list spans = []  # (request, k, u, n_full)
        cdef bint any_unlisted = False
        cdef long long* t
        for req, num_tokens in items:
            n_full = num_tokens // bs
            k = req.num_cached_blocks
            if n_full > k:
                u = min(max(k, <Py_ssize_t>req.unlisted_from), n_full)  # listed below u, unlisted from u
                spans.append((req, k, u, n_full))
                any_unlisted |= n_full > u
                req.num_cached_blocks = n_full
        m = len(spans)
        if m == 0:
            return
        if pool.references is not None:  # the stream records each batch's contents at once
            hashes = []
            for req, k, u, n_full in spans:
                hashes += req.hashes[k:u]
            if hashes:
                pool.references.insert(hashes, pool.cached)
            if any_unlisted:
                raise AssertionError("unlisted blocks with a reference stream (the eviction bound lists every block)")
        for j in range(m):
            req, k, u, n_full = spans[j]
            if u > k:
                t = _i64(req.table)
                pool.cache_range(t, k, u, req.hashes, True)
        if any_unlisted:
            for j in range(m):
                req, k, u, n_full = spans[j]
                if n_full > u:
                    t = _i64(req.table)
                    pool.cache_range(t, u, n_full, req.hashes, False)

    def cache_next_blocks(self, list reqs):
        """``cache_blocks_of`` with each request's next block (see ``PyKVCacheManager``): listed blocks
        cached as they come, unlisted ones after them, as ``cache_blocks_of`` orders the two."""
        cdef PoolCore pool = self.pool
        cdef Py_ssize_t i, k, n = len(reqs)
        cdef list unlisted = None
        if n == 0:
            return
        if pool.references is not None:  # the stream records the batch before it is cached: the general path
            from cwsim.kv_cache_manager import next_block_items
            self.cache_blocks_of(next_block_items(reqs, self.block_size))
            return
        for i in range(n):
            req = reqs[i]
            k = req.num_cached_blocks
            req.num_cached_blocks = k + 1
            if k < <Py_ssize_t>req.unlisted_from:
                pool.cache_range(_i64(req.table), k, k + 1, req.hashes, True)
            else:
                if unlisted is None:
                    unlisted = []
                unlisted.append((req, k))
        if unlisted is not None:
            for req, k in unlisted:
                pool.cache_range(_i64(req.table), k, k + 1, req.hashes, False)

    def cache_blocks(self, req, num_tokens):
        """Give hashes to the request's blocks that ``num_tokens`` tokens fill (listed, or unlisted from
        ``req.unlisted_from`` on)."""
        self.cache_blocks_of(((req, num_tokens),))

    def free(self, req, now=0.0, reason="finish"):
        """Release the request's blocks tail first, keeping its cached blocks as the next lookup's hint."""
        blocks = req.blocks
        cached = blocks[: req.num_cached_blocks]
        hint = (cached, self.pool._gens(cached))
        if reason == "preempt":
            req.hint = hint
        elif req.session is not None:
            req.session.hint = hint
        self.pool.free_block_table(blocks, req, now, reason)
        req.table = None  # dropped, not reused: the hint above is a view of it
        req.nblk = 0
        req.num_cached_blocks = 0
