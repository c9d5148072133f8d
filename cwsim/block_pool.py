"""The GPU KV block pool, faithful to vLLM v1 prefix caching.

Mirrors ``vllm/v1/core/block_pool.py``: a fixed number of blocks of
``block_size`` tokens, block 0 reserved as the null block, chained block hashes,
reference counts, a hash -> block map for prefix lookup, and a free queue from
which allocation pops and evicts lazily.

The policy is one invariant over one data structure:

    Every block except the null block is either *in use* (``ref > 0``) or
    *free* (``ref == 0``). The free blocks, and only they, form the free queue,
    ordered by the key ``(tier, score, seq, position)``:

    - tier 0 holds blocks without a hash. vLLM prepends them, so a newer
      release comes first (``seq`` counts down) and they are reused before any
      cached block is evicted. The blocks never used yet start here in id order.
    - tier 1 holds cached blocks (with a hash). ``score`` is what the eviction
      policy returned when they were freed (lower = evicted sooner); ``seq``
      counts up with each release, so equal scores are evicted LRU; within a
      release the given order is kept (vLLM frees a request's blocks tail
      first, so its last block is evicted first).

    Allocation pops the front of the queue; popping a block that has a hash
    evicts it (the hash leaves the cache). A block in use is never in the
    queue, so it is never evicted; blocks are conserved (in use + free ==
    num_blocks - 1) and reference counts never go negative.

With the default policy (score 0 for every block) this is exactly vLLM's LRU
order, which ``tests/test_block_pool_vllm.py`` pins with vLLM's own cases.

A cached block is *listed* (in the hash map, where lookups find it) or
*unlisted* (``cache_unlisted_blocks``): content that no lookup will ever ask for
(a single-call session's own blocks), which has a hash, sits in tier 1 and is
evicted and counted like any cached block, but costs no hash-map work. Only its
own request's re-admission after a preemption can hit it, through the lookup's
hint (``find_longest_prefix``), as a listed block's would be.

The queue is its own class (``cwsim.free_queue.FreeBlockQueue``, vLLM's
queue surface over block ids); the pool keeps the blocks' reference counts,
hashes and the hash map, as vLLM's ``BlockPool`` does. Only evictions
(hash-map updates) are per block; touching or freeing a whole 20k-token prompt
is a handful of vectorised numpy operations, and allocating or caching a few
blocks (up to ``_SMALL``, the decode steps) takes scalar steps, where numpy's
per-call overhead would cost more than the work.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

NULL_BLOCK = 0
_consume = deque(maxlen=0).extend  # run an iterator for its side effects
_EMPTY = np.empty(0, dtype=np.int64)
from cwsim import native
from cwsim.free_queue import SMALL as _SMALL, FreeBlockQueue
# a numpy integer: convert before keeping a count (counters stay Python ints)
from cwsim.free_queue import count_nonzero as _cnz


@dataclass(slots=True)
class FreedBlocks:
    """What an eviction policy sees when cached blocks become free.

    ``blocks`` and ``hashes`` are in queue order (for a finished request: tail
    first); ``positions`` are the blocks' indices in the request's block table.
    ``request`` is the simulator's request (or None outside the engine).
    ``seq`` numbers the release: scored with one scalar, its blocks form one
    run with this seq, and ``BlockPool.in_release(blocks, seq)`` later tells
    which of them still sit there (free, not reused, not evicted).
    """

    blocks: np.ndarray
    hashes: np.ndarray
    positions: np.ndarray
    request: object
    now: float
    reason: str
    seq: int = -1


class PyPoolCore:
    """The operations on the block pool's allocation path (``BlockPool``'s base; ``BlockPool.__init__``
    makes the state they work on).

    The Python specification of ``cwsim._block_pool.PoolCore`` (the same, with its per-block loops
    compiled), which ``BlockPool`` extends where the build made it (``cwsim.native``). The
    invariant and the surface are ``BlockPool``'s.
    """

    # ----------------------------------------------------------------- queue
    @property
    def num_free(self) -> int:
        """Free blocks (the queue's length)."""
        return self.queue.num_free_blocks

    def _leave_queue(self, blocks: np.ndarray) -> None:
        """Take free cached blocks out of the queue (they become in use)."""
        self.queue.remove(blocks)
        self.num_free_hashed -= len(blocks)  # only cached blocks can be hit

    def _deref(self, blocks: np.ndarray) -> np.ndarray:
        """Drop one reference from each of ``blocks`` (distinct ids); their new ref counts."""
        r = self.ref[blocks]
        if r.min() <= 0:
            raise AssertionError("freeing a block whose ref count is already 0")
        r -= 1
        self.ref[blocks] = r
        return r

    def _release(self, ordered: np.ndarray, tail_first: bool, request, now: float, reason: str) -> None:
        """Drop one reference from each of ``ordered``; the blocks that become free join the queue.

        ``tail_first``: ``ordered`` is a block table reversed (its positions count down), else
        positions count up from 0.
        """
        n = len(ordered)
        if n == 0:
            return
        refs = self._deref(ordered)
        hashed = self.has_hash[ordered]
        if self.references is not None:
            self.references.release(self.hash_of[ordered[hashed]])
        if self.on_release is not None:
            self.on_release(ordered, refs, hashed, request)
        freed_mask = refs == 0
        n_freed = _cnz(freed_mask)
        if n_freed == 0:
            return
        all_freed = n_freed == n
        if all_freed:
            freed = ordered.copy()  # a run's own array
        else:
            freed = ordered[freed_mask]
            hashed = hashed[freed_mask]
        n_h = int(_cnz(hashed))
        if n_h < n_freed:
            self.queue.prepend_n(freed[~hashed])
            if n_h == 0:
                return
            freed_h = freed[hashed]
        else:
            freed_h = freed
        self.num_free_hashed += n_h
        if self.score_fn is None:  # score 0 for every block: one run
            self.queue.append_n(freed_h)
            return
        positions = np.arange(n - 1, -1, -1) if tail_first else np.arange(n)
        pos = positions if all_freed else positions[freed_mask]
        if n_h < n_freed:
            pos = pos[hashed]
        score = self.score_fn(FreedBlocks(freed_h, self.hash_of[freed_h], pos, request, now, reason,
                                          self.queue.next_seq))
        self.queue.append_n(freed_h, score)

    def free_block_table(self, table: np.ndarray, request=None, now: float = 0.0, reason: str = "finish") -> None:
        """Free a request's block table the way vLLM does: tail first."""
        self._release(table[::-1], True, request, now, reason)

    def find_longest_prefix(self, hashes: Sequence[int], max_blocks: int, hint: tuple | None = None) -> np.ndarray:
        """Block ids of the longest prefix of ``hashes[:max_blocks]`` that is cached.

        ``hint = (blocks, gens)``: blocks that held ``hashes[:len(blocks)]``
        when their ``gen`` was ``gens`` (the session's previous call). Those
        still canonical and not evicted since are the lookup's answer without
        a dict lookup each; the rest is looked up hash by hash.
        """
        start = 0
        found = _EMPTY
        if hint is not None:
            blocks, gens = hint
            n = min(len(blocks), max_blocks)
            if n:
                cand = blocks[:n]
                found_by_lookup = self.canonical[cand]
                if self.num_unlisted:  # an unlisted block a lookup would find, were it listed
                    found_by_lookup |= self.unlisted[cand]
                ok = found_by_lookup & (self.gen[cand] == gens[:n])
                start = n if _cnz(ok) == n else int(ok.argmin())
                found = cand[:start]
        if start >= max_blocks:
            return found
        get = self.cached.get
        hits: list[int] = []
        while start + len(hits) < max_blocks:  # in chunks, stopping at the first miss
            lo = start + len(hits)
            chunk = list(map(get, hashes[lo : min(max_blocks, lo + 64)]))
            if None in chunk:
                hits += chunk[: chunk.index(None)]
                break
            hits += chunk
        if not hits:
            return found
        rest = np.array(hits, dtype=np.int64)
        return rest if start == 0 else np.concatenate([found, rest])

    def touch(self, blocks: np.ndarray) -> None:
        """Add one reference to each block (a prefix hit); free ones leave the queue."""
        if len(blocks) == 0:
            return
        r = self.ref[blocks]
        free = r == 0
        self._touch(blocks, r, free, _cnz(free))

    def _touch(self, blocks: np.ndarray, r: np.ndarray, free: np.ndarray, n_free: int) -> None:
        """``touch`` given ``r = ref[blocks]``, ``free = r == 0`` and its count (consumed)."""
        if n_free:
            self._leave_queue(blocks if n_free == len(blocks) else blocks[free])
        r += 1
        self.ref[blocks] = r
        if self.references is not None:
            self.references.touch(self.hash_of[blocks[self.has_hash[blocks]]])

    def get_new_blocks(self, n: int) -> np.ndarray:
        """Pop ``n`` blocks from the front of the free queue, evicting cached ones."""
        if n <= 0:
            return np.empty(0, dtype=np.int64)
        if self.growable:
            self._ensure_unhashed_free(n)
        if n > self.num_free:
            raise ValueError(f"cannot get {n} free blocks from the pool ({self.num_free} free)")
        if n > _SMALL:
            blocks = self.queue.popleft_n(n)
        else:
            got = self.queue.popleft_small(n)
        in_use = self.num_blocks - 1 - self.num_free
        if in_use > self.peak_in_use:
            self.peak_in_use = in_use
        if n <= _SMALL:  # scalar steps
            ref, has_hash = self.ref, self.has_hash
            hashed: list[int] = []
            for b in got:
                ref[b] = 1
                if has_hash[b]:
                    hashed.append(b)
            blocks = np.array(got, dtype=np.int64)
            if hashed:
                if self._dups:
                    self._evict(np.array(hashed, dtype=np.int64))
                else:  # _evict for canonical blocks
                    hash_of, canonical, gen, cached = self.hash_of, self.canonical, self.gen, self.cached
                    unlisted = self.unlisted if self.num_unlisted else None
                    hashes = []
                    for b in hashed:
                        if unlisted is not None and unlisted[b]:
                            unlisted[b] = False
                            self.num_unlisted -= 1
                        else:
                            h = hash_of.item(b)
                            del cached[h]
                            hashes.append(h)
                        has_hash[b] = False
                        canonical[b] = False
                        gen[b] += 1
                    self.num_free_hashed -= len(hashed)
                    self.num_evicted += len(hashed)
                    if hashes and self.on_evict is not None:
                        self.on_evict(hashes)
                    if self.on_unhash is not None:
                        self.on_unhash(hashed)
            return blocks
        self.ref[blocks] = 1
        hashed = self.has_hash[blocks]
        k = _cnz(hashed)
        if k:
            self._evict(blocks if k == n else blocks[hashed])
        return blocks

    def _evict(self, blocks: np.ndarray) -> None:
        hashes = self._unhash(blocks)
        self.num_free_hashed -= len(blocks)
        self.num_evicted += len(blocks)
        if hashes and self.on_evict is not None:
            self.on_evict(hashes)

    def _unhash(self, blocks: np.ndarray) -> list[int]:
        """Take the blocks' hashes out of the cache (the hash map, duplicates, flags); bump their ``gen``.
        Returns the hashes of the listed ones (those the hash map held)."""
        cached, dups = self.cached, self._dups
        canonical = self.canonical
        listed = blocks
        if self.num_unlisted:
            out = self.unlisted[blocks]
            k = int(_cnz(out))
            if k:
                self.unlisted[blocks[out]] = False
                self.num_unlisted -= k
                listed = blocks[~out] if k < len(blocks) else _EMPTY
        listed_hashes = self.hash_of[listed].tolist()
        if not dups:  # every listed block is the canonical one for its hash
            _consume(map(cached.__delitem__, listed_hashes))
            hashes_iter = ()
        else:
            hashes_iter = zip(listed.tolist(), listed_hashes)
        for b, h in hashes_iter:
            if cached.get(h) == b:
                others = dups.get(h)
                if others:
                    cached[h] = nb = others.pop(0)
                    canonical[nb] = True
                    if not others:
                        del dups[h]
                else:
                    del cached[h]
            else:
                others = dups[h]
                others.remove(b)
                if not others:
                    del dups[h]
        self.has_hash[blocks] = False
        self.canonical[blocks] = False
        self.gen[blocks] += 1
        if self.on_unhash is not None:
            self.on_unhash(blocks)
        return listed_hashes

    def cache_full_blocks(self, blocks: np.ndarray, hashes: Sequence[int]) -> None:
        """Give newly filled blocks their hashes so later requests can hit them.

        Like vLLM, an identical block already cached is not de-duplicated: the
        first one stays the one that lookups return.
        """
        n = len(blocks)
        if n == 0:
            return
        cached, canonical = self.cached, self.canonical
        if self.references is not None:
            self.references.insert(hashes, cached)
        if n <= _SMALL:  # the same in scalar steps
            has_hash, hash_of = self.has_hash, self.hash_of
            bl = blocks.tolist()
            for b in bl:
                if has_hash[b]:
                    raise AssertionError("caching a block that already has a hash")
            if cached.keys().isdisjoint(hashes) and self._add_new(hashes, bl):
                for b, h in zip(bl, hashes):
                    has_hash[b] = True
                    hash_of[b] = h
                    canonical[b] = True
                return
            for b, h in zip(bl, hashes):
                has_hash[b] = True
                hash_of[b] = h
            blocks = bl
        else:
            if _cnz(self.has_hash[blocks]):
                raise AssertionError("caching a block that already has a hash")
            self.has_hash[blocks] = True
            self.hash_of[blocks] = hashes
            bl = blocks.tolist()
            if cached.keys().isdisjoint(hashes) and self._add_new(hashes, bl):  # no duplicates: all canonical
                canonical[blocks] = True
                return
            blocks = bl
        for b, h in zip(blocks, hashes):
            if h in cached:
                self._dups.setdefault(h, []).append(b)
            else:
                cached[h] = b
                canonical[b] = True

    def _add_new(self, hashes: Sequence[int], blocks: list[int]) -> bool:
        """Map hashes none of which is cached to their blocks; False (nothing added) if one repeats."""
        cached = self.cached
        before = len(cached)
        cached.update(zip(hashes, blocks))
        if len(cached) - before == len(blocks):
            return True
        for h in hashes:  # a hash given twice: the first block must win, as one by one
            cached.pop(h, None)
        return False

    def cache_unlisted_blocks(self, blocks: np.ndarray, hashes: Sequence[int]) -> None:
        """Give newly filled blocks hashes that no lookup will ever ask for (a single-call session's own
        blocks): cached and evicted as ``cache_full_blocks`` would (tier 1, counted), without the hash
        map. The hashes must be new (no cached block has one) and distinct; not with a reference
        stream (``references``), which follows the hash map."""
        n = len(blocks)
        if n == 0:
            return
        if self.references is not None:
            raise AssertionError("unlisted blocks with a reference stream (the eviction bound lists every block)")
        if n <= _SMALL:  # the same in scalar steps (a decode step's blocks)
            has_hash, hash_of, unlisted = self.has_hash, self.hash_of, self.unlisted
            for b, h in zip(blocks.tolist(), hashes):
                if has_hash[b]:
                    raise AssertionError("caching a block that already has a hash")
                has_hash[b] = True
                hash_of[b] = h
                unlisted[b] = True
        else:
            if _cnz(self.has_hash[blocks]):
                raise AssertionError("caching a block that already has a hash")
            self.has_hash[blocks] = True
            self.hash_of[blocks] = hashes
            self.unlisted[blocks] = True
        self.num_unlisted += n

    def _bind(self) -> None:
        """After the state arrays are made or grown (the compiled core takes typed views of them here)."""


_compiled = native.load("cwsim._block_pool")
#: whether ``PoolCore`` is the compiled class (``cwsim.native``)
NATIVE = _compiled is not None
#: ``BlockPool``'s base: the compiled core where the build made it, else its Python specification
PoolCore = _compiled.PoolCore if NATIVE else PyPoolCore


class BlockPool(PoolCore):
    """A pool of ``num_blocks`` KV blocks (block 0 is the null block).

    ``score_fn(freed) -> float | ndarray`` is the eviction policy's scoring
    method; ``None`` scores every block 0 (pure LRU, vLLM's order).
    ``growable=True`` gives an unbounded pool: when no block without a hash is
    free, allocation adds blocks instead of evicting (the ``infinite`` bound).
    ``on_evict(hashes)`` is called with the hashes of each batch of evicted *listed* blocks (an
    unlisted block's hash is never looked up again: nothing can miss it): a list of ints, or an
    int64 array where the compiled core runs.
    """

    def __init__(
        self,
        num_blocks: int,
        score_fn: Callable[[FreedBlocks], float | np.ndarray] | None = None,
        *,
        growable: bool = False,
        on_evict: Callable[[list[int]], None] | None = None,
    ):
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.score_fn = score_fn
        self.growable = growable
        self.on_evict = on_evict
        #: ``on_release(blocks, refs_after, has_hash, request)``: called with every release (before the freed
        #: blocks are scored); the arrays are per block of ``blocks``
        self.on_release: Callable[[np.ndarray, np.ndarray, np.ndarray, object], None] | None = None
        #: ``on_unhash(blocks)``: called with the ids (an array or a list) of each batch of blocks that lose
        #: their hash (evicted, or freed uncached): their contents' cached lives end
        self.on_unhash: Callable[[np.ndarray | list[int]], None] | None = None
        #: a ``cwsim.eviction_bound.ReferenceStream`` that records the references to cached contents
        #: (``touch``: a hit or a copy's hold; ``insert``: a block given its hash; ``release``: a
        #: reference to a hashed block dropped), or None
        self.references = None
        self.ref = np.zeros(num_blocks, dtype=np.int32)
        self.has_hash = np.zeros(num_blocks, dtype=bool)
        self.hash_of = np.zeros(num_blocks, dtype=np.int64)
        # canonical[b]: b is the block that lookups of its hash return;
        # gen[b]: bumped each time b is evicted (so a remembered block can be re-checked)
        self.canonical = np.zeros(num_blocks, dtype=bool)
        self.gen = np.zeros(num_blocks, dtype=np.int64)
        #: unlisted[b]: b has a hash that is not in the hash map (``cache_unlisted_blocks``)
        self.unlisted = np.zeros(num_blocks, dtype=bool)
        self.num_unlisted = 0
        self.cached: dict[int, int] = {}
        self._dups: dict[int, list[int]] = {}
        self.num_free_hashed = 0
        self.num_evicted = 0
        self.peak_in_use = 0  # most blocks in use at once (null block excluded)
        #: the free blocks in reuse order; every block but the null block starts free, in id order
        self.queue = FreeBlockQueue(num_blocks, np.arange(1, num_blocks, dtype=np.int64))
        self.ref[NULL_BLOCK] = 1  # never freed, never in the queue
        self._bind()

    # ------------------------------------------------------------ public API
    def in_release(self, blocks: np.ndarray, seq: int) -> np.ndarray:
        """Which of ``blocks`` are still free in the run(s) keyed with release ``seq``."""
        return self.queue.in_release(blocks, seq)

    def is_free(self, blocks: np.ndarray) -> np.ndarray:
        """Per block: is it in the free queue (``ref == 0``)."""
        return self.queue.is_free(blocks)

    def get_num_free_blocks(self) -> int:
        return self.num_free

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        """Share of usable blocks in use (vLLM's ``kv_cache_usage``)."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def get_cached_block(self, block_hash: int) -> int | None:
        return self.cached.get(block_hash)

    def free_blocks(self, ordered_blocks, request=None, now: float = 0.0, reason: str = "free") -> None:
        """Drop one reference from each block, given in eviction order (first = evicted first)."""
        ordered = np.asarray(ordered_blocks, dtype=np.int64)
        self._release(ordered, False, request, now, reason)

    def release_uncached(self, blocks: np.ndarray) -> int:
        """Drop one reference from each block; those that become free lose their hash (uncached).

        For blocks whose content lives on elsewhere (copied to the CPU tier,
        ``cwsim.cpu_tier``): they join the front of the queue like any block
        freed without a hash (tier 0, this release first, in the given order).
        Not evictions: ``num_evicted`` and ``on_evict`` are untouched. Blocks
        still referenced stay cached. Returns how many blocks were freed.
        Each block may be given once.
        """
        blocks = np.asarray(blocks, dtype=np.int64)
        if len(blocks) == 0:
            return 0
        if self.references is not None:
            self.references.release(self.hash_of[blocks[self.has_hash[blocks]]])
        freed = blocks[self._deref(blocks) == 0]
        if len(freed) == 0:
            return 0
        hashed = freed[self.has_hash[freed]]
        if len(hashed):
            self._unhash(hashed)
        self.queue.prepend_n(freed.copy())
        return len(freed)

    def drop_unreachable(self, hashes) -> int:
        """An unbounded pool's cleanup: free cached blocks of contents that no request will ask for
        again (a finished session's own blocks) lose their hash and join the front of the queue
        (tier 0), so the pool reuses them instead of growing for ever.

        Not evictions (``num_evicted`` and ``on_evict`` are untouched), and nothing a run measures
        changes: those contents could never hit again, and a growable pool allocates from tier 0
        only. Blocks still in use keep their hash. Returns how many blocks were dropped."""
        cached, dups = self.cached, self._dups
        found = [b for h in hashes if (b := cached.get(h)) is not None]
        if dups:
            found += [b for h in hashes for b in dups.get(h, ())]
        if not found:
            return 0
        blocks = np.array(found, dtype=np.int64)
        blocks = blocks[self.ref[blocks] == 0]
        if len(blocks):
            self._leave_queue(blocks)
            self._unhash(blocks)
            self.queue.prepend_n(blocks)
        return len(blocks)

    def requeue(self, blocks: np.ndarray, score: float, seq: int) -> None:
        """Move free cached blocks to the queue key ``(1, score, seq)``, keeping their given order.

        For a policy whose blocks change rank after release (a pin that
        expires): given the release's ``seq``, they rejoin the queue where that
        release would have been with ``score``. Blocks no longer free (in use,
        so out of the queue) or without a hash (evicted since) are skipped;
        ids given twice are moved once.
        """
        blocks = np.asarray(blocks, dtype=np.int64)
        if len(blocks) == 0:
            return
        self.queue.requeue(blocks[self.has_hash[blocks]], score, seq)  # they stay free and cached

    def _ensure_unhashed_free(self, n: int) -> None:
        """Growable pools add blocks rather than evict a cached one."""
        short = n - (self.num_free - self.num_free_hashed)
        if short <= 0:
            return
        old = self.num_blocks
        new = max(2 * old, old + short)
        grow = new - old
        self.ref = np.concatenate([self.ref, np.zeros(grow, dtype=np.int32)])
        self.has_hash = np.concatenate([self.has_hash, np.zeros(grow, dtype=bool)])
        self.hash_of = np.concatenate([self.hash_of, np.zeros(grow, dtype=np.int64)])
        self.queue.grow(new)
        self.canonical = np.concatenate([self.canonical, np.zeros(grow, dtype=bool)])
        self.gen = np.concatenate([self.gen, np.zeros(grow, dtype=np.int64)])
        self.unlisted = np.concatenate([self.unlisted, np.zeros(grow, dtype=bool)])
        self._bind()
        self.num_blocks = new
        # new blocks are unhashed and go to the very front, in id order
        self.queue.prepend_n(np.arange(old, new, dtype=np.int64))

    # ------------------------------------------------------------- inspection
    def free_block_ids(self) -> list[int]:
        """All free blocks in queue order (front = next to be allocated)."""
        return self.queue.get_all_free_blocks()

    def check_invariants(self) -> None:
        """O(num_blocks) consistency check, for tests."""
        ref = self.ref
        self.queue.check_invariants()
        assert ref[NULL_BLOCK] >= 1 and not self.queue.is_free(np.array([NULL_BLOCK]))[0], "null block must never be free"
        assert (ref >= 0).all(), "negative ref count"
        order = self.free_block_ids()
        assert len(order) == len(set(order)) == self.num_free, "free queue holds a block twice or count drifted"
        free_mask = np.zeros(self.num_blocks, dtype=bool)
        free_mask[order] = True
        assert ((ref == 0) == free_mask)[1:].all(), "free queue must hold exactly the blocks with ref 0"
        for h, b in self.cached.items():
            assert self.has_hash[b] and self.hash_of[b] == h, "hash map points at a block without that hash"
        assert int(self.canonical.sum()) == len(self.cached), "canonical flags disagree with the hash map"
        n_dups = sum(len(v) for v in self._dups.values())
        assert int(self.unlisted.sum()) == self.num_unlisted, "unlisted-block count drifted"
        assert not (self.unlisted & ~self.has_hash).any(), "an unlisted block without a hash"
        assert not (self.unlisted & self.canonical).any(), "an unlisted block in the hash map"
        assert int(self.has_hash.sum()) == len(self.cached) + n_dups + self.num_unlisted, \
            "hashed blocks missing from the hash map"
        assert int(self.has_hash[free_mask].sum()) == self.num_free_hashed, "free cached-block count drifted"
