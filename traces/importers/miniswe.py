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

import argparse
import hashlib
import json
import re
import shlex
import statistics
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from traces.format import Call, ToolCall

__all__ = [
    "CATEGORIES",
    "CHARS_PER_TOKEN",
    "DEFAULT_LICENSE",
    "DEFAULT_SOURCE",
    "ImportReport",
    "classify_command",
    "convert",
    "find_trajectories",
    "headline_figures",
    "main",
]

CONVERTED_BY = "traces.importers.miniswe"
DEFAULT_SOURCE = (
    "SWE-agent/mini-swe-agent, pull-request refs 814 (41a1e33) and 816 (e5e0fbc), "
    "output/<run>/<instance>/<instance>.traj.json"
)
DEFAULT_LICENSE = "MIT (mini-swe-agent repository); data carries no separate license"

# Characters per token of the text estimate (the DeepSeek first prompts of the
# bundled data average about 3.3 characters per reported token).
CHARS_PER_TOKEN = 3.3

# Tool categories, most significant first (a command chain gets the most
# significant category of its parts).
CATEGORIES = ("submit", "edit", "test", "install", "python", "git", "read", "grep", "find", "other")
_RANK = {c: i for i, c in enumerate(CATEGORIES)}

_SUBMIT_RE = re.compile(r"\becho\s+['\"]?(COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT|MINI_SWE_AGENT_FINAL_OUTPUT)\b")
_HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_PY_WRITE_RE = re.compile(
    r"open\([^)]*,\s*(?:mode\s*=\s*)?['\"][wax]|\.write_text\(|\.write_bytes\(|"
    r"shutil\.(?:copy\w*|move)\(|os\.(?:remove|rename|replace|unlink)\("
)
_REDIRECT_RE = re.compile(r"(?<![0-9&>])>>?\s*([^\s&|;>]+)")
_ASSIGN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_PY_RE = re.compile(r"^(?:python|python3|python3\.\d+|python2(?:\.\d+)?|pypy3?|py)$")

_READ = {"cat", "head", "tail", "less", "more", "nl", "wc", "awk", "gawk", "hexdump", "xxd", "od",
         "strings", "diff", "cmp", "bat", "view"}
_GREP = {"grep", "egrep", "fgrep", "rg", "ag", "ack", "zgrep"}
_FIND = {"find", "ls", "tree", "pwd", "locate", "fd", "du", "stat", "file", "realpath", "which", "whereis"}
_TEST = {"pytest", "py.test", "tox", "nox", "nosetests", "nose2", "trial"}
_PKG = {"pip", "pip3", "conda", "mamba", "micromamba", "apt", "apt-get", "yum", "dnf", "uv", "poetry"}
_PKG_VERBS = {"install", "uninstall", "add", "remove", "sync", "develop"}
_PREFIX_WORDS = {"do", "then", "else", "elif", "if", "while", "until", "{", "(", "!", "time", "sudo",
                 "nohup", "command", "exec", "env", "stdbuf", "nice"}
_SKIP_WORDS = {"cd", "pushd", "popd", "export", "set", "unset", "source", ".", "for", "select", "done",
               "fi", "esac", "case", "}", ")", "true", "false", ":", "sleep", "clear"}


# --------------------------------------------------------------------------- classifier


def _split_shell(line: str) -> list[list[str]]:
    """Split one command line into ``&&``/``||``/``;``/``&`` parts, each a list of
    ``|`` pipeline stages; quotes and backslash escapes are respected."""
    parts: list[list[str]] = []
    stages: list[str] = []
    buf: list[str] = []
    quote = ""
    i, n = 0, len(line)

    def end_stage():
        stages.append("".join(buf).strip())
        buf.clear()

    def end_part():
        end_stage()
        kept = [s for s in stages if s]
        if kept:
            parts.append(kept)
        stages.clear()

    while i < n:
        c = line[i]
        if quote:
            buf.append(c)
            if c == "\\" and quote == '"' and i + 1 < n:
                buf.append(line[i + 1])
                i += 2
                continue
            if c == quote:
                quote = ""
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            buf.append(line[i : i + 2])
            i += 2
            continue
        if c in "'\"":
            quote = c
            buf.append(c)
            i += 1
            continue
        two = line[i : i + 2]
        if two in ("&&", "||"):
            end_part()
            i += 2
            continue
        if c == ";":
            end_part()
            i += 1
            continue
        if c == "&" and not (buf and buf[-1] in (">", "<")) and line[i + 1 : i + 2] != ">":
            end_part()
            i += 1
            continue
        if c == "|":
            end_stage()
            i += 1
            continue
        buf.append(c)
        i += 1
    end_part()
    return parts


def _quote_state(s: str, quote: str = "") -> str:
    """The quote (``'``, ``"`` or ``""``) still open at the end of ``s``."""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c == quote:
                quote = ""
        elif c == "\\":
            i += 2
            continue
        elif c == "#" and (i == 0 or s[i - 1] in " \t;&|("):
            # A comment runs to the end of the line.
            j = s.find("\n", i)
            if j < 0:
                break
            i = j
        elif c in "'\"":
            quote = c
        i += 1
    return quote


def _lines_with_heredocs(cmd: str) -> list[tuple[str, str]]:
    """``(line, heredoc bodies)`` for each command line. A line goes on while
    a quote is open or it ends in a backslash; heredoc bodies are taken out
    of the line stream and attached to the line that opened them."""
    out: list[tuple[str, str]] = []
    lines = cmd.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        while i < len(lines):
            if line.endswith("\\"):
                line = line[:-1] + " " + lines[i]
            elif _quote_state(line):
                line = line + "\n" + lines[i]
            else:
                break
            i += 1
        body: list[str] = []
        for m in _HEREDOC_RE.finditer(_unquoted(line)):
            term = m.group(2)
            while i < len(lines):
                body_line = lines[i]
                i += 1
                if body_line.strip() == term:
                    break
                body.append(body_line)
        out.append((line, "\n".join(body)))
    return out


def _unquoted(s: str) -> str:
    """``s`` with the contents of quoted strings blanked out (for regexes that
    look for shell operators); a quoted heredoc word (``<< 'EOF'``) stays."""
    out: list[str] = []
    quote = ""
    i, n = 0, len(s)
    while i < n:
        c = s[i]
        if quote:
            if c == "\\" and quote == '"' and i + 1 < n:
                out.append("  ")
                i += 2
                continue
            out.append(c if c == quote else " ")
            if c == quote:
                quote = ""
            i += 1
            continue
        if c == "\\" and i + 1 < n:
            out.append(s[i : i + 2])
            i += 2
            continue
        if c in "'\"":
            j = s.find(c, i + 1)
            if j > 0 and re.search(r"<<-?\s*$", s[:i]):
                out.append(s[i : j + 1])
                i = j + 1
                continue
            quote = c
        out.append(c)
        i += 1
    return "".join(out)


def _words(stage: str) -> list[str]:
    try:
        return shlex.split(stage, comments=True)
    except ValueError:
        return stage.split()


def _written_file(stage: str) -> str | None:
    """The file a stage's output redirection writes, if any."""
    for m in _REDIRECT_RE.finditer(_unquoted(stage)):
        target = m.group(1)
        if target not in ("/dev/null", "/dev/stdout", "/dev/stderr"):
            return target
    return None


def _classify_stage(stage: str, body: str, writers: set[str]) -> str:
    words = _words(stage)
    # Drop prefixes: env assignments, shell keywords, wrappers.
    while words:
        w = words[0].lstrip("({")
        if not w or w in _PREFIX_WORDS or _ASSIGN_RE.match(w):
            words.pop(0)
            continue
        if w == "timeout":
            words.pop(0)
            while words and words[0].startswith("-"):
                words.pop(0)
            if words:
                words.pop(0)  # the duration
            continue
        words[0] = w
        break
    if not words:
        return "other"
    w0 = words[0].rsplit("/", 1)[-1]
    args = words[1:]
    if w0 in _SKIP_WORDS or w0.startswith("#"):
        return ""
    if _PY_RE.match(w0):
        if "-m" in args:
            mod = args[args.index("-m") + 1] if args.index("-m") + 1 < len(args) else ""
            if mod in ("pytest", "unittest", "nose", "nose2", "tox", "py.test", "doctest"):
                return "test"
            if mod in ("pip", "ensurepip") and any(a in _PKG_VERBS for a in args):
                return "install"
        if "setup.py" in " ".join(args) and any(a in ("develop", "install") for a in args):
            return "install"
        code = body
        if "-c" in args:
            code += "\n" + " ".join(args[args.index("-c") + 1 :])
        if code and _PY_WRITE_RE.search(code):
            return "edit"
        script = next((a for a in args if a.endswith(".py") and not a.startswith("-")), None)
        if script is not None and script.rsplit("/", 1)[-1] in writers:
            return "edit"  # a script this session wrote earlier that writes files
        return "python"
    if w0 in _TEST:
        return "test"
    if w0 in _PKG:
        return "install" if any(a in _PKG_VERBS for a in args) else "other"
    if w0 == "git":
        sub = next((a for a in args if not a.startswith("-")), "")
        if sub in ("apply", "am"):
            return "edit"
        if sub == "grep":
            return "grep"
        return "git"
    if w0 == "patch":
        return "edit"
    if w0 == "sed":
        return "edit" if any(_short_flag(a, "i") or a.startswith("--in-place") for a in args) else "read"
    if w0 == "perl" and any(_short_flag(a, "i") for a in args):
        return "edit"
    if w0 in ("awk", "gawk") and "inplace" in args:
        return "edit"
    if w0 == "tee":
        return "edit" if any(not a.startswith("-") and a != "/dev/null" for a in args) else "other"
    if w0 in ("cat", "echo", "printf"):
        target = _written_file(stage)
        if target is not None:
            if body and _PY_WRITE_RE.search(body):
                writers.add(target.rsplit("/", 1)[-1])
            return "edit"
    if w0 in _READ:
        return "read"
    if w0 in _GREP:
        return "grep"
    if w0 in _FIND:
        return "find"
    return "other"


def _short_flag(arg: str, letter: str) -> bool:
    """``arg`` is a bundle of short options that holds ``letter`` (``-i``, ``-ni``, ``-i.bak``)."""
    return arg.startswith("-") and not arg.startswith("--") and letter in arg[1:].split(".", 1)[0]


def classify_command(cmd: str, writers: set[str] | None = None) -> str:
    """Coarse category of a bash command (one of ``CATEGORIES``).

    Each ``&&``/``||``/``;`` part of the command is classified by the first
    stage of its pipeline (``cat f | grep x`` reads, ``grep x f | head``
    greps); ``cd``/``export``/comments count for nothing; the most
    significant category of the parts wins (``cd x && pytest`` -> test,
    ``cat > f.py <<EOF ... EOF && python f.py`` -> edit).

    ``writers`` (updated in place) remembers the scripts that earlier
    commands of the session created with code that writes files, so that
    running one later (``python fix.py``) counts as an edit.
    """
    if writers is None:
        writers = set()
    if _SUBMIT_RE.search(cmd):
        return "submit"
    best = ""
    for line, body in _lines_with_heredocs(cmd):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        for part in _split_shell(line):
            cat = _classify_stage(part[0], body, writers)
            if cat and (not best or _RANK[cat] < _RANK[best]):
                best = cat
    return best or "other"


# --------------------------------------------------------------------------- report


@dataclass
class ImportReport:
    """What an import read, made and rejected."""

    files_read: int = 0
    sessions: int = 0
    calls: int = 0
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    empty: list[str] = field(default_factory=list)  # well-formed files without LLM calls
    non_append_only: int = 0  # calls whose prompt could not extend the previous one
    residual_calls: int = 0  # calls whose segment total != reported prompt_tokens
    residual_abs_tokens: int = 0
    residual_max_tokens: int = 0
    tool_categories: Counter = field(default_factory=Counter)
    tools_without_result: int = 0  # actions with no tool message (e.g. the final submit)
    first_timestamps_estimated: int = 0
    figures: dict = field(default_factory=dict)

    def render(self) -> str:
        rows = [
            ("files read", self.files_read),
            ("sessions", self.sessions),
            ("calls", self.calls),
            ("rejected files", len(self.rejected)),
            ("files without LLM calls (skipped)", len(self.empty)),
            ("non-append-only calls", self.non_append_only),
            ("calls with token residual", self.residual_calls),
            ("token residual |sum| / max", f"{self.residual_abs_tokens} / {self.residual_max_tokens}"),
            ("actions without tool result", self.tools_without_result),
            ("first-call timestamps estimated", self.first_timestamps_estimated),
        ]
        for cat in CATEGORIES:
            if self.tool_categories.get(cat):
                rows.append((f"tools: {cat}", self.tool_categories[cat]))
        for key, value in self.figures.items():
            if key not in ("sessions", "calls"):
                rows.append((key, value))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        for path, reason in self.rejected:
            lines.append(f"rejected: {path}: {reason}")
        for path in self.empty:
            lines.append(f"skipped (no LLM calls): {path}")
        return "\n".join(lines)


def headline_figures(calls: Sequence[Call]) -> dict:
    """Headline figures of a converted trace (medians over calls/sessions)."""
    by_session: dict[str, list[Call]] = {}
    for c in calls:
        by_session.setdefault(c.session_id, []).append(c)
    shares: list[float] = []
    for sc in by_session.values():
        sc.sort(key=lambda c: c.turn)
        for prev, cur in zip(sc, sc[1:]):
            shares.append(_reuse_share(prev, cur))
    durations = [t.duration_s for c in calls for t in c.tools if t.category != "submit"]

    def med(xs):
        return statistics.median(xs) if xs else 0

    return {
        "sessions": len(by_session),
        "calls": len(calls),
        "median calls/session": med([len(v) for v in by_session.values()]),
        "median prompt tokens": med([c.prompt_tokens for c in calls]),
        "median output tokens": med([c.output_tokens for c in calls]),
        "median tool duration s": round(med(durations), 3),
        "median reuse share (prev prompt + answer)": round(med(shares), 4),
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


# --------------------------------------------------------------------------- conversion


class _Reject(Exception):
    pass


def _sha8(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:8]


def _text(value) -> str:
    """Message content as text (strings, or lists of ``{"text": ...}`` parts)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(v.get("text", "") if isinstance(v, dict) else v) for v in value)
    return json.dumps(value, sort_keys=True)


def _message_text(m: dict) -> str:
    """The text a message contributes to later prompts (for length estimates)."""
    parts = [_text(m.get("content"))]
    if m.get("role") == "assistant":
        parts.append(_text(m.get("reasoning_content")))
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                parts.append(str(fn.get("name") or ""))
                parts.append(str(fn.get("arguments") or ""))
    return "".join(parts)


def _estimate(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def _split(total: int, weights: list[int]) -> list[int]:
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
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise _Reject(f"unreadable ({e.strerror or e})") from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise _Reject(f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise _Reject("not a JSON object")
    msgs = data.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _Reject("no messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Reject(f"message {i} is not an object with a role")
        if m["role"] == "assistant":
            extra = m.get("extra")
            resp = extra.get("response") if isinstance(extra, dict) else None
            usage = resp.get("usage") if isinstance(resp, dict) else None
            if not isinstance(usage, dict):
                raise _Reject(f"assistant message {i} has no extra.response.usage")
            pt, ct = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if type(pt) is not int or pt < 1:
                raise _Reject(f"assistant message {i}: usage.prompt_tokens is not a positive integer")
            if type(ct) is not int or ct < 0:
                raise _Reject(f"assistant message {i}: usage.completion_tokens is not an integer >= 0")
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

    texts = [_message_text(m) for m in msgs]
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
                for i, n in zip(others, _split(remaining, [len(texts[i]) for i in others])):
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


def convert(paths: Iterable[Path]) -> tuple[list[Call], ImportReport]:
    """Convert trajectory files (one session each) into calls, in input order.

    A malformed or unreadable file is rejected whole (``report.rejected``
    names it and says why); the others are still converted.
    """
    report = ImportReport()
    calls: list[Call] = []
    shared: dict[str, int] = {}
    seen: set[str] = set()
    for p in paths:
        path = Path(p)
        report.files_read += 1
        try:
            data = _load(path)
            sid = _session_id(path, data)
            if sid in seen:
                raise _Reject(f"duplicate session id {sid!r}")
            session_calls = _convert_session(path, data, shared, report)
        except _Reject as e:
            report.rejected.append((str(path), str(e)))
            continue
        seen.add(sid)
        if not session_calls:
            report.empty.append(str(path))
            continue
        report.sessions += 1
        report.calls += len(session_calls)
        calls.extend(session_calls)
    report.figures = headline_figures(calls)
    return calls, report


# --------------------------------------------------------------------------- CLI


def find_trajectories(sources: Iterable[str | Path]) -> list[Path]:
    """Files named on the command line, and ``*.traj.json`` under directories, sorted."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            out.extend(sorted(p.rglob("*.traj.json")))
        else:
            out.append(p)
    return out


def _write(path: Path, calls: list[Call], header: dict) -> None:
    try:
        from traces.reader import write_trace
    except ImportError:  # pragma: no cover - the reader ships with the project
        import gzip

        from traces.format import header_line

        data = (header_line(**header) + "\n" + "".join(c.to_line() + "\n" for c in calls)).encode()
        if path.name.endswith(".gz"):
            with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
                f.write(data)
        else:
            path.write_bytes(data)
        return
    write_trace(path, calls, header=header)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m traces.importers.miniswe",
        description="Convert mini-swe-agent .traj.json trajectories into trace format v1.",
    )
    ap.add_argument("sources", nargs="+", help="trajectory files, or directories searched for *.traj.json")
    ap.add_argument("-o", "--output", required=True, help="output trace (.jsonl or .jsonl.gz)")
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="provenance for the header")
    ap.add_argument("--license", default=DEFAULT_LICENSE, help="license note for the header")
    args = ap.parse_args(argv)

    paths = find_trajectories(args.sources)
    if not paths:
        print("no trajectory files found", file=sys.stderr)
        return 2
    calls, report = convert(paths)
    print(report.render())
    if not calls:
        print("nothing converted", file=sys.stderr)
        return 1
    header = {
        "source": args.source,
        "license": args.license,
        "converted_by": CONVERTED_BY,
        "sessions": report.sessions,
        "calls": report.calls,
        "notes": (
            "content-free: segment ids are made up or short hashes, token counts are per-message "
            "estimates fixed to the provider-reported prompt_tokens; times are epoch seconds"
        ),
    }
    _write(Path(args.output), calls, header)
    print(f"wrote {len(calls)} calls to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
