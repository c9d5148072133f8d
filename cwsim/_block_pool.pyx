# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The block pool's core compiled: ``cwsim.block_pool.PyPoolCore`` with its per-block loops in C.

The specification is the Python class (``cwsim/block_pool.py``, whose docstring states the pool's
invariant): the same state (the same numpy arrays, the hash map, the free queue) and the same
results, block for block, on the allocation path -- allocating and evicting, caching, freeing,
touching, looking up prefixes. ``BlockPool`` extends whichever core runs, so the rest of the pool
(re-queueing, uncached releases, inspection) is written once. ``tests/test_native.py`` holds the two
cores to the same results.
"""

include "_digest.pxi"
include "_arrays.pxi"


import numpy as np

from cwsim._free_queue cimport FreeBlockQueue

from cpython.object cimport PyObject


cdef extern from "Python.h":
    # the value under key, set to default first if key was missing (a borrowed reference): one lookup
    PyObject* PyDict_SetDefault(object d, object key, object default) except NULL


cdef long long NULL_BLOCK = 0
cdef object _EMPTY = np.empty(0, dtype=np.int64)


cdef inline object _ids(a):
    """``a`` as a contiguous int64 array (no copy when it already is one)."""
    return np.ascontiguousarray(a, dtype=np.int64)


cdef class PoolCore:
    def _bind(self):
        """Typed views of the state arrays (after they are made or grown: ``BlockPool._ensure_unhashed_free``)."""
        self._ref = self.ref
        self._has_hash = self.has_hash.view(np.uint8)
        self._hash_of = self.hash_of
        self._canonical = self.canonical.view(np.uint8)
        self._gen = self.gen
        self._unlisted = self.unlisted.view(np.uint8)

    cdef int cache_range(self, long long* table, Py_ssize_t lo, Py_ssize_t hi, object hashes, bint listed) except -1:
        """Give ``table[i]`` the hash ``hashes[i]`` for ``lo <= i < hi``: listed (the hash map, or the
        duplicates when the hash is cached already: the first block stays the one lookups return, as in
        vLLM) or unlisted. A block that has a hash already is refused (a bug: the run stops there)."""
        cdef Py_ssize_t i
        cdef long long b, hv, r0 = 0, rstep = 0
        cdef object bo
        cdef dict cached = self.cached
        cdef bint ranged = type(hashes) is range  # a call's own ids (``own_block_ids``): computed, not indexed
        if ranged:
            if hi > len(hashes):
                raise IndexError("range object index out of range")
            r0, rstep = hashes.start, hashes.step
        for i in range(lo, hi):
            b = table[i]
            if self._has_hash[b]:
                raise AssertionError("caching a block that already has a hash")
            if ranged:
                hv = r0 + i * rstep
                if listed:
                    h = hv
            else:
                h = hashes[i]
                hv = h
            self._has_hash[b] = 1
            self._hash_of[b] = hv
            if not listed:
                self._unlisted[b] = 1
                continue
            bo = <object>b  # (an object: the identity compared below)
            if PyDict_SetDefault(cached, h, bo) == <PyObject*>bo:  # (b had no hash: no other block is b)
                self._canonical[b] = 1
            else:  # cached already: a duplicate
                self._dups.setdefault(h, []).append(bo)
        if not listed:
            self.num_unlisted += hi - lo
        return 0

    cdef int touch_hits(self, object hits, Py_ssize_t n_free) except -1:
        """Add one reference to each of ``hits`` (a contiguous int64 array), ``n_free`` of which are free:
        those leave the queue."""
        cdef long long* v = _i64(hits)
        cdef long long* lv
        cdef int* ref = &self._ref[0]  # (locals: the loops keep them in registers)
        cdef Py_ssize_t i, k = 0, n = _size(hits)
        if n_free:
            if n_free == n:
                leaving = hits
            else:
                leaving = np.empty(n_free, dtype=np.int64)
                lv = _i64(leaving)
                for i in range(n):
                    if ref[v[i]] == 0:
                        lv[k] = v[i]
                        k += 1
            self.queue.remove_ids(leaving)
            self.num_free_hashed -= n_free
        for i in range(n):
            ref[v[i]] += 1
        if self.references is not None:
            self.references.touch(self.hash_of[hits[self.has_hash[hits]]])
        return 0

    # ----------------------------------------------------------------- queue
    @property
    def num_free(self):
        """Free blocks (the queue's length)."""
        return self.queue.num_free_blocks

    def _leave_queue(self, blocks):
        """Take free cached blocks out of the queue (they become in use)."""
        blocks = _ids(blocks)
        self.queue.remove_ids(blocks)
        self.num_free_hashed -= len(blocks)

    def _deref(self, blocks):
        """Drop one reference from each of ``blocks`` (distinct ids; refused, changing nothing, if one has
        none); their new ref counts."""
        blocks = _ids(blocks)
        cdef long long* v = _i64(blocks)
        cdef Py_ssize_t i, n = _size(blocks)
        out = np.empty(n, dtype=np.int32)
        cdef int* r = _i32(out)
        for i in range(n):
            if self._ref[v[i]] <= 0:
                raise AssertionError("freeing a block whose ref count is already 0")
        for i in range(n):
            self._ref[v[i]] -= 1
            r[i] = self._ref[v[i]]
        return out

    def _release(self, ordered, bint tail_first, request, now, reason):
        """Drop one reference from each of ``ordered``; the blocks that become free join the queue."""
        if len(ordered) == 0:
            return
        ordered = _ids(ordered)
        self._release_ids(_ids(ordered[::-1]) if tail_first else ordered, tail_first, request, now, reason)

    cdef int _release_ids(self, ids, bint table, request, now, reason) except -1:
        """``_release`` for an int64 array that is not empty: a block table released from its last block
        (``table``; a block's place is its index), else blocks in release order (its place in ``ids``).
        One pass in release order: each block's reference dropped and, if that frees it, the block sorted
        into the cached or the uncached ones (with its place when a policy scores it). A block without a
        reference is refused, and the ones before it get theirs back: nothing changes."""
        cdef Py_ssize_t n = _size(ids), i, j, ku = 0, kh = 0, at
        cdef long long* v = _i64(ids)
        cdef bint hooks = self.references is not None or self.on_release is not None
        cdef bint scored = self.score_fn is not None
        cdef long long b
        cdef int c
        cdef int* r = NULL
        cdef int* ref = &self._ref[0]
        cdef unsigned char* has_hash = &self._has_hash[0]
        if hooks:
            refs = np.empty(n, dtype=np.int32)
            r = _i32(refs)
        buf = np.empty((3 if scored else 2) * n, dtype=np.int64)  # freed cached | freed uncached | their places
        cdef long long* fh = _i64(buf)
        cdef long long* fu = fh + n
        cdef long long* p = fh + 2 * n
        for i in range(n):
            at = n - 1 - i if table else i
            b = v[at]
            c = ref[b] - 1
            if c < 0:
                for j in range(i):
                    ref[v[n - 1 - j if table else j]] += 1
                raise AssertionError("freeing a block whose ref count is already 0")
            ref[b] = c
            if hooks:
                r[i] = c
            if c == 0:
                if has_hash[b]:
                    fh[kh] = b
                    if scored:
                        p[kh] = at
                    kh += 1
                else:
                    fu[ku] = b
                    ku += 1
        if hooks:
            ordered = ids[::-1] if table else ids
            hashed = self.has_hash[ordered]
            if self.references is not None:
                self.references.release(self.hash_of[ordered[hashed]])
            if self.on_release is not None:
                self.on_release(ordered, refs, hashed, request)
        if ku:
            self.queue.prepend(buf[n : n + ku].copy())  # (a run keeps its array: its own, of its size)
        if kh == 0:
            return 0
        self.num_free_hashed += kh
        freed_h = buf[:kh].copy()
        if not scored:  # score 0 for every block: one run
            self.queue.append(freed_h)
            return 0
        from cwsim.block_pool import FreedBlocks  # here, not at import: cwsim.block_pool imports this module

        score = self.score_fn(FreedBlocks(freed_h, self.hash_of[freed_h], buf[2 * n : 2 * n + kh].copy(), request,
                                          now, reason, self.queue.next_seq))
        self.queue.append_n(freed_h, score)
        return 0

    def free_block_table(self, table, request=None, now=0.0, reason="finish"):
        """Free a request's block table the way vLLM does: tail first."""
        if len(table) == 0:
            return
        self._release_ids(_ids(table), True, request, now, reason)

    cdef object _gens(self, blocks):
        """``gen[blocks]`` for an int64 array."""
        cdef Py_ssize_t i, n = _size(blocks)
        cdef long long* v = _i64(blocks)
        out = np.empty(n, dtype=np.int64)
        cdef long long* g = _i64(out)
        cdef long long* gen = &self._gen[0]
        for i in range(n):
            g[i] = gen[v[i]]
        return out

    def find_longest_prefix(self, hashes, Py_ssize_t max_blocks, hint=None):
        """Block ids of the longest prefix of ``hashes[:max_blocks]`` that is cached (see ``PyPoolCore``)."""
        cdef Py_ssize_t start = 0, n, i
        found = _EMPTY
        if hint is not None:
            blocks, gens = hint
            n = min(len(blocks), max_blocks)
            if n:
                cand = _ids(blocks[:n])
                found = self._hint_prefix(cand, _ids(gens))
                start = len(found)
        if start >= max_blocks:
            return found
        cdef dict cached = self.cached
        cdef list hits = []
        for i in range(start, max_blocks):
            b = cached.get(hashes[i])
            if b is None:
                break
            hits.append(b)
        if not hits:
            return found
        rest = np.array(hits, dtype=np.int64)
        return rest if start == 0 else np.concatenate([found, rest])

    cdef object _hint_prefix(self, cand, gens):
        """The leading blocks of ``cand`` still holding what they held at ``gens`` (listed or unlisted)."""
        cdef long long* c = _i64(cand)
        cdef long long* g = _i64(gens)
        cdef Py_ssize_t i, n = _size(cand)
        cdef long long b
        cdef unsigned char* canonical = &self._canonical[0]
        cdef unsigned char* unlisted = &self._unlisted[0]
        cdef long long* gen = &self._gen[0]
        cdef bint any_unlisted = self.num_unlisted > 0
        for i in range(n):
            b = c[i]
            if not (canonical[b] or (any_unlisted and unlisted[b])) or gen[b] != g[i]:
                return cand[:i]
        return cand

    def touch(self, blocks):
        """Add one reference to each block (a prefix hit); free ones leave the queue."""
        if len(blocks) == 0:
            return
        r = self.ref[blocks]
        free = r == 0
        self._touch(blocks, r, free, int(np.count_nonzero(free)))

    def _touch(self, blocks, r, free, n_free):
        """``touch`` given ``r = ref[blocks]``, ``free = r == 0`` and its count."""
        self.touch_hits(_ids(blocks), n_free)

    def get_new_blocks(self, Py_ssize_t n):
        """Pop ``n`` blocks from the front of the free queue, evicting cached ones."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        if self.growable:
            self._ensure_unhashed_free(n)
        if n > self.queue.num_free_blocks:
            raise ValueError(f"cannot get {n} free blocks from the pool ({self.queue.num_free_blocks} free)")
        blocks = self.queue.pop(n)
        cdef long long* v = _i64(blocks)
        cdef Py_ssize_t i, k = 0, in_use = self.num_blocks - 1 - self.queue.num_free_blocks
        if in_use > self.peak_in_use:
            self.peak_in_use = in_use
        for i in range(n):
            self._ref[v[i]] = 1
            k += self._has_hash[v[i]]
        if k == 0:
            return blocks
        if k == n:
            self._evict(blocks)
            return blocks
        hashed = np.empty(k, dtype=np.int64)
        cdef long long* h = _i64(hashed)
        k = 0
        for i in range(n):
            if self._has_hash[v[i]]:
                h[k] = v[i]
                k += 1
        self._evict(hashed)
        return blocks

    def _evict(self, blocks):
        hashes = self._unhash(blocks)
        self.num_free_hashed -= len(blocks)
        self.num_evicted += len(blocks)
        if len(hashes) and self.on_evict is not None:
            self.on_evict(hashes)

    def _unhash(self, blocks):
        """Take the blocks' hashes out of the cache (the hash map, duplicates, flags); bump their ``gen``.
        Returns the hashes of the listed ones (those the hash map held), as an int64 array (the Python
        core: a list; ``on_evict`` takes either, and indexes numpy flags with it without a conversion)."""
        blocks = _ids(blocks)
        cdef long long* v = _i64(blocks)
        cdef Py_ssize_t i, n = _size(blocks)
        cdef long long b
        cdef dict cached = self.cached, dups = self._dups
        listed_hashes = np.empty(n, dtype=np.int64)
        cdef long long* lh = _i64(listed_hashes)
        cdef Py_ssize_t k = 0
        cdef list others
        for i in range(n):
            b = v[i]
            if self._unlisted[b]:
                self._unlisted[b] = 0
                self.num_unlisted -= 1
            else:
                h = self._hash_of[b]
                lh[k] = h
                k += 1
                if not dups:  # the block is the canonical one for its hash
                    del cached[h]
                elif cached.get(h) == b:
                    others = dups.get(h)
                    if others:
                        cached[h] = nb = others.pop(0)
                        self._canonical[<long long>nb] = 1
                        if not others:
                            del dups[h]
                    else:
                        del cached[h]
                else:
                    others = dups[h]
                    others.remove(b)
                    if not others:
                        del dups[h]
            self._has_hash[b] = 0
            self._canonical[b] = 0
            self._gen[b] += 1
        if self.on_unhash is not None:
            self.on_unhash(blocks)
        return listed_hashes if k == n else listed_hashes[:k]

    def cache_full_blocks(self, blocks, hashes):
        """Give newly filled blocks their hashes so later requests can hit them (see ``PyPoolCore``)."""
        cdef Py_ssize_t n = len(blocks)
        if n == 0:
            return
        if self.references is not None:
            self.references.insert(hashes, self.cached)
        blocks = _ids(blocks)
        self.cache_range(_i64(blocks), 0, n, hashes, True)

    def cache_unlisted_blocks(self, blocks, hashes):
        """Give newly filled blocks hashes that no lookup will ever ask for (see ``PyPoolCore``)."""
        cdef Py_ssize_t n = len(blocks)
        if n == 0:
            return
        if self.references is not None:
            raise AssertionError("unlisted blocks with a reference stream (the eviction bound lists every block)")
        blocks = _ids(blocks)
        self.cache_range(_i64(blocks), 0, n, hashes, False)
