"""A trace read as a stream of sessions, in bounded memory.

``load_trace`` holds every call of a trace at once. A simulation needs only the
sessions it is running, so a big trace is read twice instead:

1. :func:`index_trace` validates every line exactly as ``load_trace`` does
   (the same errors, strict) and keeps per session only what a run must know
   before its first step (:class:`SessionInfo`: calls, recorded start, largest
   call, the start of its first prompt), and which segment ids more than one
   session uses (:meth:`TraceIndex.shared`).
2. :func:`iter_sessions` reads the file again and yields its sessions one at a
   time, in file order, each a ``Session`` equal to ``load_trace``'s.

Streaming needs each session's lines together in the file (in any turn order),
as ``write_trace``, ``cwsim synth`` and the importers write them; for a file
whose sessions interleave :func:`index_trace` returns None (load it whole).

What "shared" means: a segment id that the sequences (prompts and output
segments) of two or more sessions hold. A segment no other session holds can
never be part of another session's prefix, so once its session has ended,
nothing is requested from it again. Segment ids are fingerprinted with
Python's string hash (this process's: an index is not sent to another
process); two ids with one fingerprint only make a private segment look shared.
"""

from __future__ import annotations

import gc
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from traces.format import Session
from traces.reader import TraceFormatError, _assemble, _duplicate, _Lines, sequence
from traces.sequences import common_prefix_len

__all__ = ["FIRST_PROMPT_SEGMENTS", "SessionInfo", "TraceIndex", "index_trace", "iter_sessions", "num_calls",
           "segment_ids", "session_info"]

#: how many leading segments of its first prompt an index keeps per session
FIRST_PROMPT_SEGMENTS = 8


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """What an index keeps of one session."""

    session_id: str
    calls: int
    start_s: float | None  # turn 0's timestamp
    largest_turn: int  # the call holding the most KV at its last step (the first such)
    largest_tokens: int  # its prompt + output - 1 tokens
    first_prompt: tuple[tuple[str, int], ...]  # turn 0's first FIRST_PROMPT_SEGMENTS segments


def session_info(session: Session) -> SessionInfo:
    turn, tokens = 0, -1
    for c in session.calls:
        n = c.prompt_tokens + c.output_tokens - 1
        if n > tokens:
            turn, tokens = c.turn, n
    first = session.calls[0]
    return SessionInfo(session.session_id, len(session.calls), first.timestamp_s, turn, tokens,
                       first.prompt[:FIRST_PROMPT_SEGMENTS])


def segment_ids(session: Session) -> set[str]:
    """The distinct segment ids of a session's sequences (prompts and output segments)."""
    ids: set[str] = set()
    prev: tuple = ()
    for c in session.calls:
        seq = sequence(c)
        ids.update(s for s, _ in seq[common_prefix_len(prev, seq):])  # agents' prompts grow: only the new tail
        prev = seq
    return ids


@dataclass(slots=True, eq=False)
class TraceIndex:
    """One validating pass over a trace file (:func:`index_trace`)."""

    path: Path
    header: dict
    sessions: list[SessionInfo]
    #: fingerprints (``hash``) of the segment ids that two or more sessions hold
    shared_fingerprints: frozenset[int] = field(default_factory=frozenset)

    @property
    def source(self) -> str:
        return str(self.path)

    @property
    def num_calls(self) -> int:
        return sum(s.calls for s in self.sessions)

    def shared(self, segment_id: str) -> bool:
        """Whether another session may hold this segment too (True when unsure)."""
        return hash(segment_id) in self.shared_fingerprints

    def __getstate__(self):
        raise TypeError("a TraceIndex holds this process's string hashes: index the file again in the other process")


def num_calls(trace, limit: int | None = None) -> int:
    """Calls of the first ``limit`` sessions (all: None) of a ``Trace`` or a :class:`TraceIndex`."""
    sessions = trace.sessions[:limit] if limit is not None else trace.sessions
    if isinstance(trace, TraceIndex):
        return sum(s.calls for s in sessions)
    return sum(len(s.calls) for s in sessions)


def shared_fingerprints(per_session: array) -> frozenset[int]:
    """Fingerprints that occur in two or more sessions, from each session's distinct ones (concatenated)."""
    if not len(per_session):
        return frozenset()
    a = np.frombuffer(per_session, dtype=np.int64)  # a view of the array's own buffer, sorted in place
    a.sort()
    return frozenset(a[1:][a[1:] == a[:-1]].tolist())


def index_trace(path, *, progress=None) -> TraceIndex | None:
    """Validate a trace file and index its sessions (see the module's docstring).

    Raises what ``load_trace(path)`` raises, for the same files, with the same message. Returns
    None, having read only up to there, when a session's lines come back after another session's
    (the file cannot be streamed). ``progress(bytes_read, file_size)`` as for ``load_trace``.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()  # (as load_trace: many small containers survive a while)
    try:
        return _index(path, progress)
    finally:
        if gc_was_enabled:
            gc.enable()


def _raise(err: TraceFormatError) -> None:
    raise err


def _index(path, progress) -> TraceIndex | None:
    src = str(path)
    lines = _Lines(path, _raise, progress)
    infos: list[SessionInfo] = []
    fingerprints = array("q")
    errors: list[TraceFormatError] = []
    seen: set[str] = set()

    def close(sid: str, turns: dict) -> None:
        try:
            session = Session(sid, _assemble(src, sid, turns, lines.rejected_lines_of.get(sid)))
        except TraceFormatError as e:  # (as load_trace: such errors come after every line's own)
            errors.append(e)
            return
        infos.append(session_info(session))
        fingerprints.extend(map(hash, segment_ids(session)))

    current, turns = None, {}
    for lineno, call, extends in lines:
        sid = call.session_id
        if sid != current:
            if sid in seen:
                return None
            if current is not None:
                close(current, turns)
            seen.add(sid)
            current, turns = sid, {}
        err = _duplicate(src, turns, lineno, call)
        if err is not None:
            raise err
        turns[call.turn] = (lineno, call, extends)
    if lines.n_lines == 0:
        raise TraceFormatError(src, 0, "trace", "no calls")
    close(current, turns)
    if errors:
        raise min(errors, key=lambda e: e.line)
    return TraceIndex(Path(path), lines.header, infos, shared_fingerprints(fingerprints))


def iter_sessions(index: TraceIndex, limit: int | None = None) -> Iterator[Session]:
    """The indexed file's sessions (the first ``limit``), read again one at a time, in file order.

    ``TraceFormatError`` naming the file if it no longer matches its index."""
    src = index.source
    n = len(index.sessions) if limit is None else min(limit, len(index.sessions))
    if n == 0:
        return
    k = 0
    current, turns = None, {}

    def changed(lineno: int) -> TraceFormatError:
        return TraceFormatError(src, lineno, "file", "changed since it was indexed (sessions or lines differ)")

    def assemble(sid: str, turns: dict, lineno: int) -> Session:
        session = Session(sid, _assemble(src, sid, turns, None))
        if len(session.calls) != index.sessions[k].calls:
            raise changed(lineno)
        return session

    lineno = 0
    for lineno, call, extends in _Lines(index.path, _raise):
        sid = call.session_id
        if sid != current:
            if current is not None:
                yield assemble(current, turns, lineno)
                k += 1
                if k == n:
                    return
            if sid != index.sessions[k].session_id:
                raise changed(lineno)
            current, turns = sid, {}
        turns[call.turn] = (lineno, call, extends)
    if current is not None:
        yield assemble(current, turns, lineno)
        k += 1
    if k != n:
        raise changed(lineno)
