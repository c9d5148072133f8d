# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False
"""``cwsim.metrics.py_count_misses`` compiled: an admission's missed blocks counted in one C loop.

The specification is the Python function (``cwsim/metrics.py``), which indexes the pending flags
with the missed hash ids (a list converted to an array per admission) and asks the hash map about
each. Here each id is read once: its flag tested and cleared, its membership in the hash map
counted. ``tests/test_native.py`` holds the two to the same results.
"""

include "_digest.pxi"


def count_misses(unsigned char[::1] pending, dict cached, missed):
    """``(harmful, in_cache)`` for the distinct hash ids ``missed`` (see ``py_count_misses``)."""
    cdef Py_ssize_t n = pending.shape[0], harmful = 0, in_cache = 0
    cdef long long h
    for o in missed:
        h = o
        if 0 <= h < n and pending[h]:
            pending[h] = 0
            harmful += 1
        if o in cached:
            in_cache += 1
    return harmful, in_cache
