"""What an upstream's answer says about a call: output, tool calls, usage, first token.

:class:`Outcome` is filled from a whole JSON body (:func:`read_body`) or, for a
streamed answer, chunk by chunk as the bytes pass through
(:class:`StreamReader`: an incremental server-sent-events parser). The output
text and the tool arguments are kept in memory only as long as the call runs:
the recorder hashes them into the call's ``output_segment`` and classifies the
arguments, and stores neither.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from recorder.segments import assistant_text, canonical_arguments

__all__ = ["Outcome", "StreamReader", "read_body"]


@dataclass
class Outcome:
    """The parts of one answer the trace needs (``api``: ``chat``, ``completions`` or ``messages``)."""

    api: str
    texts: list[str] = field(default_factory=list)
    tools: list[tuple[str, str]] = field(default_factory=list)  # (name, canonical arguments)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    cached_tokens: int | None = None
    first_token_t: float | None = None  # perf_counter time of the first output chunk (streams)
    chunks: int = 0  # output-bearing stream events
    error: str | None = None  # an error event inside a stream

    @property
    def output_text(self) -> str:
        """Canonical text of the answer, as :func:`recorder.segments.assistant_text` builds it."""
        return assistant_text(self.texts, self.tools)


def _int(v) -> int | None:
    return v if type(v) is int and v >= 0 else None


def _openai_usage(out: Outcome, usage) -> None:
    if not isinstance(usage, dict):
        return
    out.prompt_tokens = _int(usage.get("prompt_tokens"))
    out.output_tokens = _int(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict):
        out.cached_tokens = _int(details.get("cached_tokens"))


def _anthropic_usage(out: Outcome, usage) -> None:
    """Anthropic counts the prompt as input + cache read + cache creation tokens."""
    if not isinstance(usage, dict):
        return
    if (n := _int(usage.get("output_tokens"))) is not None:
        out.output_tokens = n
    if (n := _int(usage.get("input_tokens"))) is not None:
        read = _int(usage.get("cache_read_input_tokens")) or 0
        created = _int(usage.get("cache_creation_input_tokens")) or 0
        out.prompt_tokens = n + read + created
        out.cached_tokens = read


def _first_choice(data: dict) -> dict:
    choices = data.get("choices")
    return choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}


def read_body(api: str, body: bytes) -> Outcome:
    """The outcome of a whole (non-streamed) JSON answer; an unreadable body gives an empty outcome."""
    out = Outcome(api)
    try:
        data = json.loads(body)
    except ValueError:
        return out
    if not isinstance(data, dict):
        return out
    if api == "messages":
        for block in data.get("content") or []:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "tool_use":
                out.tools.append((str(block.get("name") or ""), canonical_arguments(block.get("input") or {})))
            elif block.get("type") == "thinking":
                out.texts.append(str(block.get("thinking") or ""))
            elif block.get("type") == "text":
                out.texts.append(str(block.get("text") or ""))
        _anthropic_usage(out, data.get("usage"))
        return out
    choice = _first_choice(data)
    if api == "completions":
        out.texts.append(str(choice.get("text") or ""))
    else:
        m = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        if isinstance(m.get("content"), str):
            out.texts.append(m["content"])
        for tc in m.get("tool_calls") or []:
            fn = tc.get("function") if isinstance(tc, dict) else None
            if isinstance(fn, dict):
                out.tools.append((str(fn.get("name") or ""), canonical_arguments(fn.get("arguments") or "")))
    _openai_usage(out, data.get("usage"))
    return out


class StreamReader:
    """Parses a server-sent-events answer as its bytes pass; :meth:`finish` gives the outcome."""

    def __init__(self, api: str, clock=time.perf_counter):
        self.out = Outcome(api)
        self._clock = clock
        self._buf = b""
        self._data: list[bytes] = []
        self._tool_parts: dict[int, list] = {}  # index -> [name, [argument pieces]]
        self._text_parts: dict[int, list[str]] = {}
        #: the answer's last event has passed (OpenAI ``[DONE]``, Anthropic ``message_stop``): a client
        #: may close the connection now without waiting for the stream's end
        self.ended = False

    def feed(self, chunk: bytes) -> None:
        buf = self._buf + chunk
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if not line:
                if self._data:
                    self._event(b"\n".join(self._data))
                    self._data = []
            elif line.startswith(b"data:"):
                self._data.append(line[5:].lstrip(b" "))

    def finish(self) -> Outcome:
        if self._buf.strip() or self._data:
            self.feed(b"\n\n")
        out = self.out
        out.texts = ["".join(self._text_parts[i]) for i in sorted(self._text_parts)]
        out.tools = [(name, canonical_arguments("".join(args))) for name, args in
                     (self._tool_parts[i] for i in sorted(self._tool_parts))]
        return out

    def _output(self) -> None:
        self.out.chunks += 1
        if self.out.first_token_t is None:
            self.out.first_token_t = self._clock()

    def _event(self, payload: bytes) -> None:
        if payload == b"[DONE]":
            self.ended = True
            return
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        if self.out.api == "messages":
            self._anthropic(data)
        else:
            self._openai(data)

    def _openai(self, data: dict) -> None:
        if isinstance(data.get("error"), dict):
            self.out.error = str(data["error"].get("type") or data["error"].get("code") or "error")
        if data.get("usage"):
            _openai_usage(self.out, data["usage"])
        choices = data.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue  # n > 1: the first choice stands for the output
            if self.out.api == "completions":
                if choice.get("text"):
                    self._text_parts.setdefault(0, []).append(choice["text"])
                    self._output()
                continue
            delta = choice.get("delta")
            if not isinstance(delta, dict):
                continue
            got = False
            if isinstance(delta.get("content"), str) and delta["content"]:
                self._text_parts.setdefault(0, []).append(delta["content"])
                got = True
            if delta.get("reasoning_content") or delta.get("reasoning"):
                got = True  # generated tokens, not part of the message sent back
            for tc in delta.get("tool_calls") or []:
                if not isinstance(tc, dict):
                    continue
                slot = self._tool_parts.setdefault(tc.get("index", 0), ["", []])
                fn = tc.get("function") or {}
                if fn.get("name"):
                    slot[0] += fn["name"]
                if fn.get("arguments"):
                    slot[1].append(fn["arguments"])
                got = True
            if got:
                self._output()

    def _anthropic(self, data: dict) -> None:
        kind = data.get("type")
        if kind == "message_stop":
            self.ended = True
        if kind == "content_block_delta":
            delta = data.get("delta") or {}
            i = data.get("index", 0)
            dt = delta.get("type")
            if dt == "text_delta":
                self._text_parts.setdefault(i, []).append(str(delta.get("text") or ""))
            elif dt == "thinking_delta":
                self._text_parts.setdefault(i, []).append(str(delta.get("thinking") or ""))
            elif dt == "input_json_delta":
                self._tool_parts.setdefault(i, ["", []])[1].append(str(delta.get("partial_json") or ""))
            else:
                return
            self._output()
        elif kind == "content_block_start":
            block = data.get("content_block") or {}
            i = data.get("index", 0)
            if block.get("type") == "tool_use":
                self._tool_parts[i] = [str(block.get("name") or ""), []]
                self._output()
            elif block.get("type") in ("text", "thinking"):
                first = block.get("text") or block.get("thinking") or ""
                self._text_parts[i] = [first] if first else []
        elif kind == "message_start":
            _anthropic_usage(self.out, (data.get("message") or {}).get("usage"))
        elif kind == "message_delta":
            _anthropic_usage(self.out, data.get("usage"))
        elif kind == "error":
            err = data.get("error") or {}
            self.out.error = str(err.get("type") or "error")
