"""Import mini-swe-agent ``.traj.json`` trajectories into trace format v1.

One trajectory file is one session; every assistant message is one LLM call
whose prompt is the list of all messages before it, one segment per message.
No text is kept: a message becomes a segment id and a token count.

Segment ids
    ``<session key>:m<index>`` for the messages of one session (the session key
    is 8 hex digits of sha256 of the session id). The messages before the first
    assistant message (system prompt, task/instance template) get ids from a
    hash of ``(run, role, text)``: ``sys:<8 hex>`` / ``task:<8 hex>``, so
    byte-identical preambles of sessions of the same run share their segment
    (cross-session prefix sharing). Runs are different models, so ids are not
    shared across runs.

Token counts
    A message keeps one count in every prompt that holds it (required for
    prefix sharing). The count is fixed when the message first appears in a
    prompt: the call's provider-reported ``prompt_tokens`` minus the fixed
    counts of the older messages is split over the new messages. An assistant
    message gets its own ``completion_tokens`` (what the provider generated:
    the answer is reused whole); the rest is split over the other new
    messages in proportion to their text length (min 1 token each), so chat
    template and tool-schema overhead lands on them. Shared (hashed) preamble
    segments of role ``system`` get a count from their text alone
    (``len / CHARS_PER_TOKEN``) so that every session agrees on it. For an
    append-only session every call's total equals ``prompt_tokens`` exactly;
    the residual is reported. When a call's ``prompt_tokens`` cannot hold the
    older messages' fixed counts (the context was not append-only), the
    messages from the first one that no longer fits get new segment ids
    (``...:m<i>v<k>``) and the call is counted as non-append-only.

Timing (``extra.timestamp`` is taken when a completion returned / a command
finished)
    latency_s = assistant ts - last tool ts before it; timestamp_s = that tool
    ts (the submission time of the call), epoch seconds; tool duration =
    tool ts - assistant ts; gap_s = last tool ts after the call - assistant ts.
    The first call has no earlier timestamp: its latency_s is left out and
    its timestamp_s is estimated as assistant ts - the session's median
    latency (counted in the report).

CLI: ``python -m traces.importers.miniswe SRC_DIR_OR_FILES... -o OUT.jsonl[.gz]``
"""

from __future__ import annotations

import hashlib
import statistics
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traces.format import Call, ToolCall
# The command classifier lives in traces.importers.commands (shared by the
# importers); re-exported here so that existing imports keep working.
from traces.importers.commands import CATEGORIES, classify_command
from traces.importers.common import Reject, SessionFileReport, category_rows, convert_files, find_files
from traces.importers.common import headline_figures, importer_main, load_json_object, message_text, split_total

__all__ = [
    "CATEGORIES",
    "CHARS_PER_TOKEN",
    "DEFAULT_LICENSE",
    "DEFAULT_SOURCE",
    "HEADER",
    "ImportReport",
    "classify_command",
    "convert",
    "find",
    "find_trajectories",
    "header",
    "headline_figures",
    "main",
]

CONVERTED_BY = "traces.importers.miniswe"
DEFAULT_SOURCE = (
    "SWE-agent/mini-swe-agent, pull-request refs 814 (41a1e33) and 816 (e5e0fbc), "
    "output/<run>/<instance>/<instance>.traj.json"
)
DEFAULT_LICENSE = "MIT (mini-swe-agent repository); data carries no separate license"
HEADER = {"source": DEFAULT_SOURCE, "license": DEFAULT_LICENSE, "converted_by": CONVERTED_BY}


def header() -> dict:
    """Provenance header of a converted trace."""
    return dict(HEADER)


NOTES = (
    "content-free: segment ids are made up or short hashes, token counts are per-message "
    "estimates fixed to the provider-reported prompt_tokens; times are epoch seconds"
)

# Characters per token of the text estimate (the DeepSeek first prompts of the
# bundled data average about 3.3 characters per reported token).
CHARS_PER_TOKEN = 3.3


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport(SessionFileReport):
    """What an import read, made and rejected."""

    non_append_only: int = 0  # calls whose prompt could not extend the previous one
    residual_calls: int = 0  # calls whose segment total != reported prompt_tokens
    residual_abs_tokens: int = 0
    residual_max_tokens: int = 0
    tool_categories: Counter = field(default_factory=Counter)
    tools_without_result: int = 0  # actions with no tool message (e.g. the final submit)
    first_timestamps_estimated: int = 0

    def extra_rows(self):
        return [
            *super().extra_rows(),
            ("non-append-only calls", self.non_append_only),
            ("calls with token residual", self.residual_calls),
            ("token residual |sum| / max", f"{self.residual_abs_tokens} / {self.residual_max_tokens}"),
            ("actions without tool result", self.tools_without_result),
            ("first-call timestamps estimated", self.first_timestamps_estimated),
            *category_rows(self.tool_categories, CATEGORIES),
        ]


# --------------------------------------------------------------------------- conversion


def _sha8(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:8]


def _estimate(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def _session_id(path: Path, data: dict) -> str:
    instance = data.get("instance_id")
    if not isinstance(instance, str) or not instance:
        instance = path.name.removesuffix(".json").removesuffix(".traj")
    run = path.parent.parent.name if path.parent.name == instance else path.parent.name
    return f"{run}/{instance}" if run else instance


def _load(path: Path) -> dict:
    data = load_json_object(path)
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise Reject("no messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Reject(f"message {i} is not an object with a role")
        if m["role"] == "assistant":
            extra = m.get("extra")
            resp = extra.get("response") if isinstance(extra, dict) else None
            usage = resp.get("usage") if isinstance(resp, dict) else None
            if not isinstance(usage, dict):
                raise Reject(f"assistant message {i} has no extra.response.usage")
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(pt) is not int or pt < 1:
                raise Reject(f"assistant message {i}: usage.prompt_tokens is not a positive integer")
            if type(ct) is not int or ct < 0:
                raise Reject(f"assistant message {i}: usage.completion_tokens is not an integer >= 0")
    return data


def _timestamp(m: dict) -> float | None:
    extra = m.get("extra")
    return _num(extra.get("timestamp")) if isinstance(extra, dict) else None


def _convert_session(path: Path, data: dict, shared: dict[str, int], report: ImportReport) -> list[Call]:
    msgs: list[dict] = data["messages"]
    sid = _session_id(path, data)
    run = sid.split("/", 1)[0] if "/" in sid else ""
    key = _sha8(sid)
    assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not assistants:
        return []
    first_a = assistants[0]

    texts = [message_text(m, reasoning=True) for m in msgs]
    seg_id: list[str] = []
    hashed: set[int] = set()
    for i, m in enumerate(msgs):
        if i < first_a and m["role"] in ("system", "user"):
            prefix = "sys" if m["role"] == "system" else "task"
            seg_id.append(f"{prefix}:{_sha8(run, m['role'], texts[i])}")
            hashed.add(i)
        else:
            seg_id.append(f"{key}:m{i}")
    count: list[int | None] = [None] * len(msgs)
    variants = [0] * len(msgs)

    def usage(i: int) -> dict:
        return msgs[i]["extra"]["response"]["usage"]

    # Pass 1: prompts and token counts.
    prompts: list[tuple[tuple[str, int], ...]] = []
    for a in assistants:
        reported = usage(a)["prompt_tokens"]
        # Pre-fixed shared segments (hashed ids seen before, or system text).
        for i in range(a):
            if count[i] is None and i in hashed:
                if seg_id[i] in shared:
                    count[i] = shared[seg_id[i]]
                elif msgs[i]["role"] == "system":
                    count[i] = _estimate(texts[i])
        new = [i for i in range(a) if count[i] is None]
        fixed = sum(count[i] for i in range(a) if count[i] is not None)
        if reported - fixed < len(new):
            # Not append-only: the older messages no longer fit. Re-segment from
            # the first message that does not fit.
            report.non_append_only += 1
            run_sum, cut = 0, 0
            for i in range(a):
                if count[i] is None:
                    break
                if run_sum + count[i] + (a - i - 1) > reported:
                    break
                run_sum += count[i]
                cut = i + 1
            for i in range(cut, a):
                if count[i] is not None:
                    variants[i] += 1
                    seg_id[i] = f"{key}:m{i}v{variants[i]}"
                    count[i] = None
                    hashed.discard(i)
            new = list(range(cut, a))
            fixed = run_sum
        remaining = max(reported - fixed, len(new))
        if new:
            asst_new = [i for i in new if msgs[i]["role"] == "assistant"]
            others = [i for i in new if msgs[i]["role"] != "assistant"]
            # An assistant message gets what the provider generated for it.
            for idx, i in enumerate(asst_new):
                if not others and idx == len(asst_new) - 1:
                    give = remaining
                else:
                    reserve = len(asst_new) - idx - 1 + len(others)  # >= 1 token each
                    give = max(1, min(usage(i)["completion_tokens"], remaining - reserve))
                count[i] = give
                remaining -= give
            if others:
                for i, n in zip(others, split_total(remaining, [len(texts[i]) for i in others])):
                    count[i] = n
            for i in new:
                if i in hashed:
                    shared.setdefault(seg_id[i], count[i])
        prompt = tuple((seg_id[i], count[i]) for i in range(a))
        total = sum(n for _, n in prompt)
        if total != reported:
            report.residual_calls += 1
            report.residual_abs_tokens += abs(total - reported)
            report.residual_max_tokens = max(report.residual_max_tokens, abs(total - reported))
        prompts.append(prompt)

    # Pass 2: timing and tools.
    latencies: list[float | None] = []
    for k, a in enumerate(assistants):
        ts = _timestamp(msgs[a])
        start = assistants[k - 1] + 1 if k else 0
        before = [t for t in (_timestamp(msgs[i]) for i in range(start, a) if msgs[i]["role"] != "assistant") if t is not None]
        if ts is not None and before:
            latencies.append(max(0.0, ts - max(before)))
        else:
            latencies.append(None)
    known = [x for x in latencies if x is not None]
    median_latency = statistics.median(known) if known else 0.0

    calls: list[Call] = []
    writers: set[str] = set()
    for k, a in enumerate(assistants):
        m = msgs[a]
        ts = _timestamp(m)
        end = assistants[k + 1] if k + 1 < len(assistants) else len(msgs)
        results: dict[str, dict] = {}
        after_ts: list[float] = []
        for i in range(a + 1, end):
            r = msgs[i]
            if r["role"] == "tool":
                tcid = r.get("tool_call_id")
                if isinstance(tcid, str):
                    results.setdefault(tcid, r)
                t = _timestamp(r)
                if t is not None:
                    after_ts.append(t)
        names = {}
        for tc in m.get("tool_calls") or []:
            if isinstance(tc, dict) and isinstance(tc.get("function"), dict):
                names[tc.get("id")] = tc["function"].get("name") or "bash"
        tools = []
        actions = m["extra"].get("actions") or []
        tool_msgs = [msgs[i] for i in range(a + 1, end) if msgs[i]["role"] == "tool"]
        for j, act in enumerate(actions):
            if not isinstance(act, dict):
                continue
            cmd = act.get("command")
            cmd = cmd if isinstance(cmd, str) else ""
            tcid = act.get("tool_call_id")
            res = results.get(tcid) if isinstance(tcid, str) else None
            if res is None and tcid is None and j < len(tool_msgs):
                res = tool_msgs[j]
            rts = _timestamp(res) if res is not None else None
            if rts is None or ts is None:
                duration = 0.0
                report.tools_without_result += 1
            else:
                duration = round(max(0.0, rts - ts), 3)
            category = classify_command(cmd, writers)
            report.tool_categories[category] += 1
            tools.append(ToolCall(names.get(tcid, "bash"), category, duration))
        gap = round(max(0.0, max(after_ts) - ts), 3) if after_ts and ts is not None else None
        latency = latencies[k]
        if ts is None:
            timestamp = None
        elif latency is not None:
            timestamp = round(ts - latency, 3)
        else:
            timestamp = round(ts - median_latency, 3)
            report.first_timestamps_estimated += 1
        calls.append(
            Call(
                session_id=sid,
                turn=k,
                prompt=prompts[k],
                output_tokens=max(1, usage(a)["completion_tokens"]),
                output_segment=seg_id[a],
                tools=tuple(tools),
                gap_s=gap,
                timestamp_s=timestamp,
                latency_s=round(latency, 3) if latency is not None else None,
            )
        )
    return calls


def _open_session(path: Path) -> tuple[str, dict]:
    data = _load(path)
    return _session_id(path, data), data


def convert(
    paths: Iterable[str | Path], progress: Callable[[int], None] | None = None
) -> tuple[list[Call], ImportReport]:
    """Convert mini-swe-agent trajectory files (one session each) into calls, in input order;
    a malformed or unreadable file is rejected whole (:func:`~traces.importers.common.convert_files`)."""
    return convert_files(paths, _open_session, _convert_session, ImportReport(), progress)


# --------------------------------------------------------------------------- CLI


def find(sources: Iterable[str | Path]) -> list[Path]:
    """Files named on the command line, and ``*.traj.json`` under directories, sorted."""
    return find_files(sources, ".traj.json")


find_trajectories = find


def main(argv: Sequence[str] | None = None) -> int:
    return importer_main(
        argv,
        "python -m traces.importers.miniswe",
        "Convert mini-swe-agent .traj.json trajectories into trace format v1.",
        find,
        convert,
        header,
        notes=NOTES,
        sources_help="trajectory files, or directories searched for *.traj.json",
        none_found="no trajectory files found",
    )


if __name__ == "__main__":
    sys.exit(main())
