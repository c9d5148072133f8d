# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""The free-block queue compiled: ``cwsim.free_queue.FreeBlockQueue``'s algorithm with its per-block
loops in C.

The specification is the Python class (``cwsim/free_queue.py``): its docstring states the order
invariant, and this class keeps the same surface, the same runs and heap, and the same results, block
for block (``tests/test_free_queue_native.py`` drives both with the same operations). Only the loops
over block ids differ: they run over typed views of the same numpy arrays instead of numpy calls,
which at a few blocks a call cost more in overhead than in work.
"""

include "_digest.pxi"
include "_arrays.pxi"


import heapq

import numpy as np

cdef Py_ssize_t _COMPACT_MIN = 256


cdef class _Run:
    """One release: its key, its id, its block ids (stale entries included) from ``start``, ``live`` of them
    still in the run."""

    def __init__(self, key, long long rid, ids):
        self.key = key
        self.rid = rid
        self.set_ids(ids)
        self.start = 0
        self.live = self.n

    cdef int set_ids(self, ids) except -1:
        """Hold ``ids`` (an int64 array) and its data."""
        self.v = _i64(ids)
        self.n = _size(ids)
        self.ids = ids
        return 0


cdef inline object _as_ids(ids):
    """``ids`` as a contiguous int64 array (no copy when it already is one)."""
    return np.ascontiguousarray(ids, dtype=np.int64)


cdef class FreeBlockQueue:
    """Free block ids of a pool of ``num_blocks`` blocks, in reuse order (see ``cwsim.free_queue``)."""

    def __init__(self, Py_ssize_t num_blocks, initial=None):
        self.run_of = np.full(num_blocks, -1, dtype=np.int64)
        self._v_run_of = self.run_of
        self._runs = {}
        self._heap = []
        self._next_rid = 0
        self._seq = 0
        self.num_free_blocks = 0
        if initial is not None and len(initial):
            self._push((0, 0.0, 0), _as_ids(initial))

    # ------------------------------------------------------------- adding
    cdef int _push(self, tuple key, ids) except -1:
        cdef long long rid = self._next_rid
        cdef _Run run = _Run(key, rid, ids)
        cdef long long* v = run.v
        cdef long long* run_of = &self._v_run_of[0]
        cdef Py_ssize_t i, n = run.n
        self._next_rid += 1
        self._runs[rid] = run
        for i in range(n):
            run_of[v[i]] = rid
        self.num_free_blocks += n
        heapq.heappush(self._heap, (key, rid))
        return 0

    def prepend_n(self, ids):
        """Put blocks without a hash at the front, in the given order (``ids`` is kept: pass a copy)."""
        if len(ids):
            self.prepend(_as_ids(ids))

    cpdef int prepend(self, ids) except -1:
        """``prepend_n`` for an int64 array that is not empty."""
        self._seq += 1
        self._push((0, 0.0, -self._seq), ids)
        return 0

    def append_n(self, ids, score=0.0):
        """Put cached blocks at their place for ``score`` (a number, or one per block), in the given order.

        Returns the release's ``seq`` (of the first stretch when scored block by block)."""
        ids = _as_ids(ids)
        if np.ndim(score) == 0:
            self._seq += 1
            self._push((1, float(score), self._seq), ids)
            return self._seq
        score = np.ascontiguousarray(score, dtype=np.float64)
        cdef double* s = _f64(score)
        cdef Py_ssize_t a = 0, b, n = _size(score)
        cdef long long first = self._seq + 1
        for b in range(1, n + 1):
            if b == n or s[b] != s[b - 1]:
                self._seq += 1
                self._push((1, s[a], self._seq), ids[a:b])
                a = b
        return first

    cpdef long long append(self, ids) except? -1:
        """``append_n`` with score 0 for an int64 array that is not empty."""
        self._seq += 1
        self._push((1, 0.0, self._seq), ids)
        return self._seq

    @property
    def next_seq(self):
        """The ``seq`` the next release will get."""
        return self._seq + 1

    def grow(self, Py_ssize_t num_blocks):
        """Room for ids up to ``num_blocks - 1`` (a growable pool); the new ids are not free yet."""
        self.run_of = np.concatenate([self.run_of, np.full(num_blocks - len(self.run_of), -1, dtype=np.int64)])
        self._v_run_of = self.run_of

    # ----------------------------------------------------------- removing
    def remove(self, ids):
        """Take free blocks (distinct ids) out of the queue, wherever they are."""
        self.remove_ids(_as_ids(ids))

    cpdef int remove_ids(self, ids) except -1:
        """``remove`` for an int64 array."""
        cdef long long* v = _i64(ids)
        cdef long long* run_of = &self._v_run_of[0]
        cdef Py_ssize_t i, n = _size(ids), cnt
        cdef long long rid, cur
        cdef dict counts = None
        if n == 0:
            return 0
        self.num_free_blocks -= n
        cur = run_of[v[0]]
        cnt = 0
        for i in range(n):  # mark them all, counting per run (runs come in stretches)
            rid = run_of[v[i]]
            run_of[v[i]] = -1
            if rid == cur:
                cnt += 1
            else:
                if counts is None:
                    counts = {}
                counts[cur] = counts.get(cur, 0) + cnt
                cur, cnt = rid, 1
        if counts is None:
            self._lose(cur, cnt)
        else:
            counts[cur] = counts.get(cur, 0) + cnt
            for rid in sorted(counts):
                self._lose(rid, counts[rid])
        if len(self._heap) > 2 * len(self._runs) + 64:
            self._heap = [(r.key, r.rid) for r in self._runs.values()]
            heapq.heapify(self._heap)
        return 0

    cdef int _lose(self, long long rid, Py_ssize_t cnt) except -1:
        """Run ``rid`` lost ``cnt`` blocks (already marked): drop it when empty, compact it when mostly stale."""
        cdef _Run run = self._runs[rid]
        cdef long long[::1] run_of = self._v_run_of
        cdef long long* seg
        cdef Py_ssize_t i, k, width
        run.live -= cnt
        if run.live == 0:
            del self._runs[rid]
            return 0
        width = run.n - run.start
        if width > _COMPACT_MIN and run.live * 4 < width:
            kept = np.empty(run.live, dtype=np.int64)
            seg = _i64(kept)
            k = 0
            for i in range(run.start, run.n):
                if run_of[run.v[i]] == rid:
                    seg[k] = run.v[i]
                    k += 1
            run.set_ids(kept)
            run.start = 0
        return 0

    cdef _Run _front_run(self):
        """The run at the front of the queue (dead heap entries are dropped on the way)."""
        cdef list heap = self._heap
        cdef dict runs = self._runs
        while True:
            run = runs.get(heap[0][1])
            if run is not None:
                return run
            heapq.heappop(heap)

    cdef Py_ssize_t _pop_into(self, long long* out, Py_ssize_t n) except -1:
        """Take the first ``n`` free blocks into ``out[:n]`` (the caller checked that they are free)."""
        cdef long long* run_of = &self._v_run_of[0]
        cdef _Run run
        cdef long long* ids
        cdef Py_ssize_t k = 0, take, got, start
        cdef long long rid, b
        while k < n:
            run = self._front_run()
            rid = run.rid
            ids = run.v
            start = run.start
            take = n - k if n - k < run.live else run.live
            got = 0
            while got < take:
                b = ids[start]
                start += 1
                if run_of[b] == rid:  # else stale: it left the run since
                    run_of[b] = -1
                    out[k + got] = b
                    got += 1
            k += take
            if run.live > take:
                run.start = start
                run.live -= take
            else:
                heapq.heappop(self._heap)
                del self._runs[rid]
        self.num_free_blocks -= n
        return n

    cpdef object pop(self, Py_ssize_t n):
        """``popleft_n`` without the check (``n`` <= the free blocks)."""
        out = np.empty(n, dtype=np.int64)
        self._pop_into(_i64(out), n)
        return out

    def popleft_n(self, Py_ssize_t n):
        """The first ``n`` free blocks in queue order, taken out of the queue."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot pop {n} blocks from a queue of {self.num_free_blocks}")
        return self.pop(n)

    def popleft_small(self, Py_ssize_t n):
        """``popleft_n`` as a list."""
        return self.popleft_n(n).tolist()

    def popleft(self):
        return self.popleft_small(1)[0]

    # --------------------------------------------------------- re-scoring
    def is_free(self, ids):
        """Per block: is it in the queue."""
        return self.run_of[ids] >= 0

    def in_release(self, ids, long long seq):
        """Which of ``ids`` are still free in the run(s) keyed with release ``seq``."""
        cdef long long[::1] v = _as_ids(ids)
        cdef long long[::1] run_of = self._v_run_of
        cdef Py_ssize_t i, n = v.shape[0]
        cdef long long rid, last = -1
        cdef bint ok = False
        out = np.zeros(n, dtype=bool)
        cdef unsigned char[::1] o = out.view(np.uint8)
        for i in range(n):
            rid = run_of[v[i]]
            if rid < 0:
                continue
            if rid != last:
                last = rid
                ok = (<_Run>self._runs[rid]).key[2] == seq
            if ok:
                o[i] = 1
        return out

    def requeue(self, ids, score, seq):
        """Move the free blocks among ``ids`` to the tier-1 key ``(score, seq)``, keeping their order.

        Ids not free are skipped; an id given twice moves once. Returns the ids moved."""
        ids = _as_ids(ids)
        moving = ids[self.run_of[ids] >= 0]
        if len(moving) == 0:
            return moving
        srt = np.sort(moving)
        if (srt[1:] == srt[:-1]).any():  # an id given twice: keep its first
            _, first = np.unique(moving, return_index=True)
            moving = moving[np.sort(first)]
        self.remove_ids(moving)
        self._push((1, float(score), int(seq)), moving.copy())
        return moving

    def rescore(self, seq, ids, score):
        """Move the blocks of ``ids`` that are still free in release ``seq`` to ``(score, seq)``."""
        keep = self.in_release(ids, seq)
        if keep.any():
            self.requeue(np.asarray(ids)[keep], score, seq)

    # ---------------------------------------------------------- inspection
    def get_all_free_blocks(self):
        """All free blocks in queue order (front = next to be popped)."""
        out = []
        for _, rid in sorted((r.key, r.rid) for r in self._runs.values()):
            run = self._runs[rid]
            seg = run.ids[run.start :]
            out.extend(seg[self.run_of[seg] == rid].tolist())
        return out

    def check_invariants(self):
        """Each free block once, in exactly one live run, and the count right (O(n), for tests)."""
        order = self.get_all_free_blocks()
        assert len(order) == len(set(order)) == self.num_free_blocks, "queue holds a block twice or count drifted"
        free = np.zeros(len(self.run_of), dtype=bool)
        free[order] = True
        assert ((self.run_of >= 0) == free).all(), "run membership disagrees with the queue"
        for rid, run in self._runs.items():
            seg = run.ids[run.start :]
            assert int((self.run_of[seg] == rid).sum()) == run.live, "a run's live count drifted"
