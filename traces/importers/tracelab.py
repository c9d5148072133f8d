"""Import TraceLab round traces (uw-syfi/TraceLab) into trace format v1.

TraceLab rows are JSON Lines, one row per LLM round of a real Claude Code or
Codex session (the published ``syfi_coding_trace.jsonl.gz`` and the
``example_sessions`` rows). They are already content-free: token counts, a
cache split, ordered timing events and tool metadata. Each accepted row
becomes one call; the mapping is the one in ``docs/trace-format.md``
("Lossless mapping: TraceLab-style rounds").

Sessions and order
    A session is ``(session_id, project)`` (upstream's ``session_id`` alone is
    not unique across projects). Rounds are taken in file order and must come
    with increasing ``round_index`` within their session; a row whose
    ``round_index`` is not above the session's last accepted one (a duplicate
    or out-of-order row) is rejected with its file:line. Gaps in
    ``round_index`` are allowed and counted; turns are renumbered ``0..n-1``.
    The output ``session_id`` is the source's, with ``@<project>`` added when
    the same id already came with another project.

Prompt (segments)
    ``prefix_tokens`` is the provider's prompt-cache read (Claude
    ``cache_read_input_tokens``, Codex ``cached_input_tokens``) and
    ``newly_append_tokens`` the rest of the prompt; upstream documents the
    cached prefix as "the cached prefix from the previous request". So::

        prompt(r) = cut(prev(r), prefix_tokens) + [["tl:<key>:<r>", newly_append_tokens]]

    with ``<key>`` 12 hex digits of sha256 of the session and ``cut`` keeping
    the first ``n`` tokens (a cut inside a segment keeps the id with a
    shorter length, so shared tokens keep their identity).

    ``prev(r)`` is the previous call's prompt followed by its output segment
    ``tl:<key>:<r-1>:out``: every call gets an ``output_segment``. Decision
    from the data: Codex rounds often read more tokens from the cache than
    the whole previous prompt (e.g. round 1 of the example Codex session
    reads 9,600 cached tokens after a 9,324-token prompt), which is only
    possible when the previous answer is part of the next prefix. Claude's
    cache read stops at the previous request's last cache breakpoint
    (typically the previous prompt minus 2 tokens; the replayed answer is
    re-written to the cache as part of ``newly_append_tokens``), so for
    Claude the cut never reaches the output segment. Either way the cut
    length is exactly ``prefix_tokens``: the trace records the sharing the
    provider's cache saw, a lower bound of the true content overlap.

    Round 0 usually has ``prefix_tokens > 0`` too: the system prompt and tool
    definitions were cached by an earlier session of the same user. That
    prefix becomes a session-private segment ``tl:<key>:ext`` (so the
    length survives, but the simulator does not share it across sessions:
    which sessions share it is not recorded). ``prev(0)`` is that segment.

    Inconsistent rows are repaired, not dropped, and counted in the report:
    ``input_tokens_total`` is trusted (it is the prompt size); when it is not
    ``prefix_tokens + newly_append_tokens`` the new segment gets the
    difference ``input_tokens_total - prefix_tokens`` (prefix clamped to the
    total). A ``prefix_tokens`` larger than ``prev(r)`` (cache hits from
    another branch, e.g. a sub-agent) is clamped to ``prev(r)`` and the rest
    counted as new. ``output_tokens`` 0 becomes 1 (format minimum).

Timing (``timing_events``: ISO times; ``user_message``/``tool_result`` are
the round's inputs, ``reasoning``/``text``/``tool_call``/``usage_report`` its
output)
    timestamp_s = the last input event (submission of the request), epoch
    seconds (the first event when a round has no input event); latency_s =
    last output event - that; gap_s = next round's submission - this round's
    last output event, i.e. tool time plus client overhead plus human think
    time before a new user message (real, kept). Negative gaps (clock
    overlap, tools run while streaming) become 0 and are counted.

Tools
    One ``ToolCall`` per ``tools[]`` entry: name ``tool_name``, duration the
    observed wall latency ``tool_wall_latency_ms`` (else ``result_at -
    emitted_at``, else ``tool_internal_latency_ms``, else 0 and counted), and a
    category from the tool name (``tool_category``); shell tools (Claude
    ``Bash``, Codex ``exec_command``/``shell``) are classified from their
    command with ``traces.importers.commands.classify_command`` when the row
    still has ``tools[].input`` (private traces; the public one drops it:
    then ``shell``).

Streaming
    ``convert`` reads each source line by line (gzip detected by its magic
    bytes) and keeps per session only the last call's prompt and timing, so
    the 357k-round public file converts in one pass; ``progress`` gets the
    number of source bytes read so far (compressed bytes for gzip).

CLI: ``python -m traces.importers.tracelab SRC... -o OUT.jsonl[.gz]``
"""

from __future__ import annotations

import gc
import hashlib
import json
import shlex
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from traces.format import Call, ToolCall
from traces.importers.commands import classify_command
from traces.importers.common import LineReport, Reject, basic_figures, category_rows, find_files, importer_main
from traces.importers.common import median, parse_json, read_lines, sessions_of, turn_pairs

__all__ = [
    "CATEGORIES",
    "HEADER",
    "ImportReport",
    "convert",
    "find",
    "find_sources",
    "header",
    "headline_figures",
    "main",
    "tool_category",
]

CONVERTED_BY = "traces.importers.tracelab"
HEADER = {
    "source": (
        "uw-syfi/TraceLab @ 0b8a262, example_sessions/ (round rows); full data set: release "
        "v2026-06-08-syfi-trace, syfi_coding_trace.jsonl.gz"
    ),
    "license": "CC-BY-4.0 (TraceLab data set)",
    "converted_by": CONVERTED_BY,
}


def header() -> dict:
    """Provenance header of a converted trace."""
    return dict(HEADER)


NOTES = (
    "content-free: segment ids are session hashes and round numbers; prompt sharing is the "
    "provider's cache read (prefix_tokens) against the previous round's prompt + answer; "
    "times are epoch seconds, gaps include human think time"
)

CATEGORIES = (
    "submit", "edit", "test", "install", "python", "git", "read", "grep", "find",
    "shell", "web", "plan", "agent", "mcp", "other",
)

_BY_NAME = {
    # Claude Code
    "read": "read", "notebookread": "read",
    "edit": "edit", "multiedit": "edit", "write": "edit", "notebookedit": "edit",
    "grep": "grep",
    "glob": "find", "ls": "find",
    "bashoutput": "shell", "killshell": "shell", "killbash": "shell",
    "webfetch": "web", "websearch": "web",
    "todowrite": "plan", "todoread": "plan", "exitplanmode": "plan", "enterplanmode": "plan",
    "task": "agent", "agent": "agent",
    # Codex
    "apply_patch": "edit", "write_stdin": "shell", "update_plan": "plan", "view_image": "read",
    "web_search": "web", "web_fetch": "web", "read_file": "read", "list_dir": "find",
    "grep_files": "grep", "spawn_agent": "agent",
}
_SHELL_TOOLS = {"bash", "exec_command", "shell", "local_shell", "shell_command", "container.exec", "unified_exec"}

_INPUT_EVENTS = frozenset(("user_message", "tool_result"))


def tool_category(name: str, tool_input=None) -> str:
    """Coarse category of a Claude Code / Codex tool call (one of ``CATEGORIES``).

    Shell tools are classified by their command when ``tool_input`` (a dict,
    or a JSON string of one, with ``command`` or ``cmd``) holds it, else
    ``shell``; ``mcp__*`` tools are ``mcp``; unknown names ``other``.
    """
    low = name.lower()
    if low in _SHELL_TOOLS:
        cmd = _command(tool_input)
        return classify_command(cmd) if cmd else "shell"
    cat = _BY_NAME.get(low)
    if cat is not None:
        return cat
    if low.startswith("mcp__"):
        return "mcp"
    return "other"


def _command(tool_input) -> str:
    if isinstance(tool_input, str):
        try:
            tool_input = json.loads(tool_input)
        except ValueError:
            return ""
    if not isinstance(tool_input, dict):
        return ""
    cmd = tool_input.get("command", tool_input.get("cmd"))
    if isinstance(cmd, list) and all(isinstance(c, str) for c in cmd):
        if len(cmd) >= 3 and cmd[0].rsplit("/", 1)[-1] in ("bash", "sh", "zsh") and cmd[1] in ("-lc", "-c"):
            return cmd[-1]
        return shlex.join(cmd)
    return cmd if isinstance(cmd, str) else ""


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport(LineReport):
    """What an import read, made, repaired and rejected (``rejected``: ``("file:line", reason)``)."""

    token_mismatch: int = 0  # input_tokens_total != prefix_tokens + newly_append_tokens
    prefix_clamped: int = 0  # prefix_tokens > previous prompt + output (clamped)
    prefix_clamped_tokens: int = 0
    prefix_into_output: int = 0  # rounds whose cached prefix reaches into the previous answer
    external_prefix_sessions: int = 0  # round 0 with a cached prefix from outside the session
    output_zero: int = 0  # output_tokens 0 (written as 1)
    round_index_gaps: int = 0  # missing round_index values inside a session
    no_timing: int = 0  # rounds without a usable submission or completion time
    negative_gaps: int = 0  # next submission before this completion (gap written as 0)
    tools_without_latency: int = 0
    tool_categories: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0  # sum of input_tokens_total over the calls
    new_tokens: int = 0  # sum of the fresh (last) segments: tokens not read from the cache

    def extra_rows(self):
        return [
            ("token totals repaired (total != prefix + new)", self.token_mismatch),
            ("prefix beyond previous prompt+answer (clamped)", self.prefix_clamped),
            ("  clamped tokens", self.prefix_clamped_tokens),
            ("prefix reaching into previous answer", self.prefix_into_output),
            ("sessions with external cached prefix at round 0", self.external_prefix_sessions),
            ("output_tokens 0 (written as 1)", self.output_zero),
            ("round_index gaps", self.round_index_gaps),
            ("rounds without timing", self.no_timing),
            ("negative gaps (written as 0)", self.negative_gaps),
            ("tools without latency", self.tools_without_latency),
            *category_rows(self.tool_categories, CATEGORIES),
        ]


def headline_figures(calls: Sequence[Call]) -> dict:
    """Headline figures of a converted trace."""
    sessions = sessions_of(calls)
    return _figures(
        [len(v) for v in sessions.values()],
        [c.prompt_tokens for c in calls],
        [c.output_tokens for c in calls],
        [_shared(prev, cur) / cur.prompt_tokens for prev, cur in turn_pairs(sessions)],
        [t.duration_s for c in calls for t in c.tools],
        [c.gap_s for sc in sessions.values() for c in sc[:-1] if c.gap_s is not None],
        [c.latency_s for c in calls if c.latency_s is not None],
    )


def _figures(session_lengths, prompts, outputs, shares, durations, gaps, latencies) -> dict:
    return {
        **basic_figures(session_lengths, prompts, outputs),
        "mean reuse share (prev prompt + answer)": round(statistics.fmean(shares), 4) if shares else 0,
        "median tool duration s": round(median(durations), 3),
        "median gap s": round(median(gaps), 3),
        "median LLM latency s": round(median(latencies), 3),
    }


def _shared(prev: Call, cur: Call) -> int:
    """Tokens at the start of ``cur``'s prompt that are ``prev``'s prompt and answer."""
    seq = list(prev.prompt)
    if prev.output_segment is not None:
        seq.append((prev.output_segment, prev.output_tokens))
    shared = 0
    for (a, na), (b, nb) in zip(seq, cur.prompt):
        if a != b:
            break
        shared += min(na, nb)
        if na != nb:
            break
    return shared


# --------------------------------------------------------------------------- conversion


@dataclass(slots=True)
class _State:
    """What a session keeps between rounds."""

    sid: str
    key: str
    turn: int = 0
    last_round: int = -1
    prompt: tuple = ()
    prompt_tokens: int = 0
    out_id: str | None = None
    out_tokens: int = 0
    pending: int = -1  # index in the output list of the last call (made when its gap is known)
    pending_args: tuple = ()  # that call's fields before gap_s, and after it
    end_ts: float | None = None


def _int_field(row: dict, key: str, minimum: int = 0) -> int:
    if key not in row:
        raise Reject(f"{key}: missing")
    v = row[key]
    if type(v) is not int or v < minimum:
        raise Reject(f"{key}: expected an integer >= {minimum}, got {json.dumps(v)[:40]}")
    return v


def _ts(s) -> float | None:
    if not isinstance(s, str):
        return None
    try:
        dt = datetime.fromisoformat(s)
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)  # TraceLab writes UTC ("...Z")
    return dt.timestamp()


def _timing(events) -> tuple[float | None, float | None]:
    """(submission time, completion time) of a round from its timing events."""
    if not isinstance(events, list):
        return None, None
    start = end = first = None
    for e in events:
        if not isinstance(e, dict):
            continue
        t = _ts(e.get("timestamp"))
        if t is None:
            continue
        if first is None or t < first:
            first = t
        if e.get("event_type") in _INPUT_EVENTS:
            if start is None or t > start:
                start = t
        elif end is None or t > end:
            end = t
    if start is None:
        start = first
    return start, end


def _tools(raw) -> tuple[tuple[ToolCall, ...], int]:
    """The round's tool calls, and how many of them have no latency."""
    if raw is None:
        return (), 0
    if not isinstance(raw, list):
        raise Reject("tools: expected an array")
    out = []
    missing = 0
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise Reject(f"tools[{i}]: expected an object")
        name = t.get("tool_name")
        if not isinstance(name, str) or not name:
            raise Reject(f"tools[{i}].tool_name: missing or not a non-empty string")
        ms = t.get("tool_wall_latency_ms")
        if not _is_num(ms) or ms < 0:
            a, b = _ts(t.get("emitted_at")), _ts(t.get("result_at"))
            ms = (b - a) * 1000 if a is not None and b is not None and b >= a else t.get("tool_internal_latency_ms")
        if not _is_num(ms) or ms < 0:
            missing += 1
            ms = 0
        out.append(ToolCall(name, tool_category(name, t.get("input")), round(ms / 1000, 3)))
    return tuple(out), missing


def _is_num(v) -> bool:
    return type(v) in (int, float) and v == v and v not in (float("inf"), float("-inf"))


def _cut(st: _State, n: int) -> tuple:
    """The first ``n`` tokens of the session's previous prompt + answer (``n`` <= their sum)."""
    p = st.prompt_tokens
    if n >= p:
        if n > p:
            return st.prompt + ((st.out_id, n - p),)
        return st.prompt
    segs = st.prompt
    acc = p
    i = len(segs) - 1
    while acc - segs[i][1] >= n:
        acc -= segs[i][1]
        i -= 1
        if acc == 0:
            return ()
    if acc == n:
        return segs[: i + 1]
    seg, length = segs[i]
    return segs[:i] + ((seg, length - (acc - n)),)


class _Converter:
    def __init__(self, report: ImportReport):
        self.report = report
        self.calls: list = []  # Call, or None while the gap is not known yet
        self.states: dict[tuple, _State] = {}
        self.sids: set[str] = set()
        self.keys: set[str] = set()
        # Per-call figures, gathered on the way (cheaper than walking the prompts).
        self.prompts: list[int] = []
        self.outputs: list[int] = []
        self.shares: list[float] = []
        self.durations: list[float] = []
        self.gaps: list[float] = []
        self.latencies: list[float] = []

    def _state(self, sid: str, project) -> _State:
        k = (sid, project)
        st = self.states.get(k)
        if st is None:
            out_sid = sid if sid not in self.sids else f"{sid}@{project if project is not None else '-'}"
            n = 0
            while out_sid in self.sids:
                n += 1
                out_sid = f"{sid}@{project}#{n}"
            digest = hashlib.sha256(json.dumps([sid, project]).encode()).hexdigest()
            key = digest[:12]
            width = 12
            while key in self.keys:
                width += 2
                key = digest[:width]
            self.sids.add(out_sid)
            self.keys.add(key)
            st = self.states[k] = _State(out_sid, key)
        return st

    def row(self, row) -> None:
        rep = self.report
        if not isinstance(row, dict):
            raise Reject("not a JSON object")
        sid = row.get("session_id")
        if not isinstance(sid, str) or not sid:
            raise Reject("session_id: missing or not a non-empty string")
        rnd = _int_field(row, "round_index")
        total = _int_field(row, "input_tokens_total")
        prefix = _int_field(row, "prefix_tokens")
        new = _int_field(row, "newly_append_tokens")
        out = _int_field(row, "output_tokens")
        if total == 0:
            raise Reject("input_tokens_total: 0 (a call needs a prompt)")
        project = row.get("project")
        if project is not None and not isinstance(project, str):
            project = json.dumps(project)
        tools, no_latency = _tools(row.get("tools"))
        start, end = _timing(row.get("timing_events"))

        st = self._state(sid, project)
        if rnd <= st.last_round:
            raise Reject(f"round_index {rnd} after {st.last_round} in session {sid!r} (duplicate or out of order)")
        # Accepted from here on.
        if st.last_round >= 0 and rnd > st.last_round + 1:
            rep.round_index_gaps += rnd - st.last_round - 1
        st.last_round = rnd
        rep.tools_without_latency += no_latency

        if total != prefix + new:
            rep.token_mismatch += 1
        prefix = min(prefix, total)
        turn = st.turn
        if turn == 0:
            if prefix > 0:
                rep.external_prefix_sessions += 1
                prompt: tuple = ((f"tl:{st.key}:ext", prefix),)
            else:
                prompt = ()
        else:
            avail = st.prompt_tokens + st.out_tokens
            if prefix > avail:
                rep.prefix_clamped += 1
                rep.prefix_clamped_tokens += prefix - avail
                prefix = avail
            if prefix > st.prompt_tokens:
                rep.prefix_into_output += 1
            prompt = _cut(st, prefix)
            self.shares.append(prefix / total)  # the cut is exactly what is shared
        fresh = total - prefix
        rep.prompt_tokens += total
        rep.new_tokens += fresh
        if fresh > 0:
            prompt = prompt + ((f"tl:{st.key}:{turn}", fresh),)
        if out == 0:
            rep.output_zero += 1
            out = 1
        out_id = f"tl:{st.key}:{turn}:out"

        if start is None or end is None:
            rep.no_timing += 1
        if st.pending >= 0:
            gap = None
            if start is not None and st.end_ts is not None:
                gap = start - st.end_ts
                if gap < 0:
                    rep.negative_gaps += 1
                    gap = 0.0
                gap = round(gap, 3)
            if gap is not None:
                self.gaps.append(gap)
            self._finish(st, gap)
        latency = round(max(0.0, end - start), 3) if start is not None and end is not None else None
        for t in tools:
            rep.tool_categories[t.category] += 1
            self.durations.append(t.duration_s)
        self.prompts.append(total)
        self.outputs.append(out)
        if latency is not None:
            self.latencies.append(latency)
        st.pending_args = (
            (st.sid, turn, prompt, out, out_id, tools),
            (round(start, 3) if start is not None else None, latency),
        )
        st.pending = len(self.calls)
        self.calls.append(None)
        st.end_ts = end
        st.prompt = prompt
        st.prompt_tokens = total
        st.out_id = out_id
        st.out_tokens = out
        st.turn = turn + 1


    def _finish(self, st: _State, gap: float | None) -> None:
        head, tail = st.pending_args
        self.calls[st.pending] = Call(*head, gap, *tail)
        st.pending = -1
        st.pending_args = ()

    def finish(self) -> list[Call]:
        for st in self.states.values():
            if st.pending >= 0:
                self._finish(st, None)
        return self.calls


def convert(
    sources: Iterable[str | Path],
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Call], ImportReport]:
    """Convert TraceLab round files (``.jsonl`` or gzip) into calls, in file order.

    A malformed row is rejected (``report.rejected`` gets ``("file:line",
    reason)``) and the rest is still converted. ``progress``, when given, is
    called now and then (and at the end of each file) with the number of
    source bytes read so far over all files (compressed bytes for gzip).
    """
    report = ImportReport()
    conv = _Converter(report)
    # Millions of small tuples and no cycles: the cyclic GC would only rescan them.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        read_lines(sources, report, lambda _file, _lineno, line: _row(conv, report, line), progress)
    finally:
        if gc_was_enabled:
            gc.enable()
    calls = conv.finish()
    report.calls = len(calls)
    report.sessions = sum(1 for st in conv.states.values() if st.turn)
    report.figures = _figures(
        [st.turn for st in conv.states.values() if st.turn],
        conv.prompts, conv.outputs, conv.shares, conv.durations, conv.gaps, conv.latencies,
    )
    if report.prompt_tokens:
        report.figures["new (not cached) share of prompt tokens"] = round(report.new_tokens / report.prompt_tokens, 4)
    return calls, report


def _row(conv: _Converter, report: ImportReport, line: bytes) -> None:
    report.lines_read += 1
    conv.row(parse_json(line))


# --------------------------------------------------------------------------- CLI


def find(sources: Iterable[str | Path]) -> list[Path]:
    """Files named, and ``*.jsonl`` / ``*.jsonl.gz`` under directories, sorted."""
    return find_files(sources, (".jsonl", ".jsonl.gz"))


find_sources = find


def main(argv: Sequence[str] | None = None) -> int:
    return importer_main(
        argv,
        "python -m traces.importers.tracelab",
        "Convert TraceLab round traces (.jsonl or .jsonl.gz) into trace format v1.",
        find,
        convert,
        header,
        notes=NOTES,
        sources_help="round files, or directories searched for *.jsonl[.gz]",
        none_found="no round files found",
        inputs=True,
        progress=True,
    )


if __name__ == "__main__":
    sys.exit(main())
