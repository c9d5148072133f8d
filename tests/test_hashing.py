"""Chained block hashes from segments: prefix semantics, incremental reuse, determinism."""

import subprocess
import sys

from hypothesis import given, settings
from hypothesis import strategies as st

from cwsim.hashing import BlockIds, PrefixMemo, SegmentInterner, _first_tokens, block_hashes, own_block_ids

segments = st.lists(st.tuples(st.integers(1, 4), st.integers(1, 40)), min_size=1, max_size=8)


def tokens(segs):
    return [(s, i) for s, n in segs for i in range(n)]


@settings(max_examples=300, derandomize=True)
@given(segments, segments, st.sampled_from([1, 4, 16]))
def test_equal_hash_iff_equal_token_prefix(a, b, bs):
    ha, hb = block_hashes(a, bs), block_hashes(b, bs)
    ta, tb = tokens(a), tokens(b)
    assert len(ha) == len(ta) // bs
    for i in range(min(len(ha), len(hb))):
        assert (ha[i] == hb[i]) == (ta[: (i + 1) * bs] == tb[: (i + 1) * bs])


@settings(max_examples=300, derandomize=True)
@given(segments, segments, st.integers(0, 8), st.sampled_from([1, 4, 16]))
def test_incremental_hashing_equals_hashing_from_scratch(a, tail, keep, bs):
    memo = PrefixMemo()
    block_hashes(a, bs, memo)
    b = a[:keep] + tail
    assert block_hashes(b, bs, memo) == block_hashes(b, bs)
    # the memo reports how many leading hashes it carried over, and they are right
    assert block_hashes(b, bs)[: memo.reused] == block_hashes(a, bs)[: memo.reused]


def test_a_grown_prompt_reuses_every_block_of_the_previous_call():
    memo = PrefixMemo()
    first = list(block_hashes([(1, 2000), (2, 90)], 16, memo))
    second = block_hashes([(1, 2000), (2, 90), (3, 700)], 16, memo)
    assert second[: len(first)] == first and memo.reused == len(first)


def test_hashes_do_not_depend_on_the_interpreter_hash_seed():
    code = ("from cwsim.hashing import SegmentInterner, block_hashes; i = SegmentInterner();"
            "print(block_hashes([(i('sys'), 100), (i('user'), 37)], 16))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed}).stdout for seed in ("0", "1", "12345")}
    assert len(outs) == 1


def test_interner_numbers_segments_in_order_of_appearance():
    i = SegmentInterner()
    assert [i("b"), i("a"), i("b"), i("c")] == [1, 2, 1, 3]


def test_block_ids_are_dense_and_equal_exactly_when_hashes_are():
    """With BlockIds, a memo-chained sequence of calls gets ids that mirror the hashes 1:1."""
    ids = BlockIds()
    memo_a, memo_b, plain_a, plain_b = PrefixMemo(), PrefixMemo(), PrefixMemo(), PrefixMemo()
    calls_a = [(("sys", 40), ("u0", 9)), (("sys", 40), ("u0", 9), ("t0", 30)), (("sys", 40), ("x", 21))]
    calls_b = [(("sys", 40), ("v0", 50))]
    interner = SegmentInterner()
    seen: dict[int, int] = {}
    for calls, memo, plain in ((calls_a, memo_a, plain_a), (calls_b, memo_b, plain_b)):
        for call in calls:
            segs = tuple((interner(s), n) for s, n in call)
            got = block_hashes(segs, 8, memo, ids)
            want = block_hashes(segs, 8, plain)
            assert len(got) == len(want)
            for i, h in zip(got, want):
                assert seen.setdefault(h, i) == i  # one id per hash ...
            assert len(set(got)) == len(got)
    assert len(set(seen.values())) == len(seen)  # ... and one hash per id
    assert sorted(seen.values()) == list(range(len(ids)))  # dense, from 0
    first_a = block_hashes(tuple((interner(s), n) for s, n in calls_a[0]), 8, PrefixMemo(), ids)
    assert first_a[:5] == list(range(5))  # the shared system prompt's blocks kept their first ids


@settings(max_examples=300, derandomize=True)
@given(st.lists(st.tuples(segments, st.integers(0, 8)), min_size=1, max_size=5), st.sampled_from([1, 4, 16]))
def test_a_returned_list_keeps_its_items_whatever_the_memo_hashes_next(calls, bs):
    """A list returned with a memo may grow in place (the next call extends it), never change."""
    memo, ids = PrefixMemo(), BlockIds()
    seen: list[tuple[list[int], list[int]]] = []
    segs: list = []
    for tail, keep in calls:
        segs = segs[:keep] + tail
        got = block_hashes(segs, bs, memo, ids)
        assert got == block_hashes(segs, bs, PrefixMemo(), ids)
        seen.append((got, list(got)))
        for returned, snapshot in seen:
            assert returned[: len(snapshot)] == snapshot


def test_an_extended_prompt_extends_the_same_list():
    memo = PrefixMemo()
    first = block_hashes([(1, 64), (2, 10)], 16, memo)
    second = block_hashes([(1, 64), (2, 10), (3, 40)], 16, memo)
    assert second is first and len(second) == 7 and memo.reused == 4
    third = block_hashes([(1, 64), (4, 40)], 16, memo)
    assert third is not second and len(second) == 7 and third[:4] == second[:4] and memo.reused == 4


def test_forgetting_keeps_the_other_ids_and_never_hands_one_out_twice():
    i = SegmentInterner()
    assert [i("sys"), i("a"), i("b")] == [1, 2, 3]
    i.forget(["a", "nope"])
    assert i.ids == {"sys": 1, "b": 3} and [i("c"), i("b"), i("sys")] == [4, 3, 1]


def test_block_hashes_numbers_the_private_blocks_in_the_session_table():
    """``private``: the blocks at ``private_block`` or later are looked up and numbered in the session's
    own table, from the same count; blocks before it (a prefix other sessions may hold) stay in ``ids``."""
    ids, memo, private = BlockIds(), PrefixMemo(), {}
    shared = block_hashes([(1, 32)], 16, PrefixMemo(), ids)  # another session numbered the 2 shared blocks
    first = list(block_hashes([(1, 32), (2, 40)], 16, memo, ids, private, 2))
    assert first[:2] == shared == [0, 1] and first[2:] == [2, 3] and ids.n == 4
    assert sorted(ids.values()) == [0, 1] and sorted(private.values()) == [2, 3]
    second = block_hashes([(1, 32), (2, 40), (3, 30)], 16, memo, ids, private, 2)
    assert second[:4] == first and second[4:] == [4, 5]
    assert sorted(ids.values()) == [0, 1] and sorted(private.values()) == [2, 3, 4, 5]
    # the ids are those one table would give: the same hashes, numbered in the same order
    one = BlockIds()
    block_hashes([(1, 32)], 16, PrefixMemo(), one)
    memo1 = PrefixMemo()
    block_hashes([(1, 32), (2, 40)], 16, memo1, one)
    assert list(block_hashes([(1, 32), (2, 40), (3, 30)], 16, memo1, one)) == list(second)
    assert {**ids, **private} == dict(one)
    # a later sequence of the session finds its own blocks in its table: no new id
    third = block_hashes([(1, 32), (2, 40), (3, 30)], 16, PrefixMemo(), ids, private, 2)
    assert list(third) == list(second) and ids.n == 6


@settings(max_examples=200, derandomize=True)
@given(segments, st.integers(0, 200), st.sampled_from([1, 4, 16]))
def test_own_blocks_get_the_ids_hashing_would_give_without_hashing(segs, private_from, bs):
    """A sequence nobody else holds past token ``private_from`` (another sequence numbered the
    prefix before it): the ids hashing gives, and only that prefix's blocks are in the table."""
    head = _first_tokens(segs, private_from)
    hashed, own = BlockIds(), BlockIds()
    for ids in (hashed, own):
        block_hashes(head, bs, None, ids)
    got = own_block_ids(segs, bs, private_from, own)
    assert list(got) == block_hashes(segs, bs, PrefixMemo(), hashed)
    shared_blocks = min(private_from // bs, sum(n for _, n in segs) // bs)
    assert isinstance(got, range) == (shared_blocks == 0)  # nothing shared: the ids as a range, no list made
    assert own.n == hashed.n and len(own) == len(block_hashes(head, bs))
    assert _first_tokens([(1, 5), (2, 7)], 9) == ((1, 5), (2, 4)) and _first_tokens([(1, 5)], 9) == ((1, 5),)
    # ``created``: the own blocks' ids, not the ids the prefix's blocks get in the same call
    fresh, created = BlockIds(), []
    out = list(own_block_ids(segs, bs, private_from, fresh, created))
    assert created == [i for i in out if i not in set(fresh.values())] == out[len(out) - len(created):]
