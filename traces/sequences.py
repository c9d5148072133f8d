"""The token-identity prefix rule on segment lists (``docs/trace-format.md``).

Pure helpers on sequences of ``(segment_id, n_tokens)`` pairs, with no
dependency on the simulator: the trace analysis and generator use them here,
``cwsim`` (workload preparation, block hashing) through ``cwsim.sequences``.
"""

from operator import itemgetter

__all__ = ["common_prefix_len", "shared_tokens"]

_second = itemgetter(1)


def common_prefix_len(a, b) -> int:
    """Length of the longest common prefix of two sequences (C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def shared_tokens(a, b) -> int:
    """Tokens that two segment lists share as a prefix (token-identity rule).

    Segment lists agree as far as their ``(segment_id, n_tokens)`` pairs do; a
    segment id that then appears with two lengths shares the shorter length.
    """
    k = common_prefix_len(a, b)
    n = sum(map(_second, a[:k]))
    if k < len(a) and k < len(b) and a[k][0] == b[k][0]:
        n += min(a[k][1], b[k][1])
    return n
