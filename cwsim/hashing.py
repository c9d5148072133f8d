"""Chained block hashes from trace segments, for any block size.

A token is identified by ``(segment, position in segment)`` (trace format v1),
so a block's content is the tuple of segment pieces ``(segment, start, end)``
it covers, and its hash chains its parent's hash with that content, like
vLLM's ``hash_block_tokens(parent_hash, block_tokens)``. Two sequences get the
same hash at block ``i`` exactly when their first ``(i + 1) * block_size``
tokens are the same, which is what prefix caching needs.

Hashes use CPython's tuple hash over ints: deterministic across runs (no
string hashing is involved; segment ids are interned to ints in order of first
appearance) and collision-free in practice at 64 bits.

Agent prompts grow by appending, so each session keeps a :class:`PrefixMemo`
of its previous sequence: the next sequence resumes hashing at the deepest
segment boundary the two share, and only the new tail costs Python work.
"""

from __future__ import annotations

from collections.abc import Sequence

from cwsim import native
from cwsim.sequences import common_prefix_len

ROOT_HASH = 0x5EED_CACE

Segments = Sequence[tuple[int, int]]


class SegmentInterner:
    """Maps segment ids (strings) to small ints in order of first appearance (1, 2, ...).

    ``forget(segment_ids)`` drops ids that will never be seen again (a finished session's own
    segments); the ints of the others, and of those still to come, stay what they would be."""

    __slots__ = ("ids", "n")

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.n = 0  # ints handed out

    def __call__(self, segment_id: str) -> int:
        ids = self.ids
        sid = ids.get(segment_id)
        if sid is None:
            sid = self.n = self.n + 1
            ids[segment_id] = sid
        return sid

    def forget(self, segment_ids) -> None:
        pop = self.ids.pop
        for s in segment_ids:
            pop(s, None)


class PrefixMemo:
    """Hashing state of the last sequence hashed, for incremental reuse."""

    __slots__ = ("segs", "out", "states", "reused")

    def __init__(self) -> None:
        self.segs: tuple[tuple[int, int], ...] = ()
        #: the last call's result (hashes, or their ids when ``block_hashes`` is given ``ids``)
        self.out: list[int] = []
        # states[i] = (full blocks so far, partial-block pieces, the last full block's hash) before
        # segment i; states[len(segs)] is the state at the end.
        self.states: list[tuple[int, tuple, int]] = [(0, (), ROOT_HASH)]
        #: how many leading hashes the last call carried over from the sequence before
        self.reused = 0


class BlockIds(dict):
    """Dense ids for block hashes: 0, 1, 2, ... in order of first appearance.

    Given to :func:`block_hashes`, they replace the CPython hash values in
    what it returns: equal exactly when the hashes are, and small consecutive
    ints keep the cache's tables compact (the engine uses them).

    A session's own blocks are numbered from the same count but kept in the
    session's own table (``block_hashes``' ``private``), dropped when it ends: this
    one holds what other sessions may ask for, not every hash ever seen; ids keep
    counting up, so no id is handed out twice.
    """

    __slots__ = ("n",)

    def __init__(self) -> None:
        super().__init__()
        self.n = 0  # ids handed out

    def __missing__(self, h: int) -> int:
        n = self[h] = self.n
        self.n = n + 1
        return n


def block_hashes(segs: Segments, block_size: int, memo: PrefixMemo | None = None, ids: BlockIds | None = None,
                 private: dict[int, int] | None = None, private_block: int = 0) -> list[int]:
    """Hashes of every full block of the token sequence ``segs``.

    With a ``memo``, work already done for a sequence sharing a segment prefix
    is reused, and the memo is updated to this sequence. With ``ids``, the
    hashes' dense ids (:class:`BlockIds`, the same for every call with this
    memo) are returned instead.

    A sequence that extends the memo's last one (an agent's next prompt) gets
    the last call's list itself, extended in place: no copy of the blocks
    already hashed. So a list returned with a memo keeps its first ``len()``
    items for good but may grow after them; a caller reads the part its own
    sequence covers.

    ``private`` (with ``ids``): the session's own table for the blocks at index
    ``private_block`` or later (a session's own blocks: their content includes a
    segment no other session holds, so no other session, nor a block of this one
    before its ``private_block``, can have their hash). Their hashes are looked up
    and given ids there, not in ``ids`` (the ids are ``ids``' next ones all the
    same), so the session's table is dropped whole when it ends, and ``ids`` holds
    only what other sessions may ask for.
    """
    if memo is None:
        memo = PrefixMemo()
    if type(segs) is not tuple:
        segs = tuple(segs)
    start = common_prefix_len(memo.segs, segs)
    states = memo.states
    n_hashes, partial, parent = states[start]
    out = memo.out
    if n_hashes < len(out):
        out = out[:n_hashes]  # a new list: the last one stays as it was returned
    del states[start + 1 :]
    pieces = list(partial)
    filled = sum(e - s for _, s, e in pieces)
    bs = block_size
    new: list[int] = []
    for sid, n in segs[start:]:
        pos = 0
        if filled:
            pos = min(bs - filled, n)
            pieces.append((sid, 0, pos))
            filled += pos
            if filled == bs:
                parent = hash((parent, tuple(pieces)))
                new.append(parent)
                pieces, filled = [], 0
        while n - pos >= bs:  # whole blocks inside this segment
            parent = hash((parent, ((sid, pos, pos + bs),)))
            new.append(parent)
            pos += bs
        if pos < n:
            pieces.append((sid, pos, n))
            filled += n - pos
        states.append((n_hashes + len(new), tuple(pieces), parent))
    memo.reused = n_hashes
    memo.segs = segs
    if ids is None:
        out += new
    else:
        table, get = ids, ids.get
        for h in new:  # ids[h], without a __missing__ call per new hash
            if table is ids and private is not None and len(out) >= private_block:
                table = private  # the session's own blocks from here on
                get = table.get
            i = get(h)
            if i is None:
                i = table[h] = ids.n
                ids.n = i + 1
            out.append(i)
    memo.out = out
    return out


#: the Python function: the specification of the compiled one, and what runs where that was not built
py_block_hashes = block_hashes
_compiled = native.load("cwsim._hashing")
#: whether ``block_hashes`` is the compiled function (``cwsim.native``)
NATIVE = _compiled is not None
if NATIVE:
    block_hashes = _compiled.block_hashes  # noqa: F811 - the same function, compiled


def own_block_ids(segs: Segments, block_size: int, private_from: int, ids: BlockIds,
                  created: list[int] | None = None) -> Sequence[int]:
    """What ``block_hashes(segs, block_size, PrefixMemo(), ids)`` returns, for a sequence whose
    blocks from token ``private_from`` on no other sequence will ever hold (a session's only
    call, past what other sessions share): those blocks get the next ids without being hashed
    (hashing would give each a new id, in the same order), and are never put in ``ids``.
    ``created``: extended with those own blocks' ids."""
    n_blocks = sum(n for _, n in segs) // block_size
    cut = min(private_from // block_size, n_blocks)
    out = block_hashes(_first_tokens(segs, cut * block_size), block_size, None, ids) if cut else None
    start = ids.n
    ids.n = start + n_blocks - cut
    own = range(start, ids.n)
    if created is not None:
        created.extend(own)
    if out is None:  # nothing shared: the ids themselves, never made into a list
        return own
    out.extend(own)
    return out


def _first_tokens(segs: Segments, n: int) -> tuple[tuple[int, int], ...]:
    """The segments of the first ``n`` tokens (the last one cut short)."""
    out = []
    for sid, k in segs:
        if k >= n:
            out.append((sid, n))
            break
        out.append((sid, k))
        n -= k
    return tuple(out)
