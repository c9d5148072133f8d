"""The compiled ``block_hashes`` (``cwsim._hashing``) against its specification, the Python function.

Its hashes are CPython's tuple and int hashes computed in C: they must equal ``hash`` itself, for
any parent (the extreme ones included), and the function must give what the Python one gives, with
and without a memo, ids and the session's private table, over sequences that grow, shrink and branch.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from cwsim import hashing
from cwsim.hashing import BlockIds, PrefixMemo, block_hashes, py_block_hashes

INT64 = st.integers(-(2**63), 2**63 - 1)
EXTREMES = [-(2**63), -(2**63) + 1, -(2**61) + 1, -(2**61), -(2**61) - 1, -2, -1, 0, 1, 2**61 - 2, 2**61 - 1,
            2**61, 2**62, 2**63 - 1]


def _one_block(parent: int, sid: int, start: int, bs: int) -> int:
    """The compiled function's hash of one whole block after ``parent`` (its memo's root set to it)."""
    memo = PrefixMemo()
    memo.states = [(0, (), parent)]
    return block_hashes(((sid, start + bs),), bs, memo)[-1]


def test_compiled_is_in_use():
    assert hashing.NATIVE and block_hashes is not py_block_hashes


@settings(max_examples=500, derandomize=True, deadline=None)
@given(parent=INT64 | st.sampled_from(EXTREMES), sid=st.integers(1, 2**40), bs=st.sampled_from([1, 16, 32]))
def test_a_block_hash_is_pythons_tuple_hash(parent, sid, bs):
    assert _one_block(parent, sid, 0, bs) == hash((parent, ((sid, 0, bs),)))


def test_extreme_parents():
    for parent in EXTREMES:
        assert _one_block(parent, 7, 0, 16) == hash((parent, ((7, 0, 16),))), parent


SEGS = st.lists(st.tuples(st.integers(1, 6), st.integers(1, 70)), max_size=12).map(tuple)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(seqs=st.lists(SEGS, min_size=1, max_size=6), bs=st.sampled_from([1, 4, 16]), use_ids=st.booleans(),
       private=st.integers(0, 20))
def test_compiled_matches_python_over_a_session(seqs, bs, use_ids, private):
    """A session's successive sequences (each may extend, cut or branch from the last), hashed with one
    memo: the same results, memo states, ids and the session's private table."""
    state = {}
    for name, fn in (("py", py_block_hashes), ("c", block_hashes)):
        memo, ids, table, outs = PrefixMemo(), BlockIds() if use_ids else None, {}, []
        for segs in seqs:
            out = fn(segs, bs, memo, ids, table if use_ids else None, private)
            outs.append(list(out))
        state[name] = (outs, memo.states, memo.reused, memo.segs, dict(ids or {}), ids.n if ids else None,
                       list(table.items()))
        # with no memo, the same as a fresh memo
        assert fn(seqs[-1], bs) == py_block_hashes(seqs[-1], bs)
    assert state["py"] == state["c"]
