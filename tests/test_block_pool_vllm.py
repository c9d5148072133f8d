"""vLLM's own free-queue expectations, ported.

The cases and the expected block ids come from vLLM's
``tests/v1/core/test_prefix_caching.py`` (test_prefill, test_decode,
test_evict, test_hash_block_correct_reuse, test_computed_blocks_not_evicted,
test_prefill_not_enough_free_blocks_with_computed_blocks): same pool sizes,
same token layouts, same asserted block ids and free-queue orders, run against
cwsim's pool and KV cache manager.
"""

import numpy as np
import pytest

from cwsim.block_pool import BlockPool
from cwsim.hashing import block_hashes
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.request import Request


def make_request(rid: int, prompt: list[int], block_size: int, outputs: list[int] = ()) -> Request:
    """A request whose tokens are the given ids (token t is segment t+1, one token long)."""
    tokens = list(prompt) + list(outputs)
    hashes = block_hashes([(t + 1, 1) for t in tokens], block_size)
    return Request(rid, None, 0, len(prompt), max(1, len(outputs)), hashes, 0.0)


def make_manager(num_blocks: int, block_size: int = 16) -> KVCacheManager:
    return KVCacheManager(BlockPool(num_blocks), block_size)


def computed(manager: KVCacheManager, req: Request):
    hits, n = manager.get_computed_blocks(req)
    return hits, n


def test_prefill():
    m = make_manager(11)
    common = [i for i in range(3) for _ in range(16)]
    req0 = make_request(0, common + [3] * 7, 16)
    hits, n = computed(m, req0)
    assert len(req0.hashes) == 3 and len(hits) == 0 and n == 0
    new = m.allocate_slots(req0, 55, hits)
    assert new.tolist() == [1, 2, 3, 4]
    pool = m.pool
    assert pool.has_hash[[1, 2, 3]].all() and not pool.has_hash[4]
    assert pool.ref[[1, 2, 3, 4]].tolist() == [1, 1, 1, 1]

    # hit in the common prefix while the original blocks are in use
    req1 = make_request(1, common + [3] * 5, 16)
    hits, n = computed(m, req1)
    assert hits.tolist() == [1, 2, 3] and n == 48
    new = m.allocate_slots(req1, 53 - 48, hits)
    assert new.tolist() == [5]
    assert pool.ref[[1, 2, 3]].tolist() == [2, 2, 2]
    assert pool.num_free == 5

    m.free(req0)
    m.free(req1)
    assert pool.num_free == 10
    # [partial without hashes (5, 4), prepended] [unallocated 6..10] [common (3, 2, 1)]
    assert pool.free_block_ids() == [5, 4, 6, 7, 8, 9, 10, 3, 2, 1]

    # hit in the common prefix when the original blocks are free
    req2 = make_request(2, common + [3] * 6, 16)
    hits, n = computed(m, req2)
    assert hits.tolist() == [1, 2, 3] and n == 48
    new = m.allocate_slots(req2, 54 - 48, hits)
    assert new.tolist() == [5]  # reuse partial block 5
    assert pool.num_free == 6
    assert all(pool.ref[b] == 0 for b in pool.free_block_ids())
    m.free(req2)

    # cache miss and eviction: the allocation order is the eviction order
    req3 = make_request(3, [99] * (16 * 10), 16)
    hits, n = computed(m, req3)
    assert len(hits) == 0 and n == 0
    new = m.allocate_slots(req3, 16 * 10, hits)
    assert new.tolist() == [5, 4, 6, 7, 8, 9, 10, 3, 2, 1]
    assert pool.num_free == 0 and pool.free_block_ids() == []
    pool.check_invariants()


def test_decode():
    m = make_manager(11)
    common = [i for i in range(3) for _ in range(16)]
    req0 = make_request(0, common + [3] * 7, 16, outputs=[8] * 4 + [7] * 19)
    hits, _ = computed(m, req0)
    assert m.allocate_slots(req0, 55, hits).tolist() == [1, 2, 3, 4]

    # append slots without allocating a new block
    req0.num_computed = 55
    req0.num_generated = 4
    new = m.allocate_slots(req0, 4)
    assert len(new) == 0
    assert not m.pool.has_hash[req0.blocks[-1]]

    # append slots allocating a new block: 9 tokens fill the previous block, 10 the new one
    req0.num_computed = 59
    req0.num_generated = 4 + 19
    new = m.allocate_slots(req0, 19)
    assert len(new) == 1
    assert m.pool.has_hash[req0.blocks[-2]]
    assert not m.pool.has_hash[req0.blocks[-1]]


def test_evict():
    m = make_manager(11)
    last = 5 * 16 + 7
    req0 = make_request(0, list(range(last)), 16)
    hits, _ = computed(m, req0)
    assert len(m.allocate_slots(req0, last, hits)) == 6  # 5 full + 1 partial

    req1 = make_request(1, list(range(last, last + 3 * 16)), 16)
    hits, n = computed(m, req1)
    assert len(hits) == 0 and n == 0
    assert len(m.allocate_slots(req1, 3 * 16, hits)) == 3
    assert m.pool.num_free == 1

    m.free(req0)
    # partial blocks (without hash) at the head, the others at the tail (LRU)
    assert m.pool.free_block_ids() == [6, 10, 5, 4, 3, 2, 1]
    m.free(req1)
    assert m.pool.num_free == 10
    assert m.pool.free_block_ids() == [6, 10, 5, 4, 3, 2, 1, 9, 8, 7]

    # touch the first 2 blocks
    req2 = make_request(2, list(range(2 * 16 + 3)), 16)
    hits, n = computed(m, req2)
    assert hits.tolist() == [1, 2] and n == 32
    assert m.allocate_slots(req2, 3, hits).tolist() == [6]
    assert m.pool.num_free == 7
    m.pool.check_invariants()


def test_hash_block_correct_reuse():
    m = make_manager(2)
    req = make_request(0, list(range(16)), 16)
    hits, _ = computed(m, req)
    assert len(m.allocate_slots(req, 16, hits)) == 1
    m.free(req)
    # a new block that is not full: the reused block's hash must be cleared
    req = make_request(1, list(range(15)), 16)
    hits, n = computed(m, req)
    assert len(hits) == 0 and n == 0
    new = m.allocate_slots(req, 15, hits)
    assert len(new) == 1
    assert not m.pool.has_hash[new[0]]
    assert m.pool.num_evicted == 1


def test_computed_blocks_not_evicted():
    m = make_manager(3)
    req0 = make_request(0, list(range(16)), 16)
    hits, _ = computed(m, req0)
    assert m.allocate_slots(req0, 16, hits).tolist() == [1]
    req1 = make_request(1, list(range(16, 32)), 16)
    hits, _ = computed(m, req1)
    assert m.allocate_slots(req1, 16, hits).tolist() == [2]
    m.free(req0)
    m.free(req1)
    # a hit on the first block: the second cached block is evicted, not the first
    req2 = make_request(2, list(range(32)), 16)
    hits, n = computed(m, req2)
    assert hits.tolist() == [1] and n == 16
    assert m.allocate_slots(req2, 16, hits).tolist() == [2]


def test_prefill_not_enough_free_blocks_with_computed_blocks():
    """Allocation counts the free hit blocks it would take out of the queue."""
    m = make_manager(11)
    # req0: 3 full blocks + 7 tokens
    common = [i for i in range(3) for _ in range(16)]
    req0 = make_request(0, common + [3] * 7, 16)
    hits, _ = computed(m, req0)
    m.allocate_slots(req0, 55, hits)
    assert m.pool.ref[[1, 2, 3, 4]].tolist() == [1, 1, 1, 1]

    # req1 holds 6 other blocks (5..10): no free blocks are left but req0's
    req1 = make_request(1, list(range(100, 100 + 6 * 16)), 16)
    hits, _ = computed(m, req1)
    assert m.allocate_slots(req1, 96, hits).tolist() == [5, 6, 7, 8, 9, 10]
    m.free(req0)  # blocks 1..3 cached and free, 4 free without hash

    # req2 hits 1..3 (free) and needs 2 new blocks: 3 + 2 > 4 free -> refused
    req2 = make_request(2, common + [7] * 20, 16)
    hits, n = computed(m, req2)
    assert hits.tolist() == [1, 2, 3]
    free_before = m.pool.free_block_ids()
    assert m.allocate_slots(req2, 20, hits) is None
    assert m.pool.free_block_ids() == free_before  # a refused allocation changes nothing
    # with one new block needed it fits: 3 hits + 1 new == 4 free
    req3 = make_request(3, common + [7] * 10, 16)
    hits, n = computed(m, req3)
    assert m.allocate_slots(req3, 10, hits).tolist() == [4]
    assert m.pool.num_free == 0
    m.pool.check_invariants()


def test_last_token_is_never_a_hit():
    """As in vLLM, a fully cached prompt still recomputes its last block's token."""
    m = make_manager(11)
    req0 = make_request(0, list(range(32)), 16)
    hits, _ = computed(m, req0)
    m.allocate_slots(req0, 32, hits)
    m.free(req0)
    req1 = make_request(1, list(range(32)), 16)
    hits, n = computed(m, req1)
    assert hits.tolist() == [1] and n == 16


def test_unbounded_pool_grows_instead_of_evicting():
    pool = BlockPool(3, growable=True)
    m = KVCacheManager(pool, 16)
    reqs = [make_request(i, list(range(i * 100, i * 100 + 32)), 16) for i in range(4)]
    for r in reqs:
        hits, _ = computed(m, r)
        assert m.allocate_slots(r, 32, hits) is not None
        m.free(r)
    assert pool.num_evicted == 0
    assert pool.num_blocks >= 9
    for r in reqs:  # every prefix is still cached
        assert len(pool.find_longest_prefix(r.hashes, 2)) == 2
    pool.check_invariants()


def test_free_more_than_referenced_is_refused():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(2)
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError):
        pool.free_blocks(np.asarray(blocks))


def test_one_cache_call_with_a_hash_twice_keeps_the_first_block():
    """Two requests with the same content fill the same block in one step (one cache call)."""
    for n in (2, 20):  # the scalar path for small calls and the vectorised one
        pool = BlockPool(64)
        blocks = pool.get_new_blocks(n)
        hashes = [7, 7] + list(range(100, 100 + n - 2))
        pool.cache_full_blocks(blocks, hashes)
        assert pool.get_cached_block(7) == blocks[0]
        assert pool.canonical[blocks].tolist() == [True, False] + [True] * (n - 2)
        pool.check_invariants()


def test_an_unbounded_pool_reuses_the_blocks_of_contents_nobody_will_ask_for():
    """``drop_unreachable``: free cached blocks of dropped contents lose their hash and go to the
    queue's front (tier 0), so the next allocation takes them instead of growing the pool; a block
    still in use keeps its hash; nothing counts as an eviction."""
    pool = BlockPool(7, growable=True)
    a, b = pool.get_new_blocks(3), pool.get_new_blocks(2)
    assert a.tolist() == [1, 2, 3] and b.tolist() == [4, 5]
    pool.cache_full_blocks(a, [10, 11, 12])
    pool.cache_full_blocks(b, [20, 21])
    pool.free_block_table(a)
    assert pool.free_block_ids() == [6, 3, 2, 1]
    assert pool.drop_unreachable([12, 10, 20, 99]) == 2  # 20 is in use, 99 was never cached
    assert pool.free_block_ids() == [3, 1, 6, 2] and sorted(pool.cached) == [11, 20, 21]
    assert pool.get_new_blocks(3).tolist() == [3, 1, 6] and pool.num_blocks == 7 and pool.num_evicted == 0
    assert len(pool.find_longest_prefix([10, 11], 2)) == 0  # the dropped content misses
    pool.check_invariants()


# ------------------------------------------------------------------ unlisted blocks (cwsim's own)
def test_unlisted_blocks_queue_and_evict_as_listed_ones_but_no_lookup_finds_them():
    """test_evict's layout with req1's blocks unlisted from its second block on: the same free-queue
    order and evictions; a lookup finds only what is listed, its own hint the rest."""
    evicted = []
    m = KVCacheManager(BlockPool(11, on_evict=evicted.extend), 16)
    last = 5 * 16 + 7
    req0 = make_request(0, list(range(last)), 16)
    m.allocate_slots(req0, last, computed(m, req0)[0])
    req1 = make_request(1, list(range(last, last + 3 * 16)), 16)
    req1.unlisted_from = 1
    assert m.allocate_slots(req1, 3 * 16, computed(m, req1)[0]).tolist() == [7, 8, 9]
    pool = m.pool
    assert pool.num_unlisted == 2 and pool.unlisted[[7, 8, 9]].tolist() == [False, True, True]
    assert pool.has_hash[[7, 8, 9]].all() and len(pool.cached) == 5 + 1
    pool.check_invariants()
    m.free(req0)
    m.free(req1)
    assert pool.free_block_ids() == [6, 10, 5, 4, 3, 2, 1, 9, 8, 7]  # as test_evict: unlisted ones in tier 1
    again = make_request(3, list(range(last, last + 3 * 16)), 16)
    assert computed(m, again)[0].tolist() == [7]  # the lookup stops at the first unlisted block
    again.hint = (np.array([7, 8, 9]), pool.gen[[7, 8, 9]].copy())
    assert computed(m, again)[0].tolist() == [7, 8]  # the hint (a preempted request's own): both
    # allocating 9 blocks evicts the 7 cached ones in LRU order (after the 2 without hash): unlisted counted too,
    # but only the listed ones' hashes go to on_evict (nothing looks an unlisted hash up again)
    got = pool.get_new_blocks(9)
    assert got.tolist() == [6, 10, 5, 4, 3, 2, 1, 9, 8]
    assert pool.num_evicted == 7 and evicted == req0.hashes[4::-1]
    assert pool.num_unlisted == 0 and not pool.unlisted.any() and not pool.has_hash[[8, 9]].any()
    pool.check_invariants()
    assert pool.get_new_blocks(1).tolist() == [7]  # the small path: the listed one
    assert pool.num_evicted == 8 and pool.cached == {}
    pool.free_blocks([9, 8])  # evicted, so freed without a hash: tier 0, at the front
    assert pool.free_block_ids() == [9, 8]
    pool.check_invariants()


def test_the_small_allocation_path_evicts_an_unlisted_block():
    evicted = []
    pool = BlockPool(4, on_evict=evicted.append)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks[:1], [11])
    pool.cache_unlisted_blocks(blocks[1:], [12, 13])
    pool.free_blocks(blocks)
    assert pool.get_new_blocks(2).tolist() == [1, 2] and pool.num_evicted == 2
    assert evicted == [[11]]  # the listed block's hash only
    assert pool.cached == {} and pool.num_unlisted == 1 and pool.unlisted[3]
    pool.check_invariants()
    with pytest.raises(AssertionError, match="already has a hash"):
        pool.cache_unlisted_blocks(np.array([3]), [14])
    assert pool.get_new_blocks(1).tolist() == [3] and pool.num_evicted == 3 and evicted == [[11]]  # none: no call
