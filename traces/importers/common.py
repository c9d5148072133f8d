"""What the importers share: the report, finding and reading source files, the CLI.

Every importer module exposes the same surface (used by
:func:`traces.importers.run_import`):

* ``find(sources) -> list[Path]``: the files to convert (folders searched),
* ``convert(paths, progress=None) -> (calls, report)``, the report an
  :class:`ImportReport`,
* ``header() -> dict``: the provenance header of a converted trace,

and a ``main(argv)`` built on :func:`importer_main`. The format logic (how a
source becomes calls) stays in each importer.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from traces.format import Call
from traces.reader import write_trace

__all__ = [
    "ImportReport",
    "LineReport",
    "Reject",
    "SessionFileReport",
    "basic_figures",
    "category_rows",
    "chain_id",
    "content_text",
    "convert_files",
    "find_files",
    "headline_figures",
    "importer_main",
    "load_json_object",
    "median",
    "message_text",
    "parse_json",
    "read_lines",
    "sessions_of",
    "split_total",
    "turn_pairs",
]

PROGRESS_EVERY = 4096  # lines between two progress calls

Row = tuple[str, Any]
R = TypeVar("R", bound="SessionFileReport")


class Reject(Exception):
    """A malformed input (a file or a row): rejected with this reason."""


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport:
    """What an import read, made and rejected (the part every importer has).

    An importer's report subclasses this with its own counters and adds its
    rows with the hooks :meth:`input_rows` (after "files read"),
    :meth:`extra_rows` (after the rejected count) and :meth:`extra_lines`
    (after the rejected list).
    """

    files_read: int = 0
    sessions: int = 0
    calls: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file or "file:line", reason)
    figures: dict = field(default_factory=dict)

    rejected_label: ClassVar[str] = "rejected files"
    sessions_label: ClassVar[str] = "sessions"
    max_rejected: ClassVar[int | None] = None  # rejections listed by render() (None: all)

    def input_rows(self) -> list[Row]:
        return []

    def extra_rows(self) -> list[Row]:
        return []

    def extra_lines(self) -> list[str]:
        return []

    def render(self, max_rejected: int | None = None) -> str:
        limit = self.max_rejected if max_rejected is None else max_rejected
        rows: list[Row] = [
            ("files read", self.files_read),
            *self.input_rows(),
            (self.sessions_label, self.sessions),
            ("calls", self.calls),
            (self.rejected_label, len(self.rejected)),
            *self.extra_rows(),
        ]
        rows += [(k, v) for k, v in self.figures.items() if k not in ("sessions", "calls")]
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        shown = self.rejected if limit is None else self.rejected[:limit]
        lines += [f"rejected: {where}: {reason}" for where, reason in shown]
        if len(self.rejected) > len(shown):
            lines.append(f"rejected: ... and {len(self.rejected) - len(shown)} more")
        lines += self.extra_lines()
        return "\n".join(lines)


@dataclass
class SessionFileReport(ImportReport):
    """Report of an importer that reads one session per file (:func:`convert_files`)."""

    empty: list[str] = field(default_factory=list)  # well-formed files without LLM calls

    def extra_rows(self) -> list[Row]:
        return [("files without LLM calls (skipped)", len(self.empty))]

    def extra_lines(self) -> list[str]:
        return [f"skipped (no LLM calls): {path}" for path in self.empty]


@dataclass
class LineReport(ImportReport):
    """Report of an importer of one row per line (:func:`read_lines`)."""

    lines_read: int = 0

    rejected_label: ClassVar[str] = "rejected rows"
    max_rejected: ClassVar[int | None] = 20

    def input_rows(self) -> list[Row]:
        return [("lines read", self.lines_read)]


def category_rows(counts: Counter, categories: Iterable[str]) -> list[Row]:
    """``tools: <category>`` rows, in the order of ``categories``, for the ones seen."""
    return [(f"tools: {cat}", counts[cat]) for cat in categories if counts.get(cat)]


# --------------------------------------------------------------------------- finding and reading


def find_files(sources: Iterable[str | Path], suffixes: str | tuple[str, ...], recursive: bool = True) -> list[Path]:
    """Files named, and the files whose names end with ``suffixes`` in folders
    named (searched recursively unless ``recursive`` is false), each folder's
    sorted; in the order of ``sources``."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = p.rglob("*") if recursive else p.glob("*")
            out.extend(sorted(q for q in found if q.name.endswith(suffixes)))
        else:
            out.append(p)
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def convert_files(
    paths: Iterable[str | Path],
    load: Callable[[Path], tuple[str, Any]],
    convert_session: Callable[[Path, Any, dict, Any], list[Call]],
    report: R,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Call], R]:
    """Convert files holding one session each into calls, in input order, and
    fill ``report`` (a :class:`SessionFileReport`; figures: :func:`headline_figures`).

    ``load(path) -> (session id, data)`` and ``convert_session(path, data,
    shared, report) -> calls`` (``shared``: a dict kept over all files, e.g.
    the token counts of segments that sessions share) raise :class:`Reject`
    for a malformed file, which is then rejected whole (``report.rejected``
    names it and says why) and the others still converted; a second file with
    a session id already seen is rejected too. A file without calls is
    listed in ``report.empty``. ``progress`` (optional) gets the number of
    bytes of the files done so far.
    """
    calls: list[Call] = []
    seen: set[str] = set()
    shared: dict = {}
    done = 0
    for p in paths:
        path = Path(p)
        report.files_read += 1
        try:
            sid, data = load(path)
            if sid in seen:
                raise Reject(f"duplicate session id {sid!r}")
            session_calls = convert_session(path, data, shared, report)
        except Reject as e:
            report.rejected.append((str(path), str(e)))
        else:
            seen.add(sid)
            if session_calls:
                report.sessions += 1
                report.calls += len(session_calls)
                calls.extend(session_calls)
            else:
                report.empty.append(str(path))
        if progress is not None:
            done += _size(path)
            progress(done)
    report.figures = headline_figures(calls)
    return calls, report


def read_lines(
    paths: Iterable[str | Path],
    report: ImportReport,
    row: Callable[[int, int, bytes], None],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Call ``row(file index, line number, line)`` for every non-blank line of
    the files, in order (gzip detected by its magic bytes).

    A ``row`` that raises :class:`Reject` rejects that line
    (``report.rejected`` gets ``("file:line", reason)``); an unreadable file
    is rejected as ``file:0``, and a file that breaks off (a truncated gzip)
    from the line where it broke. ``progress``, when given, is called now and
    then (and at the end of each file) with the number of source bytes read so
    far over all files (compressed bytes for gzip).
    """
    done = 0
    for idx, src in enumerate(paths):
        path = Path(src)
        report.files_read += 1
        try:
            raw = open(path, "rb")
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
        except OSError as e:
            report.rejected.append((f"{path}:0", f"unreadable ({e.strerror or e})"))
            continue
        with raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            lineno = 0
            try:
                for line in f:
                    lineno += 1
                    if progress is not None and lineno % PROGRESS_EVERY == 0:
                        progress(done + raw.tell())
                    if not line.strip():
                        continue
                    try:
                        row(idx, lineno, line)
                    except Reject as e:
                        report.rejected.append((f"{path}:{lineno}", str(e)))
            except (OSError, EOFError) as e:
                report.rejected.append((f"{path}:{lineno + 1}", f"unreadable from here on ({e})"))
            finally:
                done += raw.tell()
                if f is not raw:
                    f.close()
        if progress is not None:
            progress(done)


def parse_json(raw: bytes | str):
    """``json.loads``, a :class:`Reject` for text that is not JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise Reject(f"not valid JSON ({e})") from None


def load_json_object(path: Path) -> dict:
    """The JSON object a file holds (:class:`Reject` if unreadable, not JSON or not an object)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise Reject(f"unreadable ({e.strerror or e})") from None
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise Reject("not a JSON object")
    return data


# --------------------------------------------------------------------------- figures


def sessions_of(calls: Iterable[Call]) -> dict[str, list[Call]]:
    """Calls by session id (sessions in order of their first call), each session's in turn order."""
    out: dict[str, list[Call]] = {}
    for c in calls:
        out.setdefault(c.session_id, []).append(c)
    for sc in out.values():
        sc.sort(key=lambda c: c.turn)
    return out


def turn_pairs(sessions: Mapping[str, list[Call]]) -> Iterator[tuple[Call, Call]]:
    """``(previous call, call)`` for every call but the first of each session."""
    for sc in sessions.values():
        yield from zip(sc, sc[1:])


def split_total(total: int, weights: list[int]) -> list[int]:
    """``total`` split over ``weights`` (largest remainder), each >= 1;
    requires ``total >= len(weights)``."""
    n = len(weights)
    extra = total - n
    wsum = sum(weights)
    if wsum <= 0:
        weights = [1] * n
        wsum = n
    shares = [extra * w / wsum for w in weights]
    base = [int(s) for s in shares]
    left = extra - sum(base)
    order = sorted(range(n), key=lambda i: (-(shares[i] - base[i]), i))
    for i in order[:left]:
        base[i] += 1
    return [1 + b for b in base]


def median(xs: Sequence[float]) -> float:
    """The median, 0 for no values."""
    return statistics.median(xs) if xs else 0


def basic_figures(session_lengths: Sequence[int], prompts: Sequence[int], outputs: Sequence[int]) -> dict:
    """The first headline figures of every importer: sessions, calls and medians."""
    return {
        "sessions": len(session_lengths),
        "calls": len(prompts),
        "median calls/session": median(session_lengths),
        "median prompt tokens": median(prompts),
        "median output tokens": median(outputs),
    }


def headline_figures(calls: Sequence[Call]) -> dict:
    """Headline figures of a converted agent trace (medians over calls/sessions): the
    figures of the mini-swe-agent, SWE-agent and LMCache agent-trace importers."""
    sessions = sessions_of(calls)
    shares = [_reuse_share(prev, cur) for prev, cur in turn_pairs(sessions)]
    durations = [t.duration_s for c in calls for t in c.tools if t.category != "submit"]
    return {
        **basic_figures([len(v) for v in sessions.values()], [c.prompt_tokens for c in calls],
                        [c.output_tokens for c in calls]),
        "median tool duration s": round(median(durations), 3),
        "median reuse share (prev prompt + answer)": round(median(shares), 4),
        "mean reuse share (prev prompt + answer)": round(statistics.fmean(shares), 4) if shares else 0,
    }


def _reuse_share(prev: Call, cur: Call) -> float:
    """Share of ``cur``'s prompt tokens that are ``prev``'s prompt followed by
    ``prev``'s answer (token identity = (segment, position))."""
    shared = 0
    k = 0
    for (a, na), (b, nb) in zip(prev.prompt, cur.prompt):
        if a != b:
            break
        if na != nb:
            shared += min(na, nb)
            k = -1
            break
        shared += na
        k += 1
    if k == len(prev.prompt) and prev.output_segment is not None and k < len(cur.prompt):
        seg, n = cur.prompt[k]
        if seg == prev.output_segment:
            shared += min(n, prev.output_tokens)
    total = cur.prompt_tokens
    return shared / total if total else 0.0


# --------------------------------------------------------------------------- chat messages


def chain_id(prev: str, kind: str, text: str) -> str:
    """``<kind>:<12 hex>`` of sha256 of (previous id, kind, text): chained ids,
    equal exactly when the texts and everything before them are equal."""
    h = hashlib.sha256()
    for part in (prev, kind, text):
        h.update(part.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return f"{kind}:{h.hexdigest()[:12]}"


def content_text(value) -> str:
    """Message content as text: a string, or a list of parts (``{"type": "text", "text": ...}``)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(content_text(v.get("text", "") if isinstance(v, dict) else v) for v in value)
    return json.dumps(value, sort_keys=True)


def message_text(m: dict, reasoning: bool = False) -> str:
    """The text a chat message contributes to later prompts: its content and,
    for an assistant message, its reasoning (when ``reasoning``) and the
    function names and arguments of its tool calls."""
    parts = [content_text(m.get("content"))]
    if m.get("role") == "assistant":
        if reasoning:
            parts.append(content_text(m.get("reasoning_content")))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                parts.append(str(fn.get("name") or ""))
                parts.append(str(fn.get("arguments") or ""))
    return "".join(parts)


# --------------------------------------------------------------------------- CLI


def _progress_line(paths: Sequence[Path]) -> Callable[[int], None]:
    total = sum(p.stat().st_size for p in paths if p.is_file())

    def show(n: int) -> None:
        pct = 100.0 * n / total if total else 100.0
        print(f"\rread {n / 1e6:,.1f} MB of {total / 1e6:,.1f} MB ({pct:.0f}%)", end="", file=sys.stderr, flush=True)

    return show


def importer_main(
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    find: Callable[[Sequence[str]], list[Path]],
    convert: Callable[..., tuple[list[Call], ImportReport]],
    header: Callable[[], dict],
    *,
    notes: str,
    sources_help: str,
    none_found: str = "no input files found",
    provenance: bool = True,
    inputs: bool = False,
    progress: bool = False,
    arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    convert_options: Callable[[argparse.Namespace], dict] | None = None,
    header_options: Callable[[argparse.Namespace], dict] | None = None,
) -> int:
    """``python -m traces.importers.X SRC... -o OUT``: find, convert, print the
    report, write the trace. Returns the exit status (2: no input files, 1:
    nothing converted).

    The output's header is ``header()``, then (``provenance``) the
    ``--source`` / ``--license`` options (defaults from ``header()``),
    (``inputs``) the input file names, ``sessions``, ``calls``,
    ``header_options(args)`` and ``notes``. ``arguments`` adds the
    importer's own options and ``convert_options(args)`` turns them into
    keyword arguments of ``convert``; ``progress`` adds ``-q/--quiet`` and
    otherwise shows the bytes read on stderr.
    """
    ap = argparse.ArgumentParser(prog=prog, description=description)
    ap.add_argument("sources", nargs="+", help=sources_help)
    ap.add_argument("-o", "--output", required=True, help="output trace (.jsonl or .jsonl.gz)")
    if provenance:
        defaults = header()
        ap.add_argument("--source", default=defaults["source"], help="provenance for the header")
        ap.add_argument("--license", default=defaults["license"], help="license note for the header")
    if progress:
        ap.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    if arguments is not None:
        arguments(ap)
    args = ap.parse_args(argv)

    paths = find(args.sources)
    if not paths:
        print(none_found, file=sys.stderr)
        return 2
    show = _progress_line(paths) if progress and not args.quiet else None
    calls, report = convert(paths, progress=show, **(convert_options(args) if convert_options else {}))
    if show is not None:
        print(file=sys.stderr)
    print(report.render())
    if not calls:
        print("nothing converted", file=sys.stderr)
        return 1
    head = header()
    if provenance:
        head.update(source=args.source, license=args.license)
    if inputs:
        head["inputs"] = [p.name for p in paths]
    head.update(sessions=report.sessions, calls=report.calls)
    head.update(header_options(args) if header_options else {})
    head["notes"] = notes
    write_trace(Path(args.output), calls, header=head)
    print(f"wrote {len(calls)} calls to {args.output}")
    return 0
