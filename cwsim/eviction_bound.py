"""An offline eviction bound under the same admission order: Belady's MIN on a run's reference stream.

A policy changes two things: which calls run when (admission, scheduling) and which cached
blocks go first (eviction). Belady run as a *policy* (``cwsim.policies.eviction.Belady``)
judges only the second and brings its own schedule, so under FCFS admission it is no bound:
a prefix-aware scheduler evicts less than it. This module judges a run's eviction order
under the schedule that run produced.

The reference stream
    What the run's engine does with cached blocks' contents (their dense hash ids,
    ``cwsim.hashing.BlockIds``), in the order it does it:

    - a *reference*: a request takes a prefix hit (first admission, or again after a
      preemption), a block gets its hash (computed by a prefill chunk or a decode step, or
      loaded from the CPU tier), or a CPU-tier copy holds a block. The block is in use from
      then on: its content is *pinned*;
    - a *release*: one such hold of a hashed block ends (a request finishes or is
      preempted, a copy ends). A content is pinned while it has more references than
      releases.

    ``ReferenceStream.misses`` counts the references whose content no block in the pool held
    at that moment (a block computed, or loaded): the run's own misses on its stream.

The bound
    Model the pool as a cache of ``C = kv_blocks - 1`` contents (the null block excluded)
    that holds each referenced content at its reference, never drops a pinned content, and
    caches every miss (as vLLM caches every computed full block). The run itself is one
    schedule of this model: a hit and a just-computed block are held at their references,
    the blocks in use are never evicted, and the pool holds at most ``C`` distinct contents.
    Among all schedules of the model, the fewest misses are Belady's MIN restricted to
    unpinned contents (on a miss with the cache full, drop the unpinned content whose next
    reference is farthest; Belady 1966, Mattson et al. 1970: the exchange argument holds
    since a pin starts only at a reference). So

        ``min_misses <= stream.misses``

    and since MIN never drops before the cache is full and keeps it full after, its
    evictions are ``max(0, min_misses - C)``, at most the distinct contents the run itself
    dropped (its misses less what is resident at the end), at most its ``evicted_blocks``
    (which counts duplicate blocks of one content too):

        ``bound_evicted_blocks = max(0, min_misses - C) <= evicted_blocks``.

    (With a CPU tier a run also drops contents it offloads, which are not evictions: there
    compare ``stream_remisses`` with ``bound_remisses``, which always holds.)
    ``evicted_blocks / bound_evicted_blocks`` is how much better an eviction order alone
    could do under that schedule; ``bound_remisses = min_misses - distinct``, the fewest
    re-computations of content seen before (the run's: ``stream_remisses``). It is a bound,
    not always a reachable target: the model gives every block in use but not yet hashed
    (a partial block, a chunk being computed) back to the cache, and a better eviction
    order would change the schedule itself (more hits, shorter prefills).

``belady_min`` runs in O(n log C) Python steps over the stream (about 1 s per million
events here); a run with ``SimConfig.eviction_bound`` records its stream and adds the
bound to its summary (``cwsim.runner.simulate``).
"""

from __future__ import annotations

import heapq
from array import array
from dataclasses import dataclass

import numpy as np

_CHUNK = 1 << 20  # references converted to Python ints at a time
_ID_BITS = 32  # a heap entry packs (next reference, content id) into one int


class ReferenceStream:
    """The reference stream of a run (see the module docstring), recorded by a ``BlockPool``
    whose ``references`` is this object. Each event is ``content << 1 | kind`` (kind 0: a
    reference, 1: a release); appends only."""

    def __init__(self) -> None:
        self._events = array("q")
        self.misses = 0

    def __len__(self) -> int:
        return len(self._events)

    def touch(self, hashes: np.ndarray) -> None:
        """Resident contents referenced (a prefix hit, a copy's hold)."""
        self._events.frombytes((hashes.astype(np.int64, copy=False) << 1).tobytes())

    def insert(self, hashes, cached) -> None:
        """Contents given to blocks, before they enter ``cached`` (the pool's hash -> block map)."""
        if isinstance(hashes, np.ndarray):
            hashes = hashes.tolist()
        new = [h for h in hashes if h not in cached]
        if new:
            self.misses += len(set(new)) if len(new) > 1 else 1
        self._events.extend([h << 1 for h in hashes])

    def release(self, hashes: np.ndarray) -> None:
        """One hold of each of these contents ends."""
        self._events.frombytes(((hashes.astype(np.int64, copy=False) << 1) | 1).tobytes())

    def events(self) -> tuple[np.ndarray, np.ndarray]:
        """``(contents, is_release)``: the stream as arrays."""
        e = np.frombuffer(self._events, dtype=np.int64) if len(self._events) else np.empty(0, dtype=np.int64)
        return e >> 1, (e & 1).astype(bool)


@dataclass(frozen=True, slots=True)
class MinResult:
    """Belady's MIN on one stream: ``misses`` (the fewest), ``evictions`` (``max(0, misses -
    capacity)``), ``references`` and ``distinct`` contents (every one a compulsory miss)."""

    references: int
    distinct: int
    misses: int
    evictions: int

    @property
    def remisses(self) -> int:
        """Misses of contents referenced before (re-computations)."""
        return self.misses - self.distinct


def next_references(ids: np.ndarray, is_ref: np.ndarray | None = None) -> np.ndarray:
    """Per event ``i``: the index of the next reference (not release) to the same content, or
    ``len(ids) + i`` when there is none (distinct keys past every real index, farther the later
    they were made). ``is_ref``: which events are references (default: all)."""
    n = len(ids)
    nxt = np.arange(n, 2 * n, dtype=np.int64)
    pos = np.arange(n, dtype=np.int64) if is_ref is None else np.flatnonzero(is_ref)
    if len(pos) < 2:
        return nxt
    # each event's content, with references ranked before releases at one index: ties keep index order
    order = np.lexsort((np.arange(n), ids))
    refs = np.zeros(n, dtype=bool)
    refs[pos] = True
    s, r = ids[order], refs[order]
    # for each event in content order, the next reference of that content after it
    idx = np.where(r, np.arange(n), n)  # a reference's own slot, else past the end
    nref = np.minimum.accumulate(idx[::-1])[::-1]  # first reference at or after each slot
    after = np.append(nref[1:], n)  # first reference strictly after
    ok = (after < n)
    ok[ok] = s[after[ok]] == s[ok]  # of the same content
    nxt[order[ok]] = order[after[ok]]
    return nxt


def belady_min(ids: np.ndarray, capacity: int, is_release: np.ndarray | None = None) -> MinResult:
    """The fewest misses of a cache of ``capacity`` contents that caches every miss and never
    drops a pinned content, on the events ``ids`` (``is_release``: which are releases; default
    none, the classic problem without pins).

    On a miss with the cache full, the unpinned resident content whose next reference is
    farthest (never, first; among those, the one referenced last) leaves. Each unpinned
    resident content's key is the index of its next reference (unique), kept in a max-heap
    with lazy deletion; a content enters the heap when its last pin is released.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n = len(ids)
    if n == 0:
        return MinResult(0, 0, 0, 0)
    if int(ids.min()) < 0 or int(ids.max()) >= 1 << _ID_BITS:
        raise ValueError(f"content ids must lie in [0, 2**{_ID_BITS})")
    rel = np.zeros(n, dtype=bool) if is_release is None else np.asarray(is_release, dtype=bool)
    pinning = is_release is not None
    nxt = next_references(ids, ~rel if pinning else None)
    key_of: dict[int, int] = {}  # resident content -> key of its next reference
    pins: dict[int, int] = {}  # pinned content -> holds not yet released
    heap: list[int] = []  # -(key << _ID_BITS | content), unpinned contents (and stale entries)
    push, pop = heapq.heappush, heapq.heappop
    misses = 0
    shift = _ID_BITS
    mask = (1 << shift) - 1
    limit = 4 * capacity + _CHUNK  # compact the heap past this many entries
    for lo in range(0, n, _CHUNK):
        hs, ks, rs = ids[lo : lo + _CHUNK].tolist(), nxt[lo : lo + _CHUNK].tolist(), rel[lo : lo + _CHUNK].tolist()
        for h, k, r in zip(hs, ks, rs):
            if r:  # a release
                left = pins[h] - 1
                if left:
                    pins[h] = left
                else:
                    del pins[h]
                    push(heap, -(key_of[h] << shift | h))
                continue
            if h not in key_of:
                misses += 1
                if len(key_of) >= capacity:
                    while True:
                        if not heap:
                            raise ValueError(f"more than {capacity} contents pinned at once (event {lo})")
                        e = -pop(heap)
                        v = e & mask
                        if key_of.get(v) == e >> shift and v not in pins:
                            del key_of[v]
                            break
            key_of[h] = k
            if pinning:
                pins[h] = pins.get(h, 0) + 1
            else:
                push(heap, -(k << shift | h))
        if len(heap) > limit:  # drop the stale entries
            heap = [-(k << shift | h) for h, k in key_of.items() if h not in pins]
            heapq.heapify(heap)
    refs = ids[~rel]
    distinct = len(np.unique(refs))
    return MinResult(len(refs), distinct, misses, max(0, misses - capacity))


def bound_summary(stream: ReferenceStream, kv_blocks: int, evicted_blocks: int) -> dict:
    """The summary fields of a run's bound (``cwsim.runner.simulate`` with ``eviction_bound``)."""
    ids, is_release = stream.events()
    res = belady_min(ids, kv_blocks - 1, is_release)
    return {
        "bound_evicted_blocks": res.evictions,
        "bound_remisses": res.remisses,
        "stream_references": res.references,
        "stream_distinct_blocks": res.distinct,
        "stream_remisses": stream.misses - res.distinct,
        "evictions_vs_bound": evicted_blocks / res.evictions if res.evictions else None,
    }
