"""Import LMCache agent-trace proxy logs (mini-swe-agent on SWE-bench) into trace format v1.

Source: ``LMCache/lmcache-agent-trace`` ``miniswe/<session>.jsonl``, one row per
LLM call: ``{"timestamp": <us>, "input": <text>, "output": <text>,
"session_id": <str>}``. No text is kept: a message becomes a segment id (a
hash) and a token count.

What ``input`` holds (checked on all 20 sessions / 402 rows)
    The non-assistant messages of the request, **joined with a blank line**
    (``"\\n\\n"``): the first row of a session holds only the user task
    message (instance template); each later row holds the previous row's input
    + ``"\\n\\n"`` + one new message (the command observation, or a
    format-error message). The system message is **not logged** (no input
    starts with it), nor are the assistant messages. Rows of a file are not
    in call order: rows are grouped by ``session_id`` and sorted by timestamp
    (ties: file order).

Prompt reconstruction
    The mini-swe-agent conversation is system, user task, then alternately
    assistant output and user observation, so the prompt of call k is::

        [system] + N0, A0, N1, A1, ..., A(k-1), Nk

    where ``N`` are the non-assistant messages split off ``input`` (the new
    message of row k is what row k's input adds to row k-1's input) and ``A``
    are the earlier rows' ``output`` texts. So call k+1's prompt is call k's
    prompt + call k's output + the new observation (append-only). A row whose
    input does not extend the previous one keeps the longest run of known
    messages it starts with, then the previous output and the rest of the
    input as one new message (counted as non-append-only; none in the data).

Segment ids
    ``<kind>:<12 hex>``, kind ``sys`` / ``user`` / ``asst``, the hex being
    sha256 of (the previous segment's id, kind, text): *chained* hashes, so
    equal ids mean equal text after an equal prefix. The unlogged system
    prompt is a placeholder segment whose id hashes a fixed label (the same
    in every session: cross-session sharing) and whose size is
    ``--system-tokens`` (default ``SYSTEM_TOKENS`` = 136: the 543 characters
    of mini-swe-agent's ``config/extra/swebench.yaml`` system template at
    commit 091e8f9 (the October 2025 version, whose instance template the
    logged inputs follow), / 4; 0 leaves it out). An output becomes segment
    ``asst:...`` of the next prompt (``output_segment``).

Token counts (no provider counts in the log)
    ``max(1, round(len(text) / CHARS_PER_TOKEN))`` with ``CHARS_PER_TOKEN`` =
    4.0, for every message and for the output (``output_tokens`` equals the
    output segment's count), so equal texts always get equal counts. Chat
    template tokens are not counted.

Timing (one timestamp per row)
    The timestamp is the **request (submit) time** of the call: the interval
    to the session's next row grows with the length of this row's output
    (about 1.4 ms per output character, correlation 0.57 over the 382
    intervals) and hardly with the next row's output (0.16). So
    ``timestamp_s`` = timestamp / 1e6 (epoch seconds), and the interval to the
    next row holds this call's LLM latency + the command's run time + client
    overhead, which the log cannot separate. ``gap_s`` = that interval minus
    ``output_tokens * decode_s_per_token`` (``--decode-s-per-token``, default
    0: the whole interval, an upper bound of the real gap; a closed-loop
    replay that adds its own LLM latency then counts the latency twice).
    ``latency_s`` is not set. The tool's ``duration_s`` is the same value
    (the log has no separate tool time). The last call has no ``gap_s`` and a
    tool duration of 0.

Tools
    mini-swe-agent runs the command of the single ```` ```bash ```` block of
    an output (its regex ``r"```bash\\s*\\n(.*?)\\n```"``): an output with
    exactly one block gets one tool ``bash`` with ``classify_command``'s
    category; an output with 0 or several blocks is a format error (no
    command ran; counted in the report).

Malformed rows (not JSON, not an object, missing or mistyped fields, empty
input) are rejected one by one as ``(file:line, reason)``; the other rows of
the session are still converted.

CLI: ``python -m traces.importers.lmcache_agent SRC_DIR_OR_FILES... -o OUT.jsonl[.gz]``
"""

from __future__ import annotations

import math
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traces.format import Call, ToolCall
from traces.importers.commands import CATEGORIES, classify_command
from traces.importers.common import ImportReport as _BaseReport
from traces.importers.common import Reject, category_rows, chain_id, find_files, headline_figures, importer_main
from traces.importers.common import parse_json, read_lines

__all__ = [
    "CHARS_PER_TOKEN",
    "HEADER",
    "SYSTEM_TOKENS",
    "ImportReport",
    "convert",
    "estimate_tokens",
    "find",
    "find_logs",
    "header",
    "main",
]

CONVERTED_BY = "traces.importers.lmcache_agent"
HEADER = {
    "source": "LMCache/lmcache-agent-trace @ 16a14ad, miniswe/*.jsonl",
    "license": "Apache-2.0",
    "converted_by": CONVERTED_BY,
}


def header() -> dict:
    """Provenance header of a converted trace."""
    return dict(HEADER)


NOTES = (
    "content-free: segment ids are chained sha256 hashes; token counts are len(text)/4 estimates; "
    "the unlogged system prompt is a placeholder segment; timestamp_s is the request time (epoch s); "
    "gap_s is the interval to the next request minus output_tokens*decode_s_per_token, so it "
    "includes the call's own LLM latency"
)

CHARS_PER_TOKEN = 4.0
SYSTEM_TOKENS = 136
SEPARATOR = "\n\n"  # between the messages joined in ``input``

_BASH_RE = re.compile(r"```bash\s*\n(.*?)\n```", re.DOTALL)
_SYSTEM_LABEL = "lmcache-agent-trace/miniswe: unlogged system prompt"


def estimate_tokens(text: str) -> int:
    """Token estimate of a text: ``max(1, round(len / CHARS_PER_TOKEN))``."""
    return max(1, round(len(text) / CHARS_PER_TOKEN))


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport(_BaseReport):
    """What an import read, made and rejected (``rejected``: ``("file:line", reason)``)."""

    rows: int = 0
    non_append_only: int = 0  # rows whose input does not extend the previous row's input
    format_errors: int = 0  # outputs without exactly one bash block (no command ran)
    tool_categories: Counter = field(default_factory=Counter)
    system_tokens: int = SYSTEM_TOKENS
    decode_s_per_token: float = 0.0

    rejected_label = "rejected rows"

    def input_rows(self):
        return [("rows read", self.rows)]

    def extra_rows(self):
        return [
            ("non-append-only calls", self.non_append_only),
            ("format errors (no command)", self.format_errors),
            ("system placeholder tokens", self.system_tokens),
            ("decode s/token subtracted from gaps", self.decode_s_per_token),
            *category_rows(self.tool_categories, CATEGORIES),
        ]


# --------------------------------------------------------------------------- reading


@dataclass(slots=True)
class _Row:
    ts: int | float
    order: int  # file order, for ties
    input: str
    output: str


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _check_row(d) -> str | None:
    """Why a decoded row is malformed (None if it is fine)."""
    if not isinstance(d, dict):
        return "not a JSON object"
    for key in ("timestamp", "input", "output", "session_id"):
        if key not in d:
            return f"{key}: missing"
    ts = _number(d["timestamp"])
    if ts is None or ts < 0:
        return "timestamp: expected a finite number >= 0 (microseconds)"
    for key in ("input", "output"):
        if not isinstance(d[key], str):
            return f"{key}: expected a string"
    if not d["input"]:
        return "input: empty"
    if not isinstance(d["session_id"], str) or not d["session_id"]:
        return "session_id: expected a non-empty string"
    return None


def _read(paths: Iterable[Path], report: ImportReport, progress=None) -> dict[str, list[_Row]]:
    sessions: dict[str, list[_Row]] = {}
    order = 0

    def row(_file: int, _lineno: int, raw: bytes) -> None:
        nonlocal order
        report.rows += 1
        d = parse_json(raw)
        problem = _check_row(d)
        if problem is not None:
            raise Reject(problem)
        sessions.setdefault(d["session_id"], []).append(_Row(d["timestamp"], order, d["input"], d["output"]))
        order += 1

    read_lines(paths, report, row, progress)
    return sessions


# --------------------------------------------------------------------------- conversion


def _match(known: list[str], s: str) -> tuple[int, str]:
    """``(j, rest)``: the most known messages ``s`` starts with (whole, each
    followed by the separator or the end), and the rest of ``s`` after them."""
    pos, j = 0, 0
    for j_next, text in enumerate(known, 1):
        end = pos + len(text)
        if not s.startswith(text, pos):
            break
        if end == len(s):
            return j_next, ""
        if not s.startswith(SEPARATOR, end):
            break
        pos, j = end + len(SEPARATOR), j_next
    return j, s[pos:] if j else s


def _convert_session(
    sid: str, rows: list[_Row], system_tokens: int, decode_s_per_token: float, report: ImportReport
) -> list[Call]:
    rows.sort(key=lambda r: (r.ts, r.order))
    sys_seg = (chain_id("", "sys", _SYSTEM_LABEL), system_tokens) if system_tokens > 0 else None
    user: list[str] = []  # N: non-assistant messages
    asst: list[str] = []  # A: earlier outputs, len(A) == len(N) - 1
    prompts: list[tuple[tuple[str, int], ...]] = []
    out_segs: list[str] = []
    writers: set[str] = set()
    tools: list[tuple[ToolCall, ...]] = []
    for k, row in enumerate(rows):
        j, rest = _match(user, row.input)
        if k and not (j == len(user) and rest):
            report.non_append_only += 1
        prev_out = rows[k - 1].output if k else None
        if rest:
            asst = asst[: max(0, j - 1)] + ([prev_out] if j >= 1 else [])
            user = user[:j] + [rest]
        else:
            user, asst = user[:j], asst[: j - 1]
        # The prompt: [system] N0 A0 N1 A1 ... N(m).
        segs: list[tuple[str, int]] = [sys_seg] if sys_seg else []
        prev = segs[0][0] if segs else ""
        for i, text in enumerate(user):
            if i:
                prev = chain_id(prev, "asst", asst[i - 1])
                segs.append((prev, estimate_tokens(asst[i - 1])))
            prev = chain_id(prev, "user", text)
            segs.append((prev, estimate_tokens(text)))
        prompts.append(tuple(segs))
        out_segs.append(chain_id(prev, "asst", row.output))
        blocks = _BASH_RE.findall(row.output)
        if len(blocks) == 1:
            category = classify_command(blocks[0], writers)
            report.tool_categories[category] += 1
            tools.append((category,))
        else:
            report.format_errors += 1
            tools.append(())

    calls: list[Call] = []
    for k, row in enumerate(rows):
        out_tokens = estimate_tokens(row.output)
        gap = None
        if k + 1 < len(rows):
            interval = (rows[k + 1].ts - row.ts) / 1e6
            gap = round(max(0.0, interval - out_tokens * decode_s_per_token), 6)
        call_tools = tuple(ToolCall("bash", cat, gap if gap is not None else 0.0) for cat in tools[k])
        calls.append(
            Call(
                session_id=sid,
                turn=k,
                prompt=prompts[k],
                output_tokens=out_tokens,
                output_segment=out_segs[k],
                tools=call_tools,
                gap_s=gap,
                timestamp_s=row.ts / 1e6,
            )
        )
    return calls


def convert(
    sources: Iterable[str | Path],
    progress: Callable[[int], None] | None = None,
    *,
    system_tokens: int = SYSTEM_TOKENS,
    decode_s_per_token: float = 0.0,
) -> tuple[list[Call], ImportReport]:
    """Convert proxy-log files (or directories of ``*.jsonl``) into calls.

    Sessions come in order of their first timestamp, each session's calls in
    turn order. Malformed rows are rejected one by one (``report.rejected``
    holds ``("file:line", reason)``). ``progress`` (optional) is called with
    the number of source bytes read so far.
    """
    if system_tokens < 0:
        raise ValueError(f"system_tokens must be >= 0, got {system_tokens}")
    if not decode_s_per_token >= 0:
        raise ValueError(f"decode_s_per_token must be >= 0, got {decode_s_per_token}")
    report = ImportReport(system_tokens=system_tokens, decode_s_per_token=decode_s_per_token)
    sessions = _read(find(sources), report, progress)
    order = sorted(sessions, key=lambda s: (min((r.ts, r.order) for r in sessions[s]), s))
    calls: list[Call] = []
    for sid in order:
        session_calls = _convert_session(sid, sessions[sid], system_tokens, decode_s_per_token, report)
        report.sessions += 1
        report.calls += len(session_calls)
        calls.extend(session_calls)
    report.figures = headline_figures(calls)
    return calls, report


# --------------------------------------------------------------------------- CLI


def find(sources: Iterable[str | Path]) -> list[Path]:
    """Files named, and ``*.jsonl`` in folders named and their subfolders (the repository's
    top folder holds ``miniswe/``), each folder's sorted."""
    return find_files(sources, ".jsonl")


find_logs = find


def _arguments(ap) -> None:
    ap.add_argument("--system-tokens", type=int, default=SYSTEM_TOKENS,
                    help=f"size of the unlogged system prompt placeholder (default {SYSTEM_TOKENS}; 0: none)")
    ap.add_argument("--decode-s-per-token", type=float, default=0.0,
                    help="seconds per output token subtracted from each inter-request interval (default 0)")


def _options(args) -> dict:
    return {"system_tokens": args.system_tokens, "decode_s_per_token": args.decode_s_per_token}


def main(argv: Sequence[str] | None = None) -> int:
    return importer_main(
        argv,
        "python -m traces.importers.lmcache_agent",
        "Convert LMCache agent-trace proxy logs (mini-swe-agent) into trace format v1.",
        find,
        convert,
        header,
        notes=NOTES,
        sources_help="log files, or directories holding *.jsonl",
        none_found="no log files found",
        provenance=False,
        arguments=_arguments,
        convert_options=_options,
        header_options=_options,
    )


if __name__ == "__main__":
    sys.exit(main())
