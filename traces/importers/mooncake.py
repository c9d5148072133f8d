"""Import Mooncake request traces (kvcache-ai/Mooncake, FAST'25) into trace format v1.

Mooncake rows are ``{"timestamp": ms, "input_length": L, "output_length": O,
"hash_ids": [h0, ...]}`` where ``h_i`` names the 512-token block ``i`` by its
whole prefix (chained hash). Each valid row becomes one call; the prompt is
the lossless mapping of ``docs/trace-format.md``::

    prompt = [["mc:h0",512], ..., ["mc:h(k-1)", L - 512*(k-1)]]

The remainder ``L - 512*(k-1)`` must be in ``1..512``; rows where it is not
(and rows with bad types) are rejected with file:line and reason. Segment ids
are global hashes, so all prefix sharing between requests (the common system
prompt block, earlier turns of a conversation) is kept exactly, whatever the
session grouping below.

Sessions (inferred; Mooncake has no session ids)
    A request's *complete blocks* are its first ``L // 512`` hash ids: a
    partial last block gets a new hash as soon as more tokens follow it, so a
    follow-up turn never repeats its parent's partial last id (the literal
    rule "starts with the parent's whole ``hash_ids``" holds only when the
    parent ends on a block boundary: 94 of the 3,932 follow-ups found in the
    conversation trace). Rule: request ``C`` continues the session of the
    earlier request ``P`` whose complete blocks are the longest prefix of
    ``C``'s ``hash_ids`` (the most recent such ``P`` for equal chains),
    provided that chain reaches beyond *shared context*: a block after which
    more than ``max_fanout`` (default 32) distinct blocks follow in the file,
    and every block before it, is a system prompt or template that many
    conversations share, and sharing only that says nothing about a
    conversation. In the conversation trace that is block 0 alone (7,373
    distinct successors; the next largest fan-out is 11).
    ``C`` becomes the next turn when ``P`` is still the last call of its
    session; if the session already moved on (another request extended ``P``
    or a later turn), ``C`` is a branch (an edited or regenerated turn) and
    starts a new session, counted as ``branches``. Limits: a follow-up whose
    parent had no complete block beyond the shared context (in the
    conversation trace: a first turn under 1,024 tokens) starts a new
    session; a follow-up that drops part of the history (truncation) is not
    recognised; two conversations that share a long non-system prefix (the
    same pasted document) may be joined. Session
    ids are ``mc-<line>`` (``mc<i>-<line>`` for the i-th file when several
    files are converted; their hash ids then get a per-file prefix
    ``mc<i>:`` too, since hash ids are remapped per file).

Output
    ``output_tokens = output_length`` (0 is written as 1, counted).
    ``output_segment`` is none: Mooncake's hash ids name prompt blocks only.
    The data show that a follow-up's prompt holds the parent's answer
    (median follow-up input - parent input - parent output is a few dozen
    tokens), but in the follow-up those tokens are in blocks with new hash
    ids, so the simulator prefills them as new tokens (a server that keeps
    decoded blocks would hit them: a small underestimate of reuse).

Time
    ``timestamp_s = timestamp / 1000`` for every call (relative seconds), so
    ``--arrivals trace`` starts each session at its recorded time. Mooncake
    has no completion times: ``gap_s`` is arrival to arrival (next turn's
    timestamp minus this one's). The simulator's closed loop waits ``gap_s``
    after a call *completes*, so replayed follow-ups arrive later than
    recorded by about the simulated LLM latency (gaps are minutes, LLM
    latencies seconds). No tools: Mooncake records none.

CLI: ``python -m traces.importers.mooncake SRC.jsonl... -o OUT.jsonl[.gz]``
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traces.format import Call
from traces.importers.common import LineReport, Reject, find_files, importer_main, median, parse_json, read_lines
from traces.importers.common import sessions_of

__all__ = ["BLOCK", "HEADER", "ImportReport", "convert", "find", "header", "headline_figures", "main"]

CONVERTED_BY = "traces.importers.mooncake"
BLOCK = 512
HEADER = {
    "source": "kvcache-ai/Mooncake @ 3b5a594, FAST25-release/traces/conversation_trace.jsonl",
    "license": "Apache-2.0",
    "converted_by": CONVERTED_BY,
    "block_size": BLOCK,
}


def header() -> dict:
    """Provenance header of a converted trace."""
    return dict(HEADER)


NOTES = (
    "segments are Mooncake's 512-token prefix-hash blocks (mc:<hash_id>); sessions inferred "
    "from hash-chain extension; timestamps are relative seconds; gap_s is arrival to arrival"
)


@dataclass
class ImportReport(LineReport):
    """What an import read, made and rejected (``rejected``: ``("file:line", reason)``)."""

    shared_context_blocks: int = 0  # blocks whose prefix is shared context (fan-out > max_fanout)
    max_parent_fanout: int = 0  # largest fan-out of a block that ends a parent's chain
    follow_ups: int = 0  # calls that continue a session (turn >= 1)
    branches: int = 0  # extended a call that was no longer its session's last: new session
    literal_full_chain_matches: int = 0  # follow-ups whose hash_ids start with the parent's whole hash_ids
    shorter_than_parent: int = 0  # follow-ups with input < parent input + parent output
    output_zero: int = 0
    calls_per_session: Counter = field(default_factory=Counter)  # n calls -> n sessions
    follow_up_shares: list[float] = field(default_factory=list)  # shared / follow-up input

    sessions_label = "sessions (inferred)"

    def extra_rows(self):
        rows = [
            ("shared-context blocks (no parents)", self.shared_context_blocks),
            ("largest fan-out of a parent's last block", self.max_parent_fanout),
            ("follow-up calls", self.follow_ups),
            ("branches (new session)", self.branches),
            ("follow-ups on parent's whole hash_ids", self.literal_full_chain_matches),
            ("follow-ups shorter than parent + answer", self.shorter_than_parent),
            ("output_length 0 (written as 1)", self.output_zero),
        ]
        dist = sorted(self.calls_per_session.items())
        head = ", ".join(f"{n}:{k}" for n, k in dist[:10])
        if len(dist) > 10:
            head += f", ... max {dist[-1][0]}"
        rows.append(("calls/session -> sessions", head or "-"))
        return rows


def headline_figures(calls: Sequence[Call], shares: Sequence[float] = ()) -> dict:
    """Headline figures of a converted trace (``shares``: follow-up prompt shares)."""
    sessions = sessions_of(calls)
    lengths = [len(v) for v in sessions.values()]
    gaps = [c.gap_s for sc in sessions.values() for c in sc[:-1] if c.gap_s is not None]
    return {
        "sessions": len(sessions),
        "calls": len(calls),
        "sessions with > 1 call": sum(1 for n in lengths if n > 1),
        "median calls/session": median(lengths),
        "max calls/session": max(lengths, default=0),
        "median prompt tokens": median([c.prompt_tokens for c in calls]),
        "median output tokens": median([c.output_tokens for c in calls]),
        "mean follow-up share shared with parent": round(statistics.fmean(shares), 4) if shares else 0,
        "median follow-up share shared with parent": round(median(shares), 4),
        "median gap s (arrival to arrival)": round(median(gaps), 3),
    }


def _parse(line: bytes) -> tuple[float, int, int, list[int]]:
    d = parse_json(line)
    if not isinstance(d, dict):
        raise Reject("not a JSON object")
    for key in ("timestamp", "input_length", "output_length", "hash_ids"):
        if key not in d:
            raise Reject(f"{key}: missing")
    ts = d["timestamp"]
    if type(ts) not in (int, float) or ts != ts or ts in (float("inf"), float("-inf")):
        raise Reject(f"timestamp: expected a finite number, got {json.dumps(ts)[:40]}")
    L, O = d["input_length"], d["output_length"]
    if type(L) is not int or L < 1:
        raise Reject(f"input_length: expected an integer >= 1, got {json.dumps(L)[:40]}")
    if type(O) is not int or O < 0:
        raise Reject(f"output_length: expected an integer >= 0, got {json.dumps(O)[:40]}")
    h = d["hash_ids"]
    if type(h) is not list or not h:
        raise Reject(f"hash_ids: expected a non-empty array of integers, got {json.dumps(h)[:40]}")
    if set(map(type, h)) != {int}:
        bad = next(i for i, x in enumerate(h) if type(x) is not int)
        raise Reject(f"hash_ids[{bad}]: expected an integer, got {json.dumps(h[bad])[:40]}")
    rem = L - BLOCK * (len(h) - 1)
    if not 1 <= rem <= BLOCK:
        raise Reject(
            f"input_length {L} does not fit {len(h)} blocks of {BLOCK} (last block would hold {rem} tokens)"
        )
    return float(ts), L, O, h


def _shared_context(rows, max_fanout: int) -> tuple[set[int], Counter]:
    """Hash ids of the blocks that are shared context, and each block's fan-out.

    A block's fan-out is the number of distinct blocks that follow it in the
    file. Blocks with a fan-out above ``max_fanout``, and every block before
    one, are shared context. (Prefix hashes: an id names its whole prefix.)
    """
    pairs: set[tuple[int, int]] = set()
    for r in rows:
        h = r[4]
        pairs.update(zip(h, h[1:]))
    fanout = Counter(a for a, _ in pairs)
    hot = {a for a, n in fanout.items() if n > max_fanout}
    shared: set[int] = set()
    if hot:
        for r in rows:
            h = r[4]
            if not hot.isdisjoint(h):
                last = max(j for j, x in enumerate(h) if x in hot)
                shared.update(h[: last + 1])
    return shared, fanout


def convert(
    sources: Iterable[str | Path],
    progress: Callable[[int], None] | None = None,
    max_fanout: int = 32,
) -> tuple[list[Call], ImportReport]:
    """Convert Mooncake trace files into calls (sessions inferred), in file order.

    Malformed rows are rejected (``report.rejected`` gets ``("file:line",
    reason)``); the rest is converted. ``progress`` (optional) is called with
    the number of source bytes read so far. ``max_fanout``: see the module
    docstring (shared context).
    """
    sources = [Path(s) for s in sources]
    report = ImportReport()
    rows_of: list[list] = [[] for _ in sources]  # per file: valid rows as (line, ts, L, O, hash_ids)

    def row(idx: int, lineno: int, line: bytes) -> None:
        report.lines_read += 1
        rows_of[idx].append((lineno, *_parse(line)))

    read_lines(sources, report, row, progress)
    calls: list[Call] = []
    many = len(sources) > 1
    for idx, rows in enumerate(rows_of):
        if not rows:
            continue
        seg = f"mc{idx}:" if many else "mc:"
        sid_prefix = f"mc{idx}-" if many else "mc-"
        shared, fanout = _shared_context(rows, max_fanout)
        report.shared_context_blocks += len(shared)

        chains: dict[int, int] = {}  # last id of a complete-block chain -> latest row with that chain
        session_of: list[int] = []  # row index -> index of the session's first row
        tail: dict[int, int] = {}  # session -> its last row
        members: dict[int, list[int]] = {}
        for i, (line, ts, L, O, h) in enumerate(rows):
            parent = None
            for j in range(len(h) - 1, -1, -1):
                p = chains.get(h[j])
                if p is not None and rows[p][4][: j + 1] == h[: j + 1]:
                    parent = p
                    break
            if parent is not None and tail[session_of[parent]] == parent:
                s = session_of[parent]
                session_of.append(s)
                report.follow_ups += 1
                _, _, pL, pO, ph = rows[parent]
                m = pL // BLOCK
                report.max_parent_fanout = max(report.max_parent_fanout, fanout.get(ph[m - 1], 0))
                if h[: len(ph)] == ph:
                    report.literal_full_chain_matches += 1
                if L < pL + pO:
                    report.shorter_than_parent += 1
                report.follow_up_shares.append(_shared_blocks(ph, pL, h, L) / L)
            else:
                if parent is not None:
                    report.branches += 1
                s = i
                session_of.append(i)
            tail[s] = i
            members.setdefault(s, []).append(i)
            m = L // BLOCK
            if m and h[m - 1] not in shared:
                chains[h[m - 1]] = i

        made: dict[int, Call] = {}
        for s, idxs in members.items():
            sid = f"{sid_prefix}{rows[s][0]}"
            report.calls_per_session[len(idxs)] += 1
            for k, i in enumerate(idxs):
                line, ts, L, O, h = rows[i]
                prompt = tuple((f"{seg}{x}", BLOCK) for x in h[:-1]) + ((f"{seg}{h[-1]}", L - BLOCK * (len(h) - 1)),)
                gap = None
                if k + 1 < len(idxs):
                    gap = round(max(0.0, rows[idxs[k + 1]][1] - ts) / 1000, 3)
                if O == 0:
                    report.output_zero += 1
                made[i] = Call(
                    session_id=sid,
                    turn=k,
                    prompt=prompt,
                    output_tokens=max(1, O),
                    gap_s=gap,
                    timestamp_s=ts / 1000,
                )
        calls.extend(made[i] for i in range(len(rows)))
    report.calls = len(calls)
    report.sessions = sum(report.calls_per_session.values())
    report.figures = headline_figures(calls, report.follow_up_shares)
    return calls, report


def _shared_blocks(ph: list[int], pL: int, h: list[int], L: int) -> int:
    """Tokens at the start of the prompt ``(h, L)`` that equal the prompt ``(ph, pL)``."""
    shared = 0
    for k, (a, b) in enumerate(zip(ph, h)):
        if a != b:
            break
        na = min(BLOCK, pL - BLOCK * k)
        nb = min(BLOCK, L - BLOCK * k)
        shared += min(na, nb)
        if na != nb:
            break
    return shared


# --------------------------------------------------------------------------- CLI


def find(sources: Iterable[str | Path]) -> list[Path]:
    """Files named, and ``*.jsonl`` / ``*.jsonl.gz`` under directories, sorted."""
    return find_files(sources, (".jsonl", ".jsonl.gz"))


def _arguments(ap) -> None:
    ap.add_argument("--max-fanout", type=int, default=32,
                    help="a block followed by more distinct blocks is shared context, not a session parent")


def main(argv: Sequence[str] | None = None) -> int:
    return importer_main(
        argv,
        "python -m traces.importers.mooncake",
        "Convert Mooncake request traces (.jsonl) into trace format v1, inferring sessions.",
        find,
        convert,
        header,
        notes=NOTES,
        sources_help="Mooncake trace files (.jsonl or .jsonl.gz), or directories searched for them",
        none_found="no trace files found",
        inputs=True,
        arguments=_arguments,
        convert_options=lambda args: {"max_fanout": args.max_fanout},
    )


if __name__ == "__main__":
    sys.exit(main())
