# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""``cwsim.hashing.block_hashes`` compiled: the same chained block hashes, computed in C.

The specification is the Python function (``cwsim/hashing.py``): a block's hash is CPython's
``hash((parent, pieces))`` with ``pieces`` a tuple of ``(segment, start, end)`` tuples. Here those
tuple and int hashes are computed with CPython's own algorithms (``tuplehash``: the xxHash-based lane
mix, and ``long_hash``: the value modulo 2**61 - 1 with its sign) on C integers, without building the
tuples, so the values are the very ones Python's ``hash`` gives (``tests/test_hashing_native.py``
checks them against it, the extreme parents included). The memo, the ids and the session's private
table work as in the Python function.
"""

include "_digest.pxi"


from traces.sequences import common_prefix_len

ctypedef unsigned long long u64

cdef u64 _P61 = (<u64>1 << 61) - 1  # CPython's hash modulus on 64-bit builds
cdef u64 _X1 = 11400714785074694791ULL
cdef u64 _X2 = 14029467366897019727ULL
cdef u64 _X5 = 2870177450012600261ULL


cdef inline long long _int_hash(long long x) noexcept:
    """``hash(x)`` of a Python int in the C long long range."""
    cdef u64 a = <u64>x if x >= 0 else (<u64>0) - <u64>x
    cdef long long h = <long long>(a % _P61)
    if x < 0:
        h = -h
    return -2 if h == -1 else h


cdef inline u64 _lane(u64 acc, long long item_hash) noexcept:
    acc += (<u64>item_hash) * _X2
    acc = (acc << 31) | (acc >> 33)
    return acc * _X1


cdef inline long long _finish(u64 acc, u64 n) noexcept:
    acc += n ^ (_X5 ^ 3527539ULL)
    return 1546275796 if acc == <u64>-1 else <long long>acc


cdef inline long long _piece_hash(long long sid, long long s, long long e) noexcept:
    """``hash((sid, s, e))``."""
    cdef u64 acc = _X5
    acc = _lane(acc, _int_hash(sid))
    acc = _lane(acc, _int_hash(s))
    acc = _lane(acc, _int_hash(e))
    return _finish(acc, 3)


cdef inline long long _block_hash(long long parent, long long pieces_hash) noexcept:
    """``hash((parent, pieces))`` given ``hash(pieces)``."""
    cdef u64 acc = _X5
    acc = _lane(acc, _int_hash(parent))
    acc = _lane(acc, pieces_hash)
    return _finish(acc, 2)


cdef long long _pieces_hash(list pieces):
    """``hash(tuple(pieces))`` for a list of ``(sid, start, end)`` tuples."""
    cdef u64 acc = _X5
    for sid, s, e in pieces:
        acc = _lane(acc, _piece_hash(sid, s, e))
    return _finish(acc, len(pieces))


def block_hashes(segs, Py_ssize_t block_size, memo=None, ids=None, dict private=None, Py_ssize_t private_block=0):
    """Hashes (or their ids) of every full block of ``segs`` (see ``cwsim.hashing.block_hashes``)."""
    if memo is None:
        from cwsim.hashing import PrefixMemo  # here, not at import: cwsim.hashing imports this module

        memo = PrefixMemo()
    if type(segs) is not tuple:
        segs = tuple(segs)
    cdef Py_ssize_t start = common_prefix_len(memo.segs, segs)
    cdef list states = memo.states
    n_hashes_o, partial, parent_o = states[start]
    cdef Py_ssize_t n_hashes = n_hashes_o
    cdef long long parent = parent_o
    cdef list out = memo.out
    if n_hashes < len(out):
        out = out[:n_hashes]  # a new list: the last one stays as it was returned
    del states[start + 1 :]
    cdef list pieces = list(partial)
    cdef Py_ssize_t filled = 0, bs = block_size, pos, n, i
    cdef long long sid
    for p in pieces:
        filled += p[2] - p[1]
    cdef list new = []
    for i in range(start, len(segs)):
        sid_o, n_o = segs[i]
        sid, n = sid_o, n_o
        pos = 0
        if filled:
            pos = min(bs - filled, n)
            pieces.append((sid_o, 0, pos))
            filled += pos
            if filled == bs:
                parent = _block_hash(parent, _pieces_hash(pieces))
                new.append(parent)
                pieces, filled = [], 0
        while n - pos >= bs:  # whole blocks inside this segment
            parent = _block_hash(parent, _finish(_lane(_X5, _piece_hash(sid, pos, pos + bs)), 1))
            new.append(parent)
            pos += bs
        if pos < n:
            pieces.append((sid_o, pos, n))
            filled += n - pos
        states.append((n_hashes + len(new), tuple(pieces), parent))
    memo.reused = n_hashes
    memo.segs = segs
    cdef dict d
    cdef Py_ssize_t nid
    if ids is None:
        out += new
    else:
        d = <dict>ids  # a BlockIds (a dict subclass): read and written as the dict it is
        nid = ids.n
        for h in new:  # ids[h], without a __missing__ call per new hash
            if private is not None and d is not private and len(out) >= private_block:
                d = private  # the session's own blocks from here on
            got = d.get(h)
            if got is None:
                got = nid
                d[h] = got
                nid += 1
            out.append(got)
        ids.n = nid
    memo.out = out
    return out
