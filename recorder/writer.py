"""Append trace lines as calls finish, with a journal so that a crash loses only calls in flight.

A call's line is final only once the session's next call has arrived (its
``gap_s`` is the time until then), so the recorder holds each session's last
finished call. To lose nothing when the proxy dies, every finished call is
first appended to a journal, ``<trace>.pending``, as a valid line without its
gap; the final line goes to the trace when the gap is known (or when the
recording closes). Every write is one ``write`` of whole lines, flushed to the
operating system at once.

On a clean close the held calls are written and the journal removed. After a
crash the journal is still there: :func:`recover` (run by the next recording
on the same file, or ``cwsim record --recover``) appends the journal's calls
that the trace lacks (their gaps unknown, so they fall back to the tools'
durations) and removes it. A torn last line of the trace is cut off first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from traces.files import OutputPathError, ensure_parent
from traces.format import FORMAT_NAME, header_line
from traces.reader import check_call

__all__ = ["RecordingError", "TraceAppender", "journal_path", "recover"]


class RecordingError(ValueError):
    """A recording cannot start or go on (bad output file, bad option): one line for the user."""


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".pending")


def _line(d: dict, path: Path, lineno: int = 0) -> bytes:
    check_call(d, str(path), lineno)
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


def _cut_torn_tail(path: Path) -> None:
    """Drop a last line that a crash left without its newline."""
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _keys(path: Path) -> set[tuple[str, int]]:
    keys = set()
    with open(path, "rb") as f:
        for raw in f:
            try:
                d = json.loads(raw)
            except ValueError:
                continue
            if isinstance(d, dict) and "session_id" in d:
                keys.add((d.get("session_id"), d.get("turn")))
    return keys


def recover(path) -> int:
    """Append to the trace ``path`` the journal's calls it lacks; remove the journal. Returns their number."""
    path = Path(path)
    journal = journal_path(path)
    if not journal.exists():
        return 0
    if not path.exists():
        raise RecordingError(f"{journal}: journal of a recording whose trace {path} is gone (remove it or move the trace back)")
    _cut_torn_tail(path)
    have = _keys(path)
    lines = []
    with open(journal, "rb") as f:
        for raw in f:
            try:
                d = json.loads(raw)
            except ValueError:
                continue  # a torn last journal line: that call was in flight
            key = (d.get("session_id"), d.get("turn")) if isinstance(d, dict) else None
            if key is not None and key not in have:
                have.add(key)
                lines.append(_line(d, journal))
    if lines:
        with open(path, "ab") as f:
            f.write(b"".join(lines))
    journal.unlink()
    return len(lines)


class TraceAppender:
    """The output of one recording: a plain ``.jsonl`` trace and its journal.

    A new file gets ``header`` as its first line; an existing one is appended
    to only with ``append=True`` (and only if it is a trace: its first line a
    ``cwtrace`` header).
    """

    def __init__(self, path, header: dict, append: bool = False):
        self.path = Path(path)
        if self.path.name.endswith(".gz"):
            raise RecordingError(f"{self.path}: a recording is written as plain .jsonl (compress it afterwards)")
        try:
            ensure_parent(self.path)
        except OutputPathError as e:
            raise RecordingError(str(e)) from None
        self.recovered = recover(self.path)
        self.next_turns: dict[str, int] = {}  # sessions already in an appended file -> their next turn
        if self.path.exists() and self.path.stat().st_size > 0:
            if not append:
                raise RecordingError(f"{self.path}: exists (pass --append to add to it, or choose another -o)")
            with open(self.path, "rb") as f:
                first = f.readline()
            try:
                ok = json.loads(first).get("format") == FORMAT_NAME
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                raise RecordingError(f"{self.path}:1: format: not a cwtrace trace, will not append to it")
            _cut_torn_tail(self.path)
            for sid, turn in _keys(self.path):
                if isinstance(turn, int):
                    self.next_turns[sid] = max(self.next_turns.get(sid, 0), turn + 1)
            self._f = open(self.path, "ab")
        else:
            try:
                self._f = open(self.path, "wb")
            except OSError as e:
                raise RecordingError(f"{self.path}: cannot write ({e.strerror})") from None
            self._f.write(header_line(**header).encode() + b"\n")
            self._f.flush()
        self._journal = open(journal_path(self.path), "ab")
        self.written = 0

    def hold(self, d: dict) -> None:
        """Journal a finished call whose line is not final yet."""
        self._journal.write(_line(d, journal_path(self.path)))
        self._journal.flush()

    def write(self, d: dict) -> None:
        """Append a final call line."""
        self._f.write(_line(d, self.path))
        self._f.flush()
        self.written += 1

    def close(self) -> None:
        """Close both files and remove the journal (call after the held calls are written)."""
        if self._f.closed:
            return
        self._f.close()
        self._journal.close()
        os.unlink(journal_path(self.path))
