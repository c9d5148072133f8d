"""Property-based tests of ``cwsim.block_pool.BlockPool`` against a simple reference.

The reference model below implements vLLM v1 prefix-caching semantics directly
on plain Python containers (no runs, no heap, no lazy deletion):

- ``free_queue``: list of free block ids, front = next allocated. Blocks without
  a hash (tier 0) always precede cached blocks (tier 1).
- ``ref``, ``block_hash``: per-block reference count and hash.
- ``hash_to_blocks``: hash -> insertion-ordered list of blocks carrying it; the
  first one is what a lookup returns.

Random sequences of operations (allocate a request, grow one block at a time,
cache a prefix of it with fresh or reused hashes, hit a cached chain with or
without a lookup hint, free a request tail first or in an arbitrary order,
over-allocate, and compound "session"/"agent" calls) are applied to both, and
after every operation the whole observable state is compared: free queue order,
counts, ``check_invariants``, ref counts, the hash map, evictions (count and
``on_evict`` hashes) and what the score function was shown.
"""

from __future__ import annotations

import bisect

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cwsim.block_pool import NULL_BLOCK, BlockPool, FreedBlocks

# --------------------------------------------------------------------------- scoring policies

SCORE_MODES = (None, "hash", "release")


def hash_score(h: int) -> float:
    """Deterministic pseudo-random per-block score (ties are frequent on purpose)."""
    return float(h % 5)


def release_score(now: float) -> float:
    """One score for a whole release, varying between releases."""
    return float((int(now) * 7) % 3)


def make_score_fn(mode, calls: list):
    if mode is None:
        return None

    if mode == "hash":
        def fn(freed: FreedBlocks):
            calls.append(freed)
            return np.array([hash_score(int(h)) for h in freed.hashes], dtype=np.float64)
    elif mode == "release":
        def fn(freed: FreedBlocks):
            calls.append(freed)
            return release_score(freed.now)
    else:  # pragma: no cover
        raise ValueError(mode)
    return fn


# --------------------------------------------------------------------------- reference model


class RefPool:
    """vLLM v1 block pool semantics, written as plainly as possible."""

    def __init__(self, num_blocks: int, mode, growable: bool):
        self.num_blocks = num_blocks
        self.mode = mode
        self.growable = growable
        self.free_queue: list[int] = list(range(1, num_blocks))
        self.ref: dict[int, int] = {b: 0 for b in range(num_blocks)}
        self.ref[NULL_BLOCK] = 1
        self.block_hash: dict[int, int] = {}
        self.hash_to_blocks: dict[int, list[int]] = {}
        self.key: dict[int, tuple] = {}  # (score, seq, position) of free cached blocks
        self.seq = 0
        self.evicted = 0
        self.evicted_hashes: list[int] = []

    # -- helpers
    def num_free_unhashed(self) -> int:
        n = 0
        for b in self.free_queue:
            if b in self.block_hash:
                break
            n += 1
        return n

    def lookup(self, h: int) -> int | None:
        lst = self.hash_to_blocks.get(h)
        return lst[0] if lst else None

    # -- operations
    def find_longest_prefix(self, hashes, max_blocks) -> list[int]:
        hits = []
        for h in hashes[:max_blocks]:
            b = self.lookup(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def get_new_blocks(self, n: int) -> list[int]:
        if self.growable:
            unhashed = self.num_free_unhashed()
            if n > unhashed:
                short = n - unhashed
                old = self.num_blocks
                new = max(2 * old, old + short)
                for b in range(old, new):
                    self.ref[b] = 0
                self.free_queue[0:0] = list(range(old, new))
                self.num_blocks = new
        if n > len(self.free_queue):
            raise ValueError("not enough free blocks")
        out = self.free_queue[:n]
        del self.free_queue[:n]
        for b in out:
            if b in self.block_hash:
                h = self.block_hash.pop(b)
                self.key.pop(b)
                lst = self.hash_to_blocks[h]
                lst.remove(b)
                if not lst:
                    del self.hash_to_blocks[h]
                self.evicted += 1
                self.evicted_hashes.append(h)
            assert self.ref[b] == 0
            self.ref[b] = 1
        return out

    def touch(self, blocks) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                self.free_queue.remove(b)
                self.key.pop(b, None)
            self.ref[b] += 1

    def cache_full_blocks(self, blocks, hashes) -> None:
        for b, h in zip(blocks, hashes):
            assert b not in self.block_hash
            self.block_hash[b] = h
            self.hash_to_blocks.setdefault(h, []).append(b)

    def free(self, ordered, now: float):
        """Release ``ordered`` (first = evicted first). Returns the freed cached blocks."""
        released = []
        for b in ordered:
            assert self.ref[b] > 0
            self.ref[b] -= 1
            if self.ref[b] == 0:
                released.append(b)
        unhashed = [b for b in released if b not in self.block_hash]
        hashed = [b for b in released if b in self.block_hash]
        # blocks without a hash: prepended as a group, given order kept
        self.free_queue[0:0] = unhashed
        if hashed:
            self.seq += 1
            lo = self.num_free_unhashed()  # tier 1 starts here
            for i, b in enumerate(hashed):
                if self.mode is None:
                    score = 0.0
                elif self.mode == "hash":
                    score = hash_score(self.block_hash[b])
                else:
                    score = release_score(now)
                k = (score, self.seq, i)
                self.key[b] = k
                bisect.insort(self.free_queue, b, lo=lo, key=self.key.__getitem__)
        return hashed


# --------------------------------------------------------------------------- state comparison


def assert_same(pool: BlockPool, ref: RefPool, evicted_log: list[int]) -> None:
    assert pool.free_block_ids() == ref.free_queue
    assert pool.num_free == len(ref.free_queue) == pool.get_num_free_blocks()
    pool.check_invariants()
    assert pool.num_blocks == ref.num_blocks == len(ref.ref)
    assert pool.ref.tolist() == list(ref.ref.values())  # ref.ref holds blocks 0..N-1 in order
    # hash state: which blocks carry which hash, and what each lookup returns
    hashed = sorted(ref.block_hash)
    assert np.flatnonzero(pool.has_hash).tolist() == hashed
    assert pool.hash_of[hashed].tolist() == [ref.block_hash[b] for b in hashed]
    expected = {h: lst[0] for h, lst in ref.hash_to_blocks.items()}
    assert pool.cached == expected
    for h in list(expected)[:8]:
        assert pool.get_cached_block(h) == expected[h]
    assert pool.num_free_hashed == len(ref.free_queue) - ref.num_free_unhashed()
    assert pool.num_evicted == ref.evicted == len(evicted_log)
    assert evicted_log[-64:] == ref.evicted_hashes[-64:]


# --------------------------------------------------------------------------- driver

# An op is (kind, a, b, c, d): small ints interpreted relative to the current state,
# so that every generated sequence is valid and shrinks well.
OP_KINDS = ("alloc", "extend", "decode", "cache", "hit", "finish", "free_any", "overalloc", "session", "agent")
# weights: caching, hits and releases are what make the queue interesting
_OP_MIX = ("alloc",) * 3 + ("extend",) + ("decode",) * 2 + ("cache",) * 3 + ("hit",) * 3 + ("finish",) * 2 + ("free_any",) + ("overalloc",) + ("session",) * 2 + ("agent",)


def op_strategy(max_size: int):
    return st.tuples(
        st.sampled_from(_OP_MIX),
        st.integers(0, max_size),
        st.integers(0, max_size),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    )


class Driver:
    def __init__(self, num_blocks: int, mode, growable: bool = False):
        self.calls: list[FreedBlocks] = []
        self.evicted_log: list[int] = []
        self.pool = BlockPool(
            num_blocks, make_score_fn(mode, self.calls), growable=growable, on_evict=self.evicted_log.extend
        )
        self.ref = RefPool(num_blocks, mode, growable)
        self.mode = mode
        self.growable = growable
        self.requests: dict[int, dict] = {}  # rid -> {"blocks": [...], "hashes": [...]}
        self.chains: list[dict] = []  # {"hashes": chain some request cached, "hint": (blocks, gens)}
        self.all_hashes: list[int] = []
        self.next_hash = 1000
        self.next_rid = 0
        self.now = 0
        self.max_block_seen = 0

    # -- helpers
    def _new_request(self, blocks: list[int], hashes: list[int]) -> None:
        self.requests[self.next_rid] = {"blocks": list(blocks), "hashes": list(hashes)}
        self.next_rid += 1

    def _pick_request(self, x: int):
        if not self.requests:
            return None
        rids = sorted(self.requests)
        return rids[x % len(rids)]

    def _alloc(self, n: int) -> list[int]:
        cached_before = dict(self.ref.block_hash) if self.growable else None
        got = self.pool.get_new_blocks(n).tolist()
        exp = self.ref.get_new_blocks(n)
        assert got == exp
        if self.growable:
            # an unbounded pool never evicts a cached block
            assert self.pool.num_evicted == 0
            assert self.ref.block_hash == cached_before
        self.max_block_seen = max([self.max_block_seen, *got])
        return got

    def _check_release(self, n_calls_before: int, expected_hashed: list[int], positions: dict[int, int]):
        new_calls = self.calls[n_calls_before:]
        if self.mode is None:
            assert not new_calls
            return
        if not expected_hashed:
            assert not new_calls
            return
        assert len(new_calls) == 1
        fb = new_calls[0]
        assert fb.blocks.tolist() == expected_hashed
        assert fb.hashes.tolist() == [self.ref.block_hash[b] for b in expected_hashed]
        assert fb.positions.tolist() == [positions[b] for b in expected_hashed]
        assert fb.now == self.now

    # -- ops
    def _grow_last(self, b: int, hash_seed: int, d: int) -> int:
        """Extend the newest request by ``b`` blocks and cache its uncached ones; its index."""
        last = len(self.requests) - 1
        self.apply(("extend", b, 0, last, 0))
        rid = sorted(self.requests)[last]
        room = len(self.requests[rid]["blocks"]) - len(self.requests[rid]["hashes"])
        self.apply(("cache", room, hash_seed, last, d))
        return last

    def apply(self, op) -> None:
        kind, a, b, c, d = op
        self.now += 1
        free = self.pool.num_free
        if kind == "alloc":
            n = a
            if not self.growable:
                n = a % (free + 1)
            self._new_request(self._alloc(n), [])
        elif kind == "extend":
            rid = self._pick_request(c)
            if rid is None:
                return
            n = a if self.growable else a % (free + 1)
            self.requests[rid]["blocks"].extend(self._alloc(n))
        elif kind == "decode":
            # a request grows one block at a time (single-block allocations)
            rid = self._pick_request(c)
            if rid is None:
                return
            for _ in range(1 + a % 6):
                if not self.growable and self.pool.num_free == 0:
                    break
                self.requests[rid]["blocks"].extend(self._alloc(1))
                assert_same(self.pool, self.ref, self.evicted_log)
        elif kind == "cache":
            rid = self._pick_request(c)
            if rid is None:
                return
            req = self.requests[rid]
            n_cached = len(req["hashes"])
            room = len(req["blocks"]) - n_cached
            m = a % (room + 1)
            if m == 0:
                return
            rng = np.random.default_rng(d)
            hashes = []
            used = set(req["hashes"])
            # b % 4 == 2: follow another cached chain position by position (the
            # realistic duplicate: two requests computed the same prefix at once)
            twin = self.chains[d % len(self.chains)]["hashes"] if self.chains and b % 4 == 2 else []
            for i in range(m):
                h = None
                pos = n_cached + i
                if pos < len(twin) and twin[pos] not in used:
                    h = twin[pos]
                elif self.all_hashes and b % 2 == 0 and rng.random() < 0.5:  # b odd: fresh hashes only
                    # reuse a hash some other block had (hashes stay distinct within a request)
                    for _try in range(4):
                        cand = self.all_hashes[int(rng.integers(len(self.all_hashes)))]
                        if cand not in used:
                            h = cand
                            break
                if h is None:
                    h = self.next_hash
                    self.next_hash += 1
                    self.all_hashes.append(h)
                used.add(h)
                hashes.append(h)
            blocks = req["blocks"][n_cached : n_cached + m]
            self.pool.cache_full_blocks(np.array(blocks, dtype=np.int64), hashes)
            self.ref.cache_full_blocks(blocks, hashes)
            req["hashes"].extend(hashes)
            hb = np.array(req["blocks"][: len(req["hashes"])], dtype=np.int64)
            # hint = the request's own blocks (possibly duplicates, not the canonical ones)
            self.chains.append({"hashes": list(req["hashes"]), "hint": (hb, self.pool.gen[hb].copy())})
        elif kind == "hit":
            if not self.chains:
                return
            entry = self.chains[c % len(self.chains)]
            chain = entry["hashes"]
            length = a % (len(chain) + 1)
            query = list(chain[:length])
            if d % 3 == 0:  # sometimes end with a hash that is not cached
                query.append(-1 - d)
            max_blocks = len(query) if d % 2 == 0 else b % (len(query) + 1)
            # sometimes pass the hint remembered from the chain's last lookup
            # (the hint's blocks must have held the query's hashes: cut it to the chain part)
            hint = None
            if d % 5 < 3:
                hb, hg = entry["hint"]
                hint = (hb[:length], hg[:length])
            hits = [int(x) for x in self.pool.find_longest_prefix(query, max_blocks, hint)]
            exp = self.ref.find_longest_prefix(query, max_blocks)
            assert hits == exp
            assert [int(x) for x in self.pool.find_longest_prefix(query, max_blocks)] == exp
            if hits:
                hb = np.array(hits, dtype=np.int64)
                entry["hint"] = (hb, self.pool.gen[hb].copy())
            assert len(set(hits)) == len(hits)
            hit_arr = np.array(hits, dtype=np.int64)
            # as allocate_slots: touch the hits first, then pop new blocks
            n_evictable = sum(1 for x in hits if self.ref.ref[x] == 0)
            n_new = b % 4
            if not self.growable and n_new + n_evictable > free:
                n_new = 0
            self.pool.touch(hit_arr)
            self.ref.touch(hits)
            assert_same(self.pool, self.ref, self.evicted_log)
            new = self._alloc(n_new) if n_new else []
            self._new_request(hits + new, query[: len(hits)])
        elif kind in ("finish", "free_any"):
            rid = self._pick_request(c)
            if rid is None:
                return
            req = self.requests.pop(rid)
            table = req["blocks"]
            n0 = len(self.calls)
            if kind == "finish":
                self.pool.free_block_table(np.array(table, dtype=np.int64), None, float(self.now))
                ordered = table[::-1]
                positions = {blk: i for i, blk in enumerate(table)}
            else:
                rng = np.random.default_rng(d)
                ordered = [table[i] for i in rng.permutation(len(table))]
                self.pool.free_blocks(np.array(ordered, dtype=np.int64), None, float(self.now))
                positions = {blk: i for i, blk in enumerate(ordered)}
            hashed = self.ref.free(ordered, float(self.now))
            self._check_release(n0, hashed, positions)
        elif kind == "session":
            # one agent call: prefix hit on a cached chain, new blocks after it,
            # cache the whole table, and (d odd) finish the oldest request
            self.now -= 1
            if self.chains:
                self.apply(("hit", a, 0, c, 2 * d))
            else:
                self.apply(("alloc", 0, 0, 0, 0))
            self._grow_last(b, b, d)
            if d % 2 and len(self.requests) > 1:
                self.apply(("finish", 0, 0, 0, 0))
            return
        elif kind == "agent":
            # the next call of an agent session: hit (nearly) all of the latest
            # chain, append b blocks, cache them, finish the call
            self.now -= 1
            if self.chains:
                chain = self.chains[-1]["hashes"]
                self.apply(("hit", max(0, len(chain) - a % 8), 0, len(self.chains) - 1, 2 * d))
            else:
                self.apply(("alloc", 0, 0, 0, 0))
            last = self._grow_last(b, 2 * b + 1, d)  # fresh hashes
            self.apply(("finish", 0, 0, last, 0))
            return
        elif kind == "overalloc":
            if self.growable:
                return
            n = free + 1 + a % 3
            before = self.pool.free_block_ids()
            with pytest.raises(ValueError):
                self.pool.get_new_blocks(n)
            assert self.pool.free_block_ids() == before
        assert_same(self.pool, self.ref, self.evicted_log)

    def run(self, ops) -> None:
        assert_same(self.pool, self.ref, self.evicted_log)
        for op in ops:
            self.apply(op)
        # finish everything: all blocks come back, ref counts all zero
        for rid in sorted(self.requests):
            self.apply(("finish", 0, 0, 0, 0))
        assert self.evicted_log == self.ref.evicted_hashes
        assert self.pool.num_free == self.pool.num_blocks - 1
        assert (self.pool.ref[1:] == 0).all()


# --------------------------------------------------------------------------- property tests

SMALL = settings(
    max_examples=100, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@SMALL
@given(
    num_blocks=st.integers(2, 40),
    mode=st.sampled_from(SCORE_MODES),
    ops=st.lists(op_strategy(12), min_size=20, max_size=80),
)
def test_matches_reference_small(num_blocks, mode, ops):
    Driver(num_blocks, mode).run(ops)


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 40), ops=st.lists(op_strategy(12), min_size=20, max_size=80))
def test_matches_reference_lru(num_blocks, ops):
    Driver(num_blocks, None).run(ops)


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 40), ops=st.lists(op_strategy(12), min_size=20, max_size=80))
def test_matches_reference_hash_scores(num_blocks, ops):
    Driver(num_blocks, "hash").run(ops)


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(2, 40), ops=st.lists(op_strategy(12), min_size=20, max_size=80))
def test_matches_reference_release_scores(num_blocks, ops):
    Driver(num_blocks, "release").run(ops)


@settings(max_examples=50, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    num_blocks=st.integers(2, 12),
    mode=st.sampled_from(SCORE_MODES),
    ops=st.lists(op_strategy(20), min_size=20, max_size=60),
)
def test_growable_never_evicts(num_blocks, mode, ops):
    drv = Driver(num_blocks, mode, growable=True)
    drv.run(ops)
    assert drv.pool.num_evicted == 0
    assert drv.ref.evicted == 0


def test_growable_allocates_beyond_initial_size():
    drv = Driver(4, None, growable=True)
    drv.run([("alloc", 3, 0, 0, 0), ("cache", 3, 0, 0, 1), ("alloc", 10, 0, 0, 0), ("alloc", 25, 0, 0, 0)])
    assert drv.max_block_seen >= 4 + 10
    assert drv.pool.num_blocks > 4
    assert drv.pool.num_evicted == 0


# Larger pool: long releases and many touches, to drive run compaction (a run of
# > 256 entries that is mostly stale) and heap rebuilds (many dead runs).

LARGE_OPS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(("session", "agent")), st.integers(0, 900), st.integers(0, 700),
                  st.integers(0, 10**6), st.integers(0, 10**6)),
        st.tuples(st.sampled_from(("hit", "hit", "finish", "decode")), st.integers(200, 900),
                  st.integers(0, 3), st.integers(0, 10**6), st.just(2)),
        op_strategy(8),
    ),
    min_size=30,
    max_size=80,
)


@settings(max_examples=6, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mode=st.sampled_from(SCORE_MODES), ops=LARGE_OPS)
def test_matches_reference_large(mode, ops):
    Driver(2000, mode).run(ops)


def _cache_all(drv: Driver, rid_index: int, seed: int, fresh: bool = False) -> None:
    rid = sorted(drv.requests)[rid_index]
    n = len(drv.requests[rid]["blocks"])
    drv.apply(("cache", n, int(fresh), rid_index, seed))


@pytest.mark.parametrize("mode", SCORE_MODES)
def test_large_run_compaction(mode):
    """Release 600-block runs, touch most of them (compaction), release and re-hit, repeat."""
    drv = Driver(2000, mode)
    pool = drv.pool
    compacted = False
    for rnd in range(4):
        drv.apply(("alloc", 600, 0, 0, 0))
        _cache_all(drv, len(drv.requests) - 1, 10**5 + rnd)  # fresh or reused hashes
        chain = drv.chains[-1]["hashes"]
        chain_idx = len(drv.chains) - 1
        table = drv.requests[sorted(drv.requests)[-1]]["blocks"]
        drv.apply(("finish", 0, 0, len(drv.requests) - 1, 0))
        tail_run = pool.queue._runs[int(pool.queue.run_of[table[-1]])]
        size_before = len(tail_run.ids) - tail_run.start
        # hit 500 of the 600 blocks (several times, from several requests)
        for d in (2, 4, 8):  # d even: no max_blocks cut; d=2: with the chain's hint
            drv.apply(("hit", 500, 0, chain_idx, d))
        if pool.queue.run_of[table[-1]] >= 0:
            compacted |= len(tail_run.ids) - tail_run.start < size_before
        # release the hitting requests again, then re-hit everything
        for _ in range(3):
            drv.apply(("finish", 0, 0, len(drv.requests) - 1, 0))
        drv.apply(("hit", len(chain), 0, chain_idx, 2))
    # drain: allocate everything, evicting across compacted runs
    drv.apply(("alloc", pool.num_free, 0, 0, 0))
    drv.run([])
    if mode != "hash":  # hash scores split a release into runs of ~1 block
        assert compacted


@pytest.mark.parametrize("mode", SCORE_MODES)
def test_heap_rebuild_after_many_dead_runs(mode):
    """Many tiny releases, each fully touched again and kept in use: dead runs
    pile up in the heap until it is rebuilt; then everything is evicted."""
    drv = Driver(2000, mode)
    pool = drv.pool
    rebuilt = False
    drv.apply(("alloc", 30, 0, 0, 0))  # a few live runs (hash scores: ~1 run per block)
    _cache_all(drv, 0, 7)
    drv.apply(("finish", 0, 0, 0, 0))
    n_before = len(drv.requests)
    for i in range(150):
        drv.apply(("alloc", 2, 0, 0, 0))
        _cache_all(drv, len(drv.requests) - 1, i, fresh=True)
        drv.apply(("finish", 0, 0, len(drv.requests) - 1, 0))
        heap_before = len(pool.queue._heap)
        drv.apply(("hit", 2, 0, len(drv.chains) - 1, 2))
        rebuilt |= len(pool.queue._heap) < heap_before
    while len(drv.requests) > n_before:
        drv.apply(("finish", 0, 0, len(drv.requests) - 1, 0))
    assert rebuilt
    drv.apply(("alloc", pool.num_free, 0, 0, 0))
    drv.run([])


# --------------------------------------------------------------------------- exact orders by hand


def _scored_pool(n: int, scores: list[float]) -> BlockPool:
    it = iter(scores)
    return BlockPool(n, lambda freed: next(it))


def test_lower_score_evicted_first_even_if_released_later():
    pool = _scored_pool(4, [2.0, 1.0])
    a, b = pool.get_new_blocks(2).tolist()
    assert (a, b) == (1, 2)
    pool.cache_full_blocks(np.array([a, b]), [11, 22])
    pool.free_blocks([a])  # score 2.0
    pool.free_blocks([b])  # score 1.0, released later
    assert pool.free_block_ids() == [3, b, a]
    assert pool.get_new_blocks(2).tolist() == [3, b]
    assert pool.get_cached_block(22) is None and pool.get_cached_block(11) == a
    assert pool.num_evicted == 1
    pool.check_invariants()


def test_equal_scores_are_lru():
    pool = _scored_pool(4, [1.0, 1.0])
    a, b = pool.get_new_blocks(2).tolist()
    pool.cache_full_blocks(np.array([a, b]), [11, 22])
    pool.free_blocks([a])
    pool.free_blocks([b])
    assert pool.free_block_ids() == [3, a, b]
    assert pool.get_new_blocks(2).tolist() == [3, a]
    assert pool.get_cached_block(11) is None and pool.get_cached_block(22) == b
    pool.check_invariants()


def test_unhashed_blocks_go_to_front_newest_release_first():
    pool = BlockPool(8)
    req_a = pool.get_new_blocks(3)
    req_b = pool.get_new_blocks(3)
    assert req_a.tolist() == [1, 2, 3] and req_b.tolist() == [4, 5, 6]
    pool.cache_full_blocks(req_a[:2], [101, 102])
    pool.cache_full_blocks(req_b[:1], [201])
    pool.free_block_table(req_a)  # tail first: 3 (no hash) to the front; 2, 1 to the tail
    assert pool.free_block_ids() == [3, 7, 2, 1]
    pool.free_block_table(req_b)  # 6, 5 (no hash) before 3; 4 cached at the tail
    assert pool.free_block_ids() == [6, 5, 3, 7, 2, 1, 4]
    pool.check_invariants()
    assert pool.get_new_blocks(5).tolist() == [6, 5, 3, 7, 2]
    assert pool.num_evicted == 1 and pool.get_cached_block(102) is None
    pool.check_invariants()


def test_touched_block_in_middle_of_run_is_skipped():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(5)
    pool.cache_full_blocks(blocks, [10, 20, 30, 40, 50])
    pool.free_blocks(blocks)
    assert pool.free_block_ids() == [1, 2, 3, 4, 5]
    hit = pool.find_longest_prefix([30], 1)
    assert list(hit) == [3]
    pool.touch(np.array(hit))
    assert pool.free_block_ids() == [1, 2, 4, 5]
    assert pool.num_free == 4
    assert pool.get_new_blocks(4).tolist() == [1, 2, 4, 5]
    assert pool.get_cached_block(30) == 3 and pool.ref[3] == 1
    assert pool.num_evicted == 4
    pool.check_invariants()
    pool.free_blocks([3])
    assert pool.free_block_ids() == [3]
    pool.check_invariants()


def test_get_new_blocks_raises_when_asking_more_than_free():
    pool = BlockPool(4)
    with pytest.raises(ValueError):
        pool.get_new_blocks(4)
    assert pool.free_block_ids() == [1, 2, 3]
    got = pool.get_new_blocks(2)
    with pytest.raises(ValueError):
        pool.get_new_blocks(2)
    assert pool.free_block_ids() == [3] and pool.num_free == 1
    pool.check_invariants()
    pool.free_blocks(got)
    assert pool.get_new_blocks(3).tolist() == [1, 2, 3]  # prepended as a group, order kept
    pool.check_invariants()


def test_misuse_is_refused():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    pool.cache_full_blocks(blocks[:1], [7])
    with pytest.raises(AssertionError):
        pool.cache_full_blocks(blocks[:1], [8])  # already has a hash
    pool.cache_full_blocks(blocks[:0], [])  # nothing to cache
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError):
        pool.free_blocks(blocks[:1])  # ref count already 0
    pool.check_invariants()
    assert pool.num_usable_blocks == 3 and pool.usage() == 0.0


def test_a_refused_release_changes_nothing():
    """A table whose block freed last has no reference left: the release is refused after the blocks
    before it had theirs dropped, and they get them back (counts, queue, order)."""
    pool = BlockPool(6)
    table = pool.get_new_blocks(4)
    pool.free_blocks(table[:1])  # table[0] has no reference now
    before = (pool.ref.copy(), pool.free_block_ids())
    with pytest.raises(AssertionError):
        pool.free_block_table(table)  # tail first: table[3], [2], [1] dropped, then table[0] refused
    assert (pool.ref == before[0]).all() and pool.free_block_ids() == before[1]
    pool.check_invariants()
