"""A whole trace held in compact columns (:class:`TraceTable`), for the code that needs every session.

``load_trace`` builds one ``Call`` object per call and repeats each prompt's whole segment
list on every call, so its memory grows with calls x prompt length (about 0.14 MiB a
session of the synthetic traces). A simulation streams instead (``traces.stream``); the
rest (analysis, sweeps and comparisons that reuse a trace across runs, predictor fitting)
holds a :class:`TraceTable`:

- per call, numpy columns: ``turn``, ``output_tokens``, ``output_segment``, ``gap_s``,
  ``timestamp_s``, ``latency_s`` (NaN for a missing value: the reader admits only
  finite numbers, so NaN means "not recorded");
- each prompt in the trace format's compact form: ``keep`` leading segments of the
  previous call's sequence (prompt, then output segment), then its own ``appended``
  segments (CSR: ``append_start`` offsets into ``seg`` / ``seg_tokens``);
- segment ids interned as numbers; their text in one UTF-8 blob with offsets, decoded
  only when a session is materialised. A segment that only one session holds is interned
  per session (the index pass says which ids may be shared), so building never keeps a
  dictionary of every id;
- tool calls as CSR columns (``tool_start``; names and categories interned).

Invariant: ``table.sessions[i]`` equals ``load_trace(path).sessions[i]`` for every ``i``
(same calls, same field values and types), and ``table.shared(seg)`` is exact: True
exactly when the sequences of two or more sessions hold ``seg``. ``table.sessions`` is a
read-only sequence that builds each ``Session`` when asked, so code written for a
``Trace`` (``for s in trace.sessions``, ``len``, indexing) runs on a table unchanged,
with memory for one session at a time.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from traces.format import Call, Session, ToolCall, Trace
from traces.reader import load_trace, sequence
from traces.sequences import common_prefix_len
from traces.stream import SessionInfo, index_trace, iter_sessions, session_info

__all__ = ["TraceTable", "load_table"]

_NAN = float("nan")


class _Strings:
    """Interned strings in one UTF-8 blob: ``add(s) -> id`` (``ids``: the dictionary to intern in,
    default the global one); the text of id ``i`` is ``blob[offsets[i]:offsets[i + 1]]``."""

    __slots__ = ("blob", "offsets", "_ids")

    def __init__(self):
        self.blob = bytearray()
        self.offsets = array("q", [0])
        self._ids: dict[str, int] = {}

    def add(self, s: str, ids: dict | None = None) -> int:
        ids = self._ids if ids is None else ids
        i = ids.get(s)
        if i is None:
            i = ids[s] = len(self.offsets) - 1
            self.blob += s.encode()
            self.offsets.append(len(self.blob))
        return i

    def freeze(self) -> tuple[bytearray, np.ndarray, dict[str, int]]:
        return self.blob, np.frombuffer(self.offsets, dtype=np.int64), self._ids


#: the table's numeric columns and their ``array`` typecodes ("q": int64, "d": float64): per session
#: ``call_start`` (offsets into the calls); per call the others, with ``append_start`` (offsets
#: into ``seg`` / ``seg_tokens``) and ``tool_start`` (offsets into the ``tool_*`` columns)
_COLUMNS = {"call_start": "q", "turn": "q", "output_tokens": "q", "output_segment": "q", "gap_s": "d",
            "timestamp_s": "d", "latency_s": "d", "keep": "q", "append_start": "q", "seg": "q", "seg_tokens": "q",
            "tool_start": "q", "tool_name": "q", "tool_category": "q", "tool_duration": "d"}
_OFFSETS = ("call_start", "append_start", "tool_start")  # these start with a 0
_DTYPES = {"q": np.int64, "d": np.float64}


class _Builder:
    """Columns appended one session at a time (:meth:`TraceTable.from_sessions`)."""

    def __init__(self, may_share):
        self.may_share = may_share  # segment id -> whether another session may hold it (True when unsure)
        self.segs = _Strings()
        self.names: dict[str, int] = {}  # tool names and categories (few)
        self.session_ids: list[str] = []
        self.infos: list[SessionInfo] = []
        for name, code in _COLUMNS.items():
            setattr(self, name, array(code, [0] if name in _OFFSETS else []))
        self.holders = array("q")  # per session, the distinct globally interned segments it holds

    def add(self, session: Session) -> None:
        local: dict[str, int] = {}
        segs = self.segs
        may_share = self.may_share
        held: set[int] = set()

        def intern(s: str) -> int:
            if may_share(s):
                i = segs.add(s)
                held.add(i)
                return i
            return segs.add(s, local)

        self.session_ids.append(session.session_id)
        self.infos.append(session_info(session))
        prev: tuple = ()
        for c in session.calls:
            k = common_prefix_len(prev, c.prompt)
            self.keep.append(k)
            for s, n in c.prompt[k:]:
                self.seg.append(intern(s))
                self.seg_tokens.append(n)
            self.append_start.append(len(self.seg))
            self.turn.append(c.turn)
            self.output_tokens.append(c.output_tokens)
            self.output_segment.append(-1 if c.output_segment is None else intern(c.output_segment))
            self.gap_s.append(_NAN if c.gap_s is None else c.gap_s)
            self.timestamp_s.append(_NAN if c.timestamp_s is None else c.timestamp_s)
            self.latency_s.append(_NAN if c.latency_s is None else c.latency_s)
            for t in c.tools:
                self.tool_name.append(self.names.setdefault(t.name, len(self.names)))
                self.tool_category.append(self.names.setdefault(t.category, len(self.names)))
                self.tool_duration.append(t.duration_s)
            self.tool_start.append(len(self.tool_name))
            prev = sequence(c)
        self.call_start.append(len(self.turn))
        self.holders.extend(held)


def _np(a: array) -> np.ndarray:
    """A view of the array's buffer (no copy: the view keeps the array alive)."""
    return np.frombuffer(a, dtype=_DTYPES[a.typecode])


class _SessionsView(Sequence):
    """``table.sessions``: each ``Session`` built when asked (a slice gives a list)."""

    __slots__ = ("_table",)

    def __init__(self, table: "TraceTable"):
        self._table = table

    def __len__(self) -> int:
        return len(self._table.session_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._table.session(k) for k in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("session index out of range")
        return self._table.session(i)

    def __iter__(self) -> Iterator[Session]:
        return self._table.iter_sessions()


class TraceTable:
    """A trace in compact columns (see the module docstring). Build it with :func:`load_table`,
    :meth:`from_trace` or :meth:`from_sessions`; it pickles small (numpy arrays and one blob)."""

    __slots__ = ("header", "source", "rejected", "session_ids", "infos", *_COLUMNS, "_seg_blob", "_seg_offsets",
                 "_names", "_shared")

    @classmethod
    def from_sessions(cls, sessions: Iterable[Session], *, header: dict | None = None, source: str = "",
                      may_share=None, progress=None) -> "TraceTable":
        """A table of ``sessions`` (one pass). ``may_share(segment_id)``: False only for an id that no
        other session holds (e.g. ``TraceIndex.shared``); by default every id is interned globally.
        ``progress(sessions_done)`` is called every 1,000 sessions and at the end."""
        b = _Builder(may_share or (lambda _s: True))
        n = 0
        for n, s in enumerate(sessions, start=1):
            b.add(s)
            if progress is not None and n % 1000 == 0:
                progress(n)
        if progress is not None:
            progress(n)
        t = cls.__new__(cls)
        t.header = dict(header or {})
        t.source = source
        t.rejected = []
        t.session_ids = b.session_ids
        t.infos = b.infos
        for name in _COLUMNS:
            setattr(t, name, _np(getattr(b, name)))
        t._seg_blob, t._seg_offsets, global_ids = b.segs.freeze()
        t._names = list(b.names)  # in id order
        held = _np(b.holders)
        counts = np.bincount(held, minlength=len(t._seg_offsets) - 1)
        t._shared = frozenset(s for s, i in global_ids.items() if counts[i] > 1)
        return t

    @classmethod
    def from_trace(cls, trace: Trace) -> "TraceTable":
        return cls.from_sessions(trace.sessions, header=trace.header, source=trace.source)

    # ------------------------------------------------------------------ reading
    @property
    def sessions(self) -> _SessionsView:
        return _SessionsView(self)

    @property
    def num_calls(self) -> int:
        return len(self.turn)

    def calls(self) -> Iterator[Call]:
        for s in self.iter_sessions():
            yield from s.calls

    def shared(self, segment_id: str) -> bool:
        """Whether the sequences of two or more sessions hold ``segment_id`` (exact)."""
        return segment_id in self._shared

    def to_trace(self) -> Trace:
        return Trace(list(self.iter_sessions()), dict(self.header), self.source)

    def iter_sessions(self, limit: int | None = None) -> Iterator[Session]:
        n = len(self.session_ids) if limit is None else min(limit, len(self.session_ids))
        for i in range(n):
            yield self.session(i)

    def _text(self, j: int) -> str:
        """The segment id interned as ``j``."""
        return self._seg_blob[self._seg_offsets[j]:self._seg_offsets[j + 1]].decode()

    def first_prompts(self) -> list[tuple[tuple[str, int], ...]]:
        """Each session's first prompt, read from the columns (no session is built)."""
        start, text = self.append_start, self._text
        out = []
        for a in self.call_start[:-1].tolist():
            lo, hi = int(start[a]), int(start[a + 1])
            out.append(tuple((text(j), n) for j, n in zip(self.seg[lo:hi].tolist(), self.seg_tokens[lo:hi].tolist())))
        return out

    def session(self, i: int) -> Session:
        """Session ``i``, built from the columns (equal to ``load_trace``'s)."""
        a, b = int(self.call_start[i]), int(self.call_start[i + 1])
        names, decode = self._names, self._text
        text: dict[int, str] = {}  # (one string object per id in the session, as the reader gives)

        def seg_id(j: int) -> str:
            s = text.get(j)
            if s is None:
                s = text[j] = decode(j)
            return s

        sid = self.session_ids[i]
        keep = self.keep[a:b].tolist()
        lo = self.append_start[a:b + 1].tolist()
        segs = self.seg[lo[0]:lo[-1]].tolist()
        toks = self.seg_tokens[lo[0]:lo[-1]].tolist()
        base = lo[0]
        turn = self.turn[a:b].tolist()
        out = self.output_tokens[a:b].tolist()
        out_seg = self.output_segment[a:b].tolist()
        gap = self.gap_s[a:b].tolist()
        ts = self.timestamp_s[a:b].tolist()
        lat = self.latency_s[a:b].tolist()
        tl = self.tool_start[a:b + 1].tolist()
        tname = self.tool_name[tl[0]:tl[-1]].tolist()
        tcat = self.tool_category[tl[0]:tl[-1]].tolist()
        tdur = self.tool_duration[tl[0]:tl[-1]].tolist()
        tbase = tl[0]
        calls = []
        prev: tuple = ()
        for k in range(b - a):
            x, y = lo[k] - base, lo[k + 1] - base
            prompt = prev[:keep[k]] + tuple((seg_id(j), n) for j, n in zip(segs[x:y], toks[x:y]))
            tools = tuple(ToolCall(names[tname[m]], names[tcat[m]], tdur[m])
                          for m in range(tl[k] - tbase, tl[k + 1] - tbase))
            g, t, la = gap[k], ts[k], lat[k]
            c = Call(sid, turn[k], prompt, out[k], None if out_seg[k] < 0 else seg_id(out_seg[k]), tools,
                     None if g != g else g, None if t != t else t, None if la != la else la)
            calls.append(c)
            prev = sequence(c)
        return Session(sid, tuple(calls))

    def nbytes(self) -> int:
        """Bytes held by the columns and the id blob (not the per-session ids and infos)."""
        return sum(getattr(self, k).nbytes for k in _COLUMNS) + self._seg_offsets.nbytes + len(self._seg_blob)


def load_table(path, *, progress=None, columns_progress=None) -> TraceTable:
    """Read a trace file into a :class:`TraceTable`: ``load_trace``'s checks and errors.

    A file whose sessions' lines lie together is read twice (``traces.stream``: the index pass
    validates it and says which ids may be shared, the second pass fills the columns), so no
    more than one session is ever held as objects; a file whose sessions interleave is loaded
    whole first. ``progress(bytes_read, file_size)`` follows the first read;
    ``columns_progress(sessions_done, sessions)`` the filling of the columns."""
    index = index_trace(path, progress=progress)
    if index is None:
        trace = load_trace(path, progress=progress)
        total, sessions, kw = len(trace.sessions), trace.sessions, {"header": trace.header, "source": trace.source}
    else:
        total, sessions = len(index.sessions), iter_sessions(index)
        kw = {"header": index.header, "source": index.source, "may_share": index.shared}
    step = None if columns_progress is None else (lambda done: columns_progress(done, total))
    return TraceTable.from_sessions(sessions, progress=step, **kw)
