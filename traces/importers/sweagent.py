"""Import SWE-agent ``.traj`` trajectories into trace format v1.

**Tested only on a synthetic fixture** (``tests/data/sweagent/example.traj``,
hand-written) that follows the trajectory schema documented in the SWE-agent
repository (``SWE-agent/SWE-agent``: ``sweagent/types.py`` ``TrajectoryStep``,
``HistoryItem``, ``AgentInfo``; ``docs/usage/trajectories.md``). No real
SWE-agent trajectory is used in this project's tests. (A manual run, outside
the tests, over the 22 ``.traj`` files that the SWE-agent repository ships as
demonstrations and test data, older formats without ``query``, converted
them all without rejections.)

A ``.traj`` file is a JSON object: ``history`` (every message the agent kept:
``role``, ``content``, ``message_type``, ``agent``, ``is_demo``, ``action``,
``tool_calls``...), ``trajectory`` (one step per executed action:
``action``, ``observation``, ``response``, ``thought``, ``execution_time``,
``state``, ``query``...), ``info`` (``model_stats`` with ``tokens_sent``,
``tokens_received``, ``api_calls``; ``exit_status``, ``submission``) and
``environment``. One file is one session. No text is kept.

Calls
    Every assistant message of ``history`` (the messages of the agent that
    wrote the system message, as SWE-agent filters them) ends one LLM call;
    the k-th one goes with ``trajectory[k]``. The call's prompt is, one
    segment per message:

    * ``trajectory[k].query`` when every step has a non-empty ``query`` and
      there is one step per assistant message (SWE-agent >= 1.1 records there
      the exact messages sent, after history processors such as
      ``last_n_observations`` rewrote old observations), else
    * all messages of ``history`` before the assistant message.

    Model calls that SWE-agent re-queried after a format error are not in
    ``history`` (they are counted in ``api_calls`` only).

Segment ids
    ``<role>:<12 hex>``, the hex being sha256 of (previous segment's id, role,
    text): chained hashes, so equal ids mean equal text after an equal
    prefix. Identical system prompts and demonstrations of different sessions
    get the same ids (cross-session prefix sharing). The assistant message of
    call k is ``output_segment`` of call k.

Token counts
    Per message ``len(text) / CHARS_PER_TOKEN`` (text = content, plus the
    function name and arguments of tool calls for assistant messages), scaled
    per session so that the totals match ``info.model_stats``: assistant
    messages by ``tokens_received`` and the other messages by
    ``tokens_sent`` (less the fixed counts below), each per call
    (``tokens / api_calls * calls``, since ``api_calls`` can count
    re-queries). **Per-call counts are not recorded in a trajectory: totals
    are matched over the session, not call by call.** Fixed counts:
    system and demonstration messages before the first assistant message get
    their unscaled estimate, so every session agrees on them, and a segment
    id already met in an earlier session keeps its count. Without usable
    stats (missing or 0, as in replayed demonstrations) the estimates are
    used unscaled (reported). A message keeps one count in every prompt,
    and ``output_tokens`` is the count of the call's assistant segment.

Tools
    The call's action (``action`` of the assistant message, else of the
    step) is one tool, named by the function of the message's first tool
    call (function-calling configs: ``bash``, ``str_replace_editor``,
    ``submit``...), else by the action's first word. Category: SWE-agent's own
    tools by name (``submit``; ``open``/``goto``/``scroll_*``/``filemap`` read;
    ``create``/``edit``/``insert``/``append`` and ``str_replace_editor``'s
    editing commands edit, its ``view`` read; ``find_file`` find;
    ``search_dir``/``search_file`` grep), anything else by
    ``classify_command``. ``duration_s`` = the step's ``execution_time``.
    There are no timestamps: ``gap_s``, ``timestamp_s`` and ``latency_s`` are
    not set (the gap defaults to the tool duration).

A malformed file (unreadable, not JSON, truncated, no ``history``, bad
messages) is rejected whole with its name and the reason.

CLI: ``python -m traces.importers.sweagent SRC_DIR_OR_FILES... -o OUT.jsonl[.gz]``
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traces.format import Call, ToolCall
from traces.importers.commands import CATEGORIES, classify_command
from traces.importers.common import Reject, SessionFileReport, category_rows, chain_id, convert_files, find_files
from traces.importers.common import importer_main, load_json_object, message_text

__all__ = [
    "CHARS_PER_TOKEN",
    "HEADER",
    "ImportReport",
    "classify_action",
    "convert",
    "find",
    "find_trajectories",
    "header",
    "main",
]

CONVERTED_BY = "traces.importers.sweagent"
HEADER = {
    "source": "SWE-agent trajectories (SWE-agent/SWE-agent, <run>/<instance>/<instance>.traj)",
    "license": "as the converted trajectories (SWE-agent code: MIT)",
    "converted_by": CONVERTED_BY,
}


def header() -> dict:
    """Provenance header of a converted trace."""
    return dict(HEADER)


NOTES = (
    "content-free: segment ids are chained sha256 hashes; token counts are len(text)/4 estimates "
    "scaled per session to info.model_stats totals (not per call); tool durations are the steps' "
    "execution_time; no timestamps"
)

CHARS_PER_TOKEN = 4.0

_TOOL_CATEGORIES = {
    "submit": "submit",
    "open": "read",
    "goto": "read",
    "scroll_up": "read",
    "scroll_down": "read",
    "filemap": "read",
    "create": "edit",
    "edit": "edit",
    "insert": "edit",
    "append": "edit",
    "find_file": "find",
    "search_dir": "grep",
    "search_file": "grep",
}
_EDITORS = {"str_replace_editor", "str_replace_based_edit_tool"}
_EDITOR_COMMANDS = {"view": "read", "create": "edit", "str_replace": "edit", "insert": "edit", "undo_edit": "edit"}


def classify_action(action: str, writers: set[str] | None = None) -> str:
    """Category of a SWE-agent action: its own tools by name, else ``classify_command``."""
    words = action.split()
    if not words:
        return "other"
    if words[0] in _TOOL_CATEGORIES:
        return _TOOL_CATEGORIES[words[0]]
    if words[0] in _EDITORS:
        return _EDITOR_COMMANDS.get(words[1] if len(words) > 1 else "", "other")
    return classify_command(action, writers)


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport(SessionFileReport):
    """What an import read, made and rejected."""

    prompts_from_query: int = 0  # sessions whose prompts are the steps' recorded queries
    prompts_from_history: int = 0
    scaled_sessions: int = 0  # token estimates scaled to model_stats
    unscaled_sessions: int = 0  # no usable model_stats: raw estimates
    sent_residual_tokens: int = 0  # sum over sessions of |sum of prompt tokens - tokens_sent target|
    step_mismatches: int = 0  # sessions whose trajectory has not one step per assistant message
    tools_without_duration: int = 0
    tool_categories: Counter = field(default_factory=Counter)

    def extra_rows(self):
        return [
            *super().extra_rows(),
            ("prompts from step queries / history", f"{self.prompts_from_query} / {self.prompts_from_history}"),
            ("sessions scaled to model_stats / unscaled", f"{self.scaled_sessions} / {self.unscaled_sessions}"),
            ("tokens_sent residual (sum over sessions)", self.sent_residual_tokens),
            ("sessions with step/message mismatch", self.step_mismatches),
            ("tools without execution_time", self.tools_without_duration),
            *category_rows(self.tool_categories, CATEGORIES),
        ]


# --------------------------------------------------------------------------- reading


def _tool_name(m: dict) -> str | None:
    """The function name of an assistant message's first tool call (function calling)."""
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str) and fn["name"]:
            return fn["name"]
    return None


def _num(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _check_messages(msgs, where: str) -> None:
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise Reject(f"{where}[{i}] is not an object with a role")


def _load(path: Path) -> dict:
    data = load_json_object(path)
    history = data.get("history")
    if history is None:
        raise Reject("no history")
    if not isinstance(history, list) or not history:
        raise Reject("history is not a non-empty list")
    _check_messages(history, "history")
    traj = data.get("trajectory") or []
    if not isinstance(traj, list) or not all(isinstance(s, dict) for s in traj):
        raise Reject("trajectory is not a list of step objects")
    info = data.get("info") or {}
    if not isinstance(info, dict):
        raise Reject("info is not an object")
    return data


def _session_id(path: Path) -> str:
    instance = path.name.removesuffix(".traj")
    run = path.parent.parent.name if path.parent.name == instance else path.parent.name
    return f"{run}/{instance}" if run else instance


# --------------------------------------------------------------------------- conversion


def _queries(traj: list[dict], n_calls: int) -> list[list[dict]] | None:
    """The steps' recorded queries, if every call has a usable one."""
    if len(traj) != n_calls:
        return None
    out = []
    for step in traj:
        q = step.get("query")
        if not isinstance(q, list) or not q:
            return None
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in q):
            return None
        out.append(q)
    return out


def _convert_session(path: Path, data: dict, shared: dict[str, int], report: ImportReport) -> list[Call]:
    sid = _session_id(path)
    history: list[dict] = data["history"]
    agent = history[0].get("agent")
    msgs = [m for m in history if m.get("agent", agent) == agent]
    assistants = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not assistants:
        return []
    n = len(assistants)
    traj: list[dict] = data.get("trajectory") or []
    if len(traj) != n:
        report.step_mismatches += 1
    first_a = assistants[0]
    if first_a == 0:
        raise Reject("the first message is an assistant message (a call with an empty prompt)")

    # Prompt messages of each call: (role, text, fixed-unscaled?).
    queries = _queries(traj, n)
    prompt_msgs: list[list[tuple[str, str, bool]]] = []
    if queries is not None:
        report.prompts_from_query += 1
        for q in queries:
            first_q = next((i for i, m in enumerate(q) if m["role"] == "assistant"), len(q))
            prompt_msgs.append(
                [(m["role"], message_text(m), i < first_q and (m["role"] == "system" or bool(m.get("is_demo"))))
                 for i, m in enumerate(q)]
            )
    else:
        report.prompts_from_history += 1
        all_msgs = [
            (m["role"], message_text(m), i < first_a and (m["role"] == "system" or bool(m.get("is_demo"))))
            for i, m in enumerate(msgs)
        ]
        prompt_msgs = [all_msgs[:a] for a in assistants]
    outputs = [message_text(msgs[a]) for a in assistants]

    # Segment ids (chained), and which estimate each one gets.
    prompt_ids: list[list[str]] = []
    out_ids: list[str] = []
    est: dict[str, float] = {}
    group: dict[str, str] = {}  # id -> "fixed" | "asst" | "other"
    for k, pm in enumerate(prompt_msgs):
        ids, prev = [], ""
        for role, text, fixed in pm:
            prev = chain_id(prev, role, text)
            ids.append(prev)
            est.setdefault(prev, len(text) / CHARS_PER_TOKEN)
            group.setdefault(prev, "fixed" if fixed else "asst" if role == "assistant" else "other")
        prompt_ids.append(ids)
        oid = chain_id(prev, "assistant", outputs[k])
        out_ids.append(oid)
        est.setdefault(oid, len(outputs[k]) / CHARS_PER_TOKEN)
        group.setdefault(oid, "asst")

    stats = (data.get("info") or {}).get("model_stats")
    stats = stats if isinstance(stats, dict) else {}
    api_calls = _num(stats.get("api_calls"))
    sent, received = _num(stats.get("tokens_sent")), _num(stats.get("tokens_received"))
    per_call = n / api_calls if api_calls and api_calls > 0 else None

    count: dict[str, int] = {}

    def fix(ids, factor):
        for i in ids:
            if i not in count:
                count[i] = shared[i] if i in shared else max(1, round(est[i] * factor))

    fix([i for i in est if group[i] == "fixed"], 1.0)
    # Outputs: scaled to tokens_received (per call).
    f_recv = 1.0
    asst_est = sum(est[i] for i in out_ids if i not in shared)
    if per_call and received and received > 0 and asst_est > 0:
        target = received * per_call - sum(shared[i] for i in out_ids if i in shared)
        if target > 0:
            f_recv = target / asst_est
    fix(out_ids, f_recv)
    fix([i for i in est if group[i] == "asst"], f_recv)
    # Other messages: scaled so that the prompts sum to tokens_sent (per call).
    f_sent = None
    if per_call and sent and sent > 0:
        target_sent = sent * per_call
        fixed_total = sum(count[i] for ids in prompt_ids for i in ids if i in count)
        var_total = sum(est[i] for ids in prompt_ids for i in ids if i not in count)
        if var_total > 0 and target_sent > fixed_total:
            f_sent = (target_sent - fixed_total) / var_total
    fix(list(est), f_sent if f_sent is not None else 1.0)
    if f_sent is not None:
        report.scaled_sessions += 1
        total = sum(count[i] for ids in prompt_ids for i in ids)
        report.sent_residual_tokens += abs(round(total - sent * per_call))
    else:
        report.unscaled_sessions += 1
    for i, c in count.items():
        shared.setdefault(i, c)

    calls: list[Call] = []
    writers: set[str] = set()
    for k, a in enumerate(assistants):
        step = traj[k] if k < len(traj) else {}
        action = msgs[a].get("action")
        if not isinstance(action, str) or not action.strip():
            action = step.get("action")
        tools: tuple[ToolCall, ...] = ()
        if isinstance(action, str) and action.strip():
            duration = _num(step.get("execution_time"))
            if duration is None or duration < 0:
                report.tools_without_duration += 1
                duration = 0.0
            category = classify_action(action, writers)
            report.tool_categories[category] += 1
            tools = (ToolCall(_tool_name(msgs[a]) or action.split()[0], category, duration),)
        calls.append(
            Call(
                session_id=sid,
                turn=k,
                prompt=tuple((i, count[i]) for i in prompt_ids[k]),
                output_tokens=count[out_ids[k]],
                output_segment=out_ids[k],
                tools=tools,
            )
        )
    return calls


def _open_session(path: Path) -> tuple[str, dict]:
    data = _load(path)
    return _session_id(path), data


def convert(
    paths: Iterable[str | Path], progress: Callable[[int], None] | None = None
) -> tuple[list[Call], ImportReport]:
    """Convert SWE-agent ``.traj`` files into calls (one session per file, in input order;
    a malformed file is rejected whole, see :func:`~traces.importers.common.convert_files`)."""
    return convert_files(paths, _open_session, _convert_session, ImportReport(), progress)


# --------------------------------------------------------------------------- CLI


def find(sources: Iterable[str | Path]) -> list[Path]:
    """Files named, and ``*.traj`` under directories named, sorted."""
    return find_files(sources, ".traj")


find_trajectories = find


def main(argv: Sequence[str] | None = None) -> int:
    return importer_main(
        argv,
        "python -m traces.importers.sweagent",
        "Convert SWE-agent .traj trajectories into trace format v1.",
        find,
        convert,
        header,
        notes=NOTES,
        sources_help="trajectory files, or directories searched for *.traj",
        none_found="no trajectory files found",
    )


if __name__ == "__main__":
    sys.exit(main())
