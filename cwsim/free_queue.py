"""The free-block queue: the order in which free KV blocks are reused and cached ones evicted.

Its own class, with the surface of vLLM's ``FreeKVCacheBlockQueue``
(``vllm/v1/core/kv_cache_utils.py``: ``popleft``, ``popleft_n``, ``remove``,
``append_n``, ``prepend_n``, ``num_free_blocks``, ``get_all_free_blocks``)
over integer block ids, plus the two operations a scoring policy needs. It is
the one place where an eviction policy's scores become an order, and the place
where both engines plug in: the simulator's ``BlockPool`` holds one, and the
vLLM plugin (``replay.vllm_plugin``) puts one in place of vLLM's own queue, so
both order blocks by the same code.

The order is one invariant:

    The queue holds each free block once, ordered by the key
    ``(tier, score, seq, position)``:

    - tier 0 (``prepend_n``) holds blocks without a hash, a newer batch first
      (its ``seq`` counts down), each batch in the given order: vLLM's LIFO
      reuse of uncached blocks. The never-used blocks start here in id order.
    - tier 1 (``append_n``) holds cached blocks: ``score`` is what the eviction
      policy gave them (lower = evicted sooner; 0 for every block is vLLM's
      LRU), ``seq`` counts up with each batch, so equal scores go least
      recently freed first; inside a batch the given order is kept.

    ``popleft_n`` takes the front; ``remove`` takes blocks out of the middle
    (a prefix hit). ``requeue`` moves free blocks to another key.

A batch appended with one score is one *release*: ``append_n`` returns its
``seq``, and ``in_release(blocks, seq)`` later tells which of those blocks are
still free there (not reused, not evicted, not moved), which is what a policy
that re-scores blocks after their release (a TTL pin) needs. A batch scored
block by block is cut into stretches of equal score, each its own release.

Implementation: a heap of *runs*, one per release, each a numpy array of block
ids. Taking a block out of the middle only marks it (``run_of[b] = -1``);
stale entries are skipped when the run reaches the front, and runs are
compacted when mostly stale. So freeing or hitting a 20k-token prompt is a
handful of vectorised numpy operations. Taking a few blocks (up to ``SMALL``,
the decode steps) runs in scalar steps, where numpy's per-call overhead would
cost more than the work.
"""

from __future__ import annotations

import heapq

import numpy as np

from cwsim import native

_COMPACT_MIN = 256
#: up to this many blocks, popping takes scalar steps
SMALL = 7
try:  # the C function itself, without np.count_nonzero's Python wrapper
    from numpy._core.multiarray import count_nonzero as _cnz
except ImportError:  # pragma: no cover - other numpy layouts
    _cnz = np.count_nonzero
#: ``np.count_nonzero`` without its Python wrapper (a plain C call; ``.any()`` / ``.sum()`` cost ~2 us
#: each on small arrays); it returns a numpy integer
count_nonzero = _cnz


class _Run:
    __slots__ = ("key", "rid", "ids", "start", "live")

    def __init__(self, key: tuple, rid: int, ids: np.ndarray):
        self.key = key
        self.rid = rid
        self.ids = ids
        self.start = 0
        self.live = len(ids)


class FreeBlockQueue:
    """Free block ids of a pool of ``num_blocks`` blocks (ids ``0 .. num_blocks - 1``), in reuse order.

    ``initial``: the blocks free at the start, in id order, tier 0 (vLLM's
    queue starts as every block in id order).
    """

    def __init__(self, num_blocks: int, initial: np.ndarray | None = None):
        #: the run holding each block, -1 when it is not free
        self.run_of = np.full(num_blocks, -1, dtype=np.int64)
        self._runs: dict[int, _Run] = {}
        self._heap: list[tuple[tuple, int]] = []
        self._next_rid = 0
        self._seq = 0
        self.num_free_blocks = 0
        if initial is not None and len(initial):
            self._push((0, 0.0, 0), np.asarray(initial, dtype=np.int64))

    # ------------------------------------------------------------- adding
    def _push(self, key: tuple, ids: np.ndarray) -> None:
        rid = self._next_rid
        self._next_rid += 1
        run = _Run(key, rid, ids)
        self._runs[rid] = run
        self.run_of[ids] = rid
        self.num_free_blocks += len(ids)
        heapq.heappush(self._heap, (key, rid))

    def prepend_n(self, ids: np.ndarray) -> None:
        """Put blocks without a hash at the front, in the given order (``ids`` is kept: pass a copy)."""
        if len(ids):
            self._seq += 1
            self._push((0, 0.0, -self._seq), ids)

    def append_n(self, ids: np.ndarray, score=0.0) -> int:
        """Put cached blocks at their place for ``score`` (a number, or one per block), in the given order.

        Returns the release's ``seq`` (of the first stretch when scored block by block).
        ``ids`` is kept: pass a copy.
        """
        if np.ndim(score) == 0:
            self._seq += 1
            self._push((1, float(score), self._seq), ids)
            return self._seq
        score = np.asarray(score, dtype=np.float64)
        cuts = (score[1:] != score[:-1]).nonzero()[0] + 1
        bounds = [0, *cuts.tolist(), len(score)]
        first = self._seq + 1
        for a, b in zip(bounds[:-1], bounds[1:]):
            self._seq += 1
            self._push((1, float(score[a]), self._seq), ids[a:b])
        return first

    @property
    def next_seq(self) -> int:
        """The ``seq`` the next release will get."""
        return self._seq + 1

    def grow(self, num_blocks: int) -> None:
        """Room for ids up to ``num_blocks - 1`` (a growable pool); the new ids are not free yet."""
        self.run_of = np.concatenate([self.run_of, np.full(num_blocks - len(self.run_of), -1, dtype=np.int64)])

    # ----------------------------------------------------------- removing
    def remove(self, ids: np.ndarray) -> None:
        """Take free blocks (distinct ids) out of the queue, wherever they are."""
        run_of = self.run_of
        rids = run_of[ids]
        run_of[ids] = -1
        n = len(ids)
        self.num_free_blocks -= n
        r0 = rids.item(0)
        if r0 == rids.item(-1) and (n <= 2 or not _cnz(rids != r0)):
            groups = ((r0, n),)
        else:
            uniq, counts = np.unique(rids, return_counts=True)
            groups = zip(uniq.tolist(), counts.tolist())
        for rid, cnt in groups:
            run = self._runs[rid]
            run.live -= cnt
            if run.live == 0:
                del self._runs[rid]
            elif len(run.ids) - run.start > _COMPACT_MIN and run.live * 4 < len(run.ids) - run.start:
                seg = run.ids[run.start :]
                run.ids = seg[run_of[seg] == rid]
                run.start = 0
        if len(self._heap) > 2 * len(self._runs) + 64:
            self._heap = [(r.key, r.rid) for r in self._runs.values()]
            heapq.heapify(self._heap)

    def _front_run(self) -> _Run:
        """The run at the front of the queue (dead heap entries are dropped on the way)."""
        heap, runs = self._heap, self._runs
        while True:
            run = runs.get(heap[0][1])
            if run is not None:
                return run
            heapq.heappop(heap)

    def _advance(self, run: _Run, start: int, live: int) -> None:
        """The front ``run`` after taking blocks: it starts at ``start`` with ``live`` left, or is gone."""
        if live:
            run.start = start
            run.live = live
        else:
            heapq.heappop(self._heap)
            del self._runs[run.rid]

    def popleft_small(self, n: int) -> list[int]:
        """``popleft_n`` in scalar steps, as a list: for a few blocks (decode steps)."""
        run_of = self.run_of
        out: list[int] = []
        need = n
        while need:
            run = self._front_run()
            rid, ids, start, live = run.rid, run.ids, run.start, run.live
            take = need if need < live else live
            for _ in range(take):
                b = ids.item(start)
                start += 1
                while run_of.item(b) != rid:  # stale: left the run since
                    b = ids.item(start)
                    start += 1
                run_of[b] = -1
                out.append(b)
            need -= take
            self._advance(run, start, live - take)
        self.num_free_blocks -= n
        return out

    def popleft_n(self, n: int) -> np.ndarray:
        """The first ``n`` free blocks in queue order, taken out of the queue."""
        if n > self.num_free_blocks:
            raise ValueError(f"cannot pop {n} blocks from a queue of {self.num_free_blocks}")
        run_of = self.run_of
        out: list[np.ndarray] = []
        need = n
        while need:
            run = self._front_run()
            rid, ids, start, live = run.rid, run.ids, run.start, run.live
            take = need if need < live else live
            seg = ids[start : start + take]
            if _cnz(run_of[seg] == rid) == take:  # the common case: no stale entries among the next ``take``
                out.append(seg)
                start += take
            else:
                left = take
                while left:
                    width = min(len(ids) - start, max(2 * left, 64))
                    seg = ids[start : start + width]
                    valid = (run_of[seg] == rid).nonzero()[0]
                    if len(valid) > left:
                        valid = valid[:left]
                        start += valid.item(-1) + 1
                    else:
                        start += width
                    if len(valid):
                        out.append(seg[valid])
                        left -= len(valid)
            need -= take
            self._advance(run, start, live - take)
        if not out:
            return np.empty(0, dtype=np.int64)
        blocks = out[0].copy() if len(out) == 1 else np.concatenate(out)
        run_of[blocks] = -1
        self.num_free_blocks -= n
        return blocks

    def popleft(self) -> int:
        return self.popleft_small(1)[0]

    # --------------------------------------------------------- re-scoring
    def is_free(self, ids: np.ndarray) -> np.ndarray:
        """Per block: is it in the queue."""
        return self.run_of[ids] >= 0

    def in_release(self, ids: np.ndarray, seq: int) -> np.ndarray:
        """Which of ``ids`` are still free in the run(s) keyed with release ``seq``."""
        rids = self.run_of[ids]
        free = rids >= 0
        n = _cnz(free)
        if n == 0:  # none is free any more (a pin whose blocks were all reused)
            return free
        live = rids[free] if n < len(rids) else rids
        r0 = live.item(0)
        if live.item(-1) == r0 and (n <= 2 or not _cnz(live != r0)):  # the common case: all in one run
            return free if self._runs[r0].key[2] == seq else np.zeros(len(ids), dtype=bool)
        out = np.zeros(len(ids), dtype=bool)
        for rid in np.unique(live).tolist():
            if self._runs[rid].key[2] == seq:
                out |= rids == rid
        return out

    def requeue(self, ids: np.ndarray, score: float, seq: int) -> np.ndarray:
        """Move the free blocks among ``ids`` to the tier-1 key ``(score, seq)``, keeping their order.

        Ids not free are skipped; an id given twice moves once. Returns the ids moved.
        """
        moving = ids[self.run_of[ids] >= 0]
        if len(moving) == 0:
            return moving
        srt = np.sort(moving)
        if _cnz(srt[1:] == srt[:-1]):  # an id given twice: keep its first
            _, first = np.unique(moving, return_index=True)
            moving = moving[np.sort(first)]
        self.remove(moving)
        self._push((1, float(score), int(seq)), moving.copy())
        return moving

    def rescore(self, seq: int, ids: np.ndarray, score: float) -> None:
        """Move the blocks of ``ids`` that are still free in release ``seq`` to ``(score, seq)``
        (a policy's ``Environment.rescore``; those are cached blocks: only they are appended)."""
        keep = self.in_release(ids, seq)
        if keep.any():
            self.requeue(ids[keep], score, seq)

    # ---------------------------------------------------------- inspection
    def get_all_free_blocks(self) -> list[int]:
        """All free blocks in queue order (front = next to be popped)."""
        out: list[int] = []
        for _, rid in sorted((r.key, r.rid) for r in self._runs.values()):
            run = self._runs[rid]
            seg = run.ids[run.start :]
            out.extend(seg[self.run_of[seg] == rid].tolist())
        return out

    def check_invariants(self) -> None:
        """Each free block once, in exactly one live run, and the count right (O(n), for tests)."""
        order = self.get_all_free_blocks()
        assert len(order) == len(set(order)) == self.num_free_blocks, "queue holds a block twice or count drifted"
        free = np.zeros(len(self.run_of), dtype=bool)
        free[order] = True
        assert ((self.run_of >= 0) == free).all(), "run membership disagrees with the queue"


#: the Python class: the specification of the compiled one, and what runs where that was not built
PyFreeBlockQueue = FreeBlockQueue
_compiled = native.load("cwsim._free_queue")
#: whether ``FreeBlockQueue`` is the compiled class (``cwsim.native``)
NATIVE = _compiled is not None
if NATIVE:
    FreeBlockQueue = _compiled.FreeBlockQueue  # noqa: F811 - the same class, compiled
