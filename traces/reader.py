"""Read and write trace format v1 and v2 files (``docs/trace-format.md``).

``load_trace`` validates every line by hand (plain ``json`` plus type checks,
no schema library) and reports the first problem as
``TraceFormatError("file:line: field: problem")``. With ``skip_bad=True`` bad
lines are skipped and recorded in ``Trace.rejected`` instead; a session whose
turns are not unique and contiguous from 0 (also when a skipped line caused
the hole) is dropped whole, with one more record for it. Nothing is dropped
without a record.

``write_trace`` writes ``.jsonl`` or ``.jsonl.gz`` (gzip with mtime 0, so the
bytes are deterministic) and validates each line the same way first, so what
it writes always loads.
"""

from __future__ import annotations

import gc
import gzip
import json
import math
import os
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from operator import itemgetter
from pathlib import Path

from traces.files import ensure_parent
from traces.format import FORMAT_NAME, FORMAT_VERSION, Call, Session, ToolCall, Trace, header_line

__all__ = ["MAX_CALL_TOKENS", "READ_VERSIONS", "TraceFormatError", "check_call", "compact_json", "load_trace", "sequence",
           "write_trace"]

#: lines between two calls of ``load_trace``'s ``progress``
PROGRESS_LINES = 4096

#: sessions whose last call ``write_trace`` keeps to write the next one compact (interleaved
#: sessions beyond it get full lines: still valid, only longer)
COMPACT_WINDOW = 4096

#: the format versions this reader reads: 1 (full prompts only), 2 (also the compact form)
READ_VERSIONS = (1, FORMAT_VERSION)

#: The most tokens one prompt (the sum of its segments) or one output may hold. Far above any
#: model's context; a larger count is a broken trace, and simulating it would hash blocks for ever.
MAX_CALL_TOKENS = 10_000_000


class TraceFormatError(ValueError):
    """A problem in a trace file: ``str(e) == f"{path}:{line}: {field}: {problem}"``.

    ``line`` is 1-based (0 for problems of the file as a whole); ``field`` is
    the JSON field (``prompt[3][1]``, ``tools[0].duration_s``), ``json`` for a
    line that is not a JSON object, ``turn`` for turn-ordering problems.
    """

    def __init__(self, path, line: int, field: str, problem: str):
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem
        # (the constructor's arguments, so that a copy made from them is equal: pickle, SimPy's re-raise)
        super().__init__(self.path, line, field, problem)

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.field}: {self.problem}"


class _Bad(Exception):
    """Internal: one field problem of one line (no path/line yet)."""

    def __init__(self, field: str, problem: str):
        super().__init__(field, problem)
        self.field = field
        self.problem = problem


_MISSING = object()
_second = itemgetter(1)


def _show(v) -> str:
    if v is _MISSING:
        return "nothing"
    try:
        s = json.dumps(v)
    except (TypeError, ValueError):
        s = repr(v)
    if len(s) > 40:
        s = s[:37] + "..."
    return f"{_type_name(v)} {s}"


_JSON_TYPES = {type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string",
               list: "array", dict: "object"}


def _type_name(v) -> str:
    """The JSON name of a parsed value's type (json.loads gives exact builtin types)."""
    return _JSON_TYPES.get(type(v), type(v).__name__)


def _number(v, field: str, nonneg: bool) -> float:
    """A finite JSON number (bool excluded), as float."""
    t = type(v)
    if t is int:
        try:
            f = float(v)
        except OverflowError:
            raise _Bad(field, f"number too large: {_show(v)}") from None
    elif t is float:
        if not math.isfinite(v):
            raise _Bad(field, f"expected a finite number, got {v!r}")
        f = v
    else:
        raise _Bad(field, f"expected a number, got {_show(v)}")
    if nonneg and f < 0:
        raise _Bad(field, f"expected a number >= 0, got {v!r}")
    return f


def _opt_number(d: dict, key: str, nonneg: bool) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    return _number(v, key, nonneg)


def _int(d: dict, key: str, minimum: int) -> int:
    v = d.get(key, _MISSING)
    if v is _MISSING:
        raise _Bad(key, "missing")
    if type(v) is not int or v < minimum:
        raise _Bad(key, f"expected an integer >= {minimum}, got {_show(v)}")
    return v


def _too_many(field: str, what: str, n: int) -> _Bad:
    return _Bad(field, f"{what} of {n:,} tokens exceeds the limit of {MAX_CALL_TOKENS:,} tokens per call")


_LIST, _TWO, _STR, _INT = {list}, {2}, {str}, {int}


def _prompt(v, key: str = "prompt") -> tuple[tuple[str, int], ...]:
    """A validated segment list: ``prompt`` (non-empty) or a compact call's ``append`` (may be empty)."""
    if v is _MISSING:
        raise _Bad(key, "missing")
    if type(v) is not list:
        raise _Bad(key, f"expected an array of [segment_id, n_tokens] pairs, got {_show(v)}")
    if not v:
        if key == "append":
            return ()
        raise _Bad(key, "empty (a call has at least one prompt segment)")
    # Fast path: C-level checks over the whole list (prompts are long).
    if set(map(type, v)) == _LIST and set(map(len, v)) == _TWO:
        out = tuple(map(tuple, v))
        segs, ns = zip(*out)
        if set(map(type, segs)) == _STR and set(map(type, ns)) == _INT and min(ns) >= 1 and "" not in segs:
            if (total := sum(ns)) > MAX_CALL_TOKENS:
                raise _too_many(key, "a prompt", total)
            return out
    # Slow path: find and name the first bad pair.
    out = []
    append = out.append
    for i, p in enumerate(v):
        if type(p) is list and len(p) == 2:
            s, n = p
            if type(s) is str and s and type(n) is int and n >= 1:
                append((s, n))
                continue
            if type(s) is not str or not s:
                raise _Bad(f"{key}[{i}][0]", f"expected a non-empty string segment id, got {_show(s)}")
            raise _Bad(f"{key}[{i}][1]", f"expected an integer n_tokens >= 1, got {_show(n)}")
        raise _Bad(f"{key}[{i}]", f"expected a [segment_id, n_tokens] pair, got {_show(p)}")
    if (total := sum(n for _, n in out)) > MAX_CALL_TOKENS:
        raise _too_many(key, "a prompt", total)
    return tuple(out)


def _tools(v) -> tuple[ToolCall, ...]:
    if v is None:
        return ()
    if type(v) is not list:
        raise _Bad("tools", f"expected an array of tool objects, got {_show(v)}")
    out = []
    for i, t in enumerate(v):
        where = f"tools[{i}]"
        if type(t) is not dict:
            raise _Bad(where, f"expected an object, got {_show(t)}")
        name = t.get("name", _MISSING)
        if name is _MISSING:
            raise _Bad(f"{where}.name", "missing")
        if type(name) is not str or not name:
            raise _Bad(f"{where}.name", f"expected a non-empty string, got {_show(name)}")
        category = t.get("category", "other")
        if type(category) is not str:
            raise _Bad(f"{where}.category", f"expected a string, got {_show(category)}")
        dur = t.get("duration_s", _MISSING)
        if dur is _MISSING:
            raise _Bad(f"{where}.duration_s", "missing")
        out.append(ToolCall(name, category, _number(dur, f"{where}.duration_s", True)))
    return tuple(out)


def _parse_call(d) -> Call:
    """Validate one decoded full-form call line; raise ``_Bad`` naming the field."""
    call, extends = _parse_line(d)
    if extends is not None:
        raise _Bad("extends", "a compact call line needs the session's previous call (the reader resolves it)")
    return call


def _parse_line(d) -> tuple[Call, int | None]:
    """Validate one decoded call line; raise ``_Bad`` naming the field.

    Returns ``(call, None)`` for the full form and ``(call, k)`` for the compact form
    (``extends: k``): then ``call.prompt`` holds only the appended segments, and
    :func:`_resolve` puts the previous call's first ``k`` segments before them.
    """
    if type(d) is not dict:
        raise _Bad("json", f"expected a JSON object, got {_type_name(d)}")
    sid = d.get("session_id", _MISSING)
    if sid is _MISSING:
        if "format" in d:
            raise _Bad("format", "a header line is allowed only as the first non-blank line")
        raise _Bad("session_id", "missing")
    if type(sid) is not str or not sid:
        raise _Bad("session_id", f"expected a non-empty string, got {_show(sid)}")
    turn = _int(d, "turn", 0)
    extends = d.get("extends", _MISSING)
    if extends is _MISSING:
        prompt = _prompt(d.get("prompt", _MISSING))
        extends = None
    else:
        if "prompt" in d:
            raise _Bad("extends", "give either prompt (full form) or extends + append (compact form), not both")
        if type(extends) is not int or extends < 0:
            raise _Bad("extends", f"expected an integer >= 0 (segments kept from the previous call), got {_show(extends)}")
        if turn == 0:
            raise _Bad("extends", "turn 0 has no previous call to extend; give its prompt")
        prompt = _prompt(d.get("append", []), "append")
        if extends == 0 and not prompt:
            raise _Bad("append", "empty with extends 0 (a call has at least one prompt segment)")
    output_tokens = _int(d, "output_tokens", 1)
    if output_tokens > MAX_CALL_TOKENS:
        raise _too_many("output_tokens", "an output", output_tokens)
    out_seg = d.get("output_segment")
    if out_seg is not None and (type(out_seg) is not str or not out_seg):
        raise _Bad("output_segment", f"expected a non-empty string or null, got {_show(out_seg)}")
    tools = _tools(d.get("tools"))
    return Call(
        sid,
        turn,
        prompt,
        output_tokens,
        out_seg,
        tools,
        _opt_number(d, "gap_s", True),
        _opt_number(d, "timestamp_s", False),
        _opt_number(d, "latency_s", True),
    ), extends


def sequence(call: Call) -> tuple[tuple[str, int], ...]:
    """A call's prompt, then its output as a segment when it has an ``output_segment``:
    what a compact line's ``extends`` counts segments of."""
    if call.output_segment is None:
        return call.prompt
    return (*call.prompt, (call.output_segment, call.output_tokens))


def _resolve(call: Call, extends: int, prev: Call) -> Call:
    """The full call of a compact line (``_Bad`` naming the field if it does not fit ``prev``)."""
    base = sequence(prev)
    if extends > len(base):
        raise _Bad("extends", f"{extends} segments, but the previous call (turn {prev.turn}) has {len(base)} "
                              "(prompt + output segment)")
    prompt = base[:extends] + call.prompt if extends < len(base) else base + call.prompt
    if (total := sum(map(_second, prompt))) > MAX_CALL_TOKENS:
        raise _too_many("append", "a prompt", total)
    return Call(call.session_id, call.turn, prompt, call.output_tokens, call.output_segment, call.tools,
                call.gap_s, call.timestamp_s, call.latency_s)


def compact_json(call: Call, prev: Call | None) -> dict:
    """``call`` as a line: the compact form (``extends`` + ``append``) when ``prev`` is the
    session's previous call and the prompt starts with at least one of its segments, else the
    full form."""
    d = call.to_json()
    if prev is None or prev.turn != call.turn - 1 or prev.session_id != call.session_id:
        return d
    base, prompt = sequence(prev), call.prompt
    k = len(base)
    if not (len(prompt) >= k and prompt[:k] == base):
        k = 0
        for a, b in zip(base, prompt):
            if a != b:
                break
            k += 1
    if k == 0:
        return d
    del d["prompt"]
    out = {"session_id": d.pop("session_id"), "turn": d.pop("turn"), "extends": k,
           "append": [[s, n] for s, n in prompt[k:]]}
    out.update(d)
    return out


def check_call(d, path="", line: int = 0) -> Call:
    """Validate one decoded call line exactly as :func:`load_trace` does (for writers
    that append line by line); ``TraceFormatError(path, line, field, problem)`` otherwise."""
    try:
        return _parse_call(d)
    except _Bad as b:
        raise TraceFormatError(path, line, b.field, b.problem) from None


def _check_header(d: dict) -> None:
    fmt = d.get("format")
    if fmt != FORMAT_NAME:
        raise _Bad("format", f"expected {FORMAT_NAME!r}, got {_show(fmt)}")
    version = d.get("version", _MISSING)
    if type(version) is not int or version not in READ_VERSIONS:
        raise _Bad("version", f"unsupported version {_show(version)} (this reader reads versions "
                              f"{', '.join(map(str, READ_VERSIONS))})")


def _is_gz(path: Path) -> bool:
    return path.name.endswith(".gz")


def load_trace(path, *, skip_bad: bool = False, progress=None) -> Trace:
    """Read and validate a ``.jsonl`` / ``.jsonl.gz`` trace file.

    Strict (default): the first problem raises ``TraceFormatError``.
    ``skip_bad=True``: bad lines are skipped and recorded in
    ``trace.rejected``; sessions with turn problems are dropped whole, with
    one record each. A missing file raises ``FileNotFoundError``; a trace
    with no (valid) calls raises ``TraceFormatError(path, 0, "trace", ...)``.
    Header errors (wrong format or version) always raise. ``progress(bytes_read,
    file_size)``, if given, is called every ``PROGRESS_LINES`` lines (bytes of the file
    on disk, compressed for ``.gz``).
    """
    # Parsing allocates many small containers that all survive; the cyclic
    # GC would rescan them over and over (~25% of the time) for nothing.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _load(path, skip_bad, progress)
    finally:
        if gc_was_enabled:
            gc.enable()


class _Lines:
    """The call lines of one trace file, each validated: iterating yields ``(lineno, call, extends)``
    (``extends``: None for a full-form line; else the call's prompt holds only its appended
    segments). A bad line goes to ``reject`` (which raises, or records and goes on); the header,
    if any, lands in ``header``; ``n_lines`` counts the call lines (bad ones too), and
    ``rejected_lines_of[session_id]`` the bad lines that named a session. File-level problems
    raise ``TraceFormatError`` naming the file."""

    def __init__(self, path, reject, progress=None):
        self.path = Path(path)
        self.src = str(path)
        self.reject = reject
        self.progress = progress
        self.header: dict = {}
        self.n_lines = 0
        self.rejected_lines_of: dict[str, list[int]] = {}

    def __iter__(self):
        p, src, reject, progress = self.path, self.src, self.reject, self.progress
        first = True
        try:
            with open(p, "rb") as disk, (gzip.GzipFile(fileobj=disk, mode="rb") if _is_gz(p) else disk) as f:
                size = os.fstat(disk.fileno()).st_size
                for lineno, raw in enumerate(f, 1):
                    if progress is not None and not lineno % PROGRESS_LINES:
                        progress(disk.tell(), size)
                    if not raw.strip():
                        continue
                    try:
                        d = json.loads(raw)
                    except (ValueError, RecursionError) as e:
                        first = False
                        self.n_lines += 1
                        reject(TraceFormatError(src, lineno, "json", f"not valid JSON ({e})"))
                        continue
                    if first:
                        first = False
                        if type(d) is dict and "format" in d:
                            try:
                                _check_header(d)
                            except _Bad as b:
                                raise TraceFormatError(src, lineno, b.field, b.problem) from None
                            self.header = d
                            continue
                    self.n_lines += 1
                    try:
                        call, extends = _parse_line(d)
                    except _Bad as b:
                        if type(d) is dict:
                            sid = d.get("session_id")
                            if type(sid) is str and sid:
                                self.rejected_lines_of.setdefault(sid, []).append(lineno)
                        reject(TraceFormatError(src, lineno, b.field, b.problem))
                        continue
                    yield lineno, call, extends
        except (gzip.BadGzipFile, EOFError, UnicodeDecodeError, zlib.error) as e:
            raise TraceFormatError(src, 0, "gzip" if _is_gz(p) else "file", f"unreadable ({e})") from None
        except IsADirectoryError:
            raise TraceFormatError(src, 0, "file", "is a folder, not a trace file (.jsonl or .jsonl.gz)") from None
        except NotADirectoryError:
            raise TraceFormatError(src, 0, "file", "a parent of this path is a file, not a folder") from None
        except PermissionError as e:
            raise TraceFormatError(src, 0, "file", f"cannot be read ({e.strerror})") from None


def _duplicate(src: str, turns: dict, lineno: int, call: Call) -> TraceFormatError | None:
    """The error of a line repeating a turn its session already has (None if it is new)."""
    prev = turns.get(call.turn)
    if prev is None:
        return None
    return TraceFormatError(src, lineno, "turn", f"duplicate turn {call.turn} of session {call.session_id!r} "
                                                 f"(first at line {prev[0]})")


def _assemble(src: str, sid: str, turns: dict[int, tuple[int, Call, int | None]], rejected_lines: list[int] | None
              ) -> tuple[Call, ...]:
    """One session's calls in turn order, compact lines resolved; ``TraceFormatError`` when its
    turns are not exactly 0..n-1 or a compact line does not fit the call before it."""
    ordered = sorted(turns)
    missing = next((i for i, t in enumerate(ordered) if t != i), None)
    if missing is not None:
        note = ""
        if rejected_lines:
            note = "; rejected line(s) of this session: " + ", ".join(map(str, rejected_lines))
        raise TraceFormatError(src, turns[ordered[missing]][0], "turn", f"turn {missing} of session {sid!r} is "
                                                                        f"missing (session has turns {_ranges(ordered)}){note}")
    calls: list[Call] = []
    for t in ordered:
        lineno, call, extends = turns[t]
        if extends is not None:
            try:
                call = _resolve(call, extends, calls[-1])
            except _Bad as b:
                raise TraceFormatError(src, lineno, b.field, b.problem) from None
        calls.append(call)
    return tuple(calls)


def _load(path, skip_bad: bool, progress=None) -> Trace:
    src = str(path)
    rejected: list[TraceFormatError] = []

    def reject(err: TraceFormatError) -> None:
        if not skip_bad:
            raise err
        rejected.append(err)

    lines = _Lines(path, reject, progress)
    # session_id -> {turn: (line, Call, extends)}, in order of first appearance
    sessions: dict[str, dict[int, tuple[int, Call, int | None]]] = {}
    bad_sessions: dict[str, TraceFormatError] = {}
    for lineno, call, extends in lines:
        turns = sessions.get(call.session_id)
        if turns is None:
            turns = sessions[call.session_id] = {}
        err = _duplicate(src, turns, lineno, call)
        if err is not None:
            if not skip_bad:
                raise err
            bad_sessions.setdefault(call.session_id, err)
            continue
        turns[call.turn] = (lineno, call, extends)
    if lines.n_lines == 0:
        raise TraceFormatError(src, 0, "trace", "no calls")

    gap_errors: list[TraceFormatError] = []
    out: list[Session] = []
    for sid, turns in sessions.items():
        if sid in bad_sessions:
            continue
        try:
            out.append(Session(sid, _assemble(src, sid, turns, lines.rejected_lines_of.get(sid))))
        except TraceFormatError as e:
            gap_errors.append(e)
            bad_sessions[sid] = e

    if gap_errors and not skip_bad:
        raise min(gap_errors, key=lambda e: e.line)
    if skip_bad:
        for sid, err in bad_sessions.items():
            rejected.append(
                TraceFormatError(err.path, err.line, err.field, err.problem + f"; session {sid!r} dropped")
            )
        rejected.sort(key=lambda e: e.line)
        if not out:
            first_err = f"; first: {rejected[0]}" if rejected else ""
            raise TraceFormatError(src, 0, "trace", f"no valid calls ({len(rejected)} rejected{first_err})")
    return Trace(sessions=out, header=lines.header, source=src, rejected=rejected)


def _ranges(turns: list[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    parts = []
    i = 0
    while i < len(turns):
        j = i
        while j + 1 < len(turns) and turns[j + 1] == turns[j] + 1:
            j += 1
        parts.append(str(turns[i]) if i == j else f"{turns[i]}-{turns[j]}")
        i = j + 1
    return ", ".join(parts)


def write_trace(path, calls: Iterable[Call], header: dict | None = None, *, compact: bool = True) -> int:
    """Write calls (and a header) to ``.jsonl`` or ``.jsonl.gz``.

    ``compact`` (default): format version 2, a call that starts with segments of its session's
    previous call (the call just before it among the last ``COMPACT_WINDOW`` sessions written)
    is written in the compact form (``extends`` + ``append``), and the header line is written
    also when ``header`` is None. ``compact=False``: version 1, every prompt in full, a header
    only when given. Each call is validated like ``load_trace`` does before it is written
    (``TraceFormatError`` naming the line otherwise; nothing is left at ``path`` then). Gzip
    output uses mtime 0 and no file name, so equal input gives equal bytes. Makes the folder
    if needed, writes to a temporary file and renames it into place. Returns the number of
    calls written.
    """
    p = ensure_parent(path)
    src = str(path)
    tmp = p.with_name(p.name + ".tmp")
    n = 0
    try:
        with open(tmp, "wb") as raw:
            f = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if _is_gz(p) else raw
            try:
                lineno = 0
                if header is not None or compact:
                    line = header_line(**{"version": FORMAT_VERSION if compact else 1, **(header or {})})
                    lineno += 1
                    try:
                        _check_header(json.loads(line))
                    except _Bad as b:
                        raise TraceFormatError(src, lineno, b.field, b.problem) from None
                    f.write(line.encode() + b"\n")
                last: OrderedDict[str, Call] = OrderedDict()  # the previous call of recent sessions
                for call in calls:
                    lineno += 1
                    d = call.to_json()
                    try:
                        _parse_call(d)
                    except _Bad as b:
                        raise TraceFormatError(src, lineno, b.field, b.problem) from None
                    if compact:
                        d = compact_json(call, last.pop(call.session_id, None))
                        last[call.session_id] = call
                        if len(last) > COMPACT_WINDOW:
                            last.popitem(last=False)
                    f.write(json.dumps(d, separators=(",", ":")).encode() + b"\n")
                    n += 1
            finally:
                if f is not raw:
                    f.close()
        os.replace(tmp, p)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return n
