"""Requests and responses as content-free segments: salted, chained hashes of their parts.

A prompt is cut into *units*, one per piece of content the model reads, in the
order the server renders them: the tool definitions (one unit), then the
system prompt and every message. A system, user or tool message is one unit
per content part (Anthropic blocks, OpenAI content parts: a plain-string
content is one part); an assistant message is one unit whole (text, thinking
and tool calls together), because it was generated as one output and so can
be matched with the ``output_segment`` of the call that produced it.

A unit's segment id is ``<kind>:<12 hex>``, ``traces.importers.common.chain_id``
of (previous unit's id, kind, salt + canonical text): chained, so equal ids
mean equal content after an equal prefix, and salted with a secret of the
recording, so an id cannot be checked against a guessed text. The canonical
text leaves out what an agent changes without changing what the model reads
(``cache_control`` markers, tool-call ids) and writes tool arguments as sorted
JSON, so the assistant unit of a later prompt gets the same id as the
response it repeats (:func:`assistant_text` builds both).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from traces.importers.common import chain_id

__all__ = ["CHARS_PER_TOKEN", "Unit", "assistant_text", "canonical_arguments", "chain", "estimate_tokens",
           "prompt_units"]

#: characters per token of the estimate (scaled to the upstream's usage when it reports one)
CHARS_PER_TOKEN = 4.0

_IGNORED_KEYS = ("cache_control",)


@dataclass(frozen=True, slots=True)
class Unit:
    """One piece of prompt content: its kind (role or ``tools``) and canonical text (kept in memory only)."""

    kind: str
    text: str
    tokens: int | None = None  # exact count when known (a prompt sent as token ids)


def estimate_tokens(text: str) -> int:
    return max(1, round(len(text) / CHARS_PER_TOKEN))


def _dumps(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _strip(value):
    """``value`` without the keys that mark caching but change nothing the model reads."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in _IGNORED_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def canonical_arguments(arguments) -> str:
    """Tool-call arguments as sorted JSON (a JSON string is parsed first; other text stays as is)."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments
    return _dumps(arguments)


def assistant_text(texts: Iterable[str], tools: Iterable[tuple[str, str]]) -> str:
    """Canonical text of an assistant message: its texts, then each tool call's name and arguments."""
    parts = [t for t in texts if t]
    for name, args in tools:
        parts.append(f"\x1etool\x1f{name}\x1f{args}")
    return "\x1d".join(parts)


def _part_text(part) -> str:
    if isinstance(part, str):
        return part
    if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    return _dumps(_strip(part))


def _parts(content) -> list[str]:
    if content is None:
        return []
    if isinstance(content, list):
        return [_part_text(p) for p in content]
    return [_part_text(content)]


def _openai_assistant(m: dict) -> str:
    texts = _parts(m.get("content"))
    tools = []
    for tc in m.get("tool_calls") or []:
        fn = tc.get("function") if isinstance(tc, dict) else None
        if isinstance(fn, dict):
            tools.append((str(fn.get("name") or ""), canonical_arguments(fn.get("arguments") or "")))
    return assistant_text(texts, tools)


def _anthropic_assistant(content) -> str:
    if not isinstance(content, list):
        return assistant_text(_parts(content), ())
    texts, tools = [], []
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_use":
            tools.append((str(block.get("name") or ""), canonical_arguments(block.get("input") or {})))
        elif kind == "thinking":
            texts.append(str(block.get("thinking") or ""))
        elif kind == "redacted_thinking":
            texts.append(str(block.get("data") or ""))
        else:
            texts.append(_part_text(block))
    return assistant_text(texts, tools)


def prompt_units(api: str, body: dict) -> list[Unit]:
    """The prompt units of a request body of ``api`` (``chat``, ``completions`` or ``messages``)."""
    units: list[Unit] = []
    if api == "completions":
        prompt = body.get("prompt")
        prompts = prompt if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)) else [prompt]
        return [Unit("prompt", p) if isinstance(p, str) else Unit("prompt", _dumps(p), len(p) if isinstance(p, list) else None)
                for p in prompts]
    tools = body.get("tools")
    if tools:
        units.append(Unit("tools", _dumps(_strip(tools))))
    if api == "messages":
        units += [Unit("system", t) for t in _parts(body.get("system"))]
    for m in body.get("messages") or []:
        if not isinstance(m, dict):
            units.append(Unit("other", _dumps(m)))
            continue
        role = str(m.get("role") or "other")
        if role == "assistant":
            text = _anthropic_assistant(m.get("content")) if api == "messages" else _openai_assistant(m)
            units.append(Unit("assistant", text))
        else:
            parts = _parts(m.get("content"))
            units += [Unit(role, t) for t in parts] or [Unit(role, "")]
    return units


def chain(units: Iterable[Unit], salt: str, prev: str = "") -> list[str]:
    """The chained, salted segment ids of ``units`` (after the id ``prev``)."""
    ids = []
    for u in units:
        prev = chain_id(prev, u.kind, salt + u.text)
        ids.append(prev)
    return ids
