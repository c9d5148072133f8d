"""The compiled free queue (``cwsim._free_queue``) against its specification, the Python class.

Both are driven by the same random operations; every answer and the whole queue order must agree
after each one. (``tests/test_native.py``: the build made it; the Python class passes the pool's
property tests too.)
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cwsim.free_queue import FreeBlockQueue, PyFreeBlockQueue

N = 60

OPS = st.lists(
    st.tuples(
        st.sampled_from(["prepend", "append", "append_scores", "remove", "pop", "pop_small", "requeue",
                         "rescore", "in_release"]),
        st.integers(0, 40),  # how many blocks
        st.integers(0, 2**31 - 1),  # a seed for which ones
    ),
    max_size=60,
)


def _apply(q, op, k, seed, held: list[int]):
    """One operation on queue ``q``; ``held``: the blocks out of the queue (the same for both queues)."""
    rng = np.random.default_rng(seed)
    free = np.array(q.get_all_free_blocks(), dtype=np.int64)
    if op in ("prepend", "append", "append_scores"):
        if not held:
            return None
        take = rng.permutation(len(held))[: max(1, min(k, len(held)))]
        ids = np.array([held[i] for i in take], dtype=np.int64)
        for b in ids.tolist():
            held.remove(b)
        if op == "prepend":
            return q.prepend_n(ids)
        if op == "append":
            return q.append_n(ids, float(rng.integers(0, 3)))
        return q.append_n(ids, rng.integers(0, 3, len(ids)).astype(np.float64))
    if op == "remove":
        if len(free) == 0:
            return None
        ids = rng.permutation(free)[: max(1, min(k, len(free)))]
        q.remove(ids)
        held.extend(ids.tolist())
        return None
    if op in ("pop", "pop_small"):
        n = min(k, q.num_free_blocks)
        got = q.popleft_n(n) if op == "pop" else q.popleft_small(n)
        got = list(np.asarray(got).tolist())
        held.extend(got)
        return got
    seq = int(rng.integers(0, q.next_seq + 1))
    ids = rng.integers(1, N, max(1, k)).astype(np.int64)
    if op == "in_release":
        return q.in_release(ids, seq).tolist()
    if op == "requeue":
        moved = q.requeue(ids, float(rng.integers(0, 3)), seq)
        return np.asarray(moved).tolist()
    q.rescore(seq, ids, float(rng.integers(0, 3)))
    return None


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_compiled_queue_matches_the_python_queue(ops):
    initial = np.arange(1, N, dtype=np.int64)
    py, c = PyFreeBlockQueue(N, initial), FreeBlockQueue(N, initial)
    held_py, held_c = [], []
    for op, k, seed in ops:
        assert _apply(py, op, k, seed, held_py) == _apply(c, op, k, seed, held_c), op
        assert py.get_all_free_blocks() == c.get_all_free_blocks()
        assert py.num_free_blocks == c.num_free_blocks and py.next_seq == c.next_seq
        assert (py.run_of >= 0).tolist() == (c.run_of >= 0).tolist()
    c.check_invariants()


def test_large_runs_compact_and_pop_the_same():
    """Runs wider than the compaction threshold, mostly taken out of the middle, then drained."""
    n = 3000
    py, c = PyFreeBlockQueue(n, np.arange(1, n)), FreeBlockQueue(n, np.arange(1, n))
    for q in (py, c):
        first = q.popleft_n(2000)
        q.append_n(first[::-1].copy())
        q.remove(first[100:1900])  # the run is mostly stale: compacted
        q.append_n(first[100:1000].copy(), 1.0)
    assert len(c._runs[max(c._runs)].ids) == 900
    assert py.get_all_free_blocks() == c.get_all_free_blocks()
    assert py.popleft_n(py.num_free_blocks).tolist() == c.popleft_n(c.num_free_blocks).tolist()
    c.check_invariants()


def test_popping_more_than_free_is_refused_by_both():
    for q in (PyFreeBlockQueue(4, np.arange(1, 4)), FreeBlockQueue(4, np.arange(1, 4))):
        try:
            q.popleft_n(4)
        except ValueError as e:
            assert "cannot pop 4 blocks from a queue of 3" in str(e)
        else:
            raise AssertionError("no error")
