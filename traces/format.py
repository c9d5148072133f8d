"""Trace format v2 (v1 files stay valid): the content-free record of coding-agent sessions.

One JSON object per line, one line per LLM call (see ``docs/trace-format.md``).
A call's prompt is an ordered list of *segments* ``[segment_id, n_tokens]``.
Token identity is ``(segment_id, position inside the segment)``: two prompts
hold the same token at the same place exactly when their segment lists agree
up to that place, so two calls share a prefix exactly as far as their segment
lists agree. The simulator turns segments into chained block hashes for any
block size (``cwsim.hashing``).

This module holds the data model and its JSON encoding; ``traces.reader``
validates files line by line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from operator import itemgetter

_second = itemgetter(1)

FORMAT_NAME = "cwtrace"
FORMAT_VERSION = 2  # 2: adds the compact call form (docs/trace-format.md); version 1 files stay valid


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call that an LLM response makes."""

    name: str
    category: str = "other"
    duration_s: float = 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "category": self.category, "duration_s": self.duration_s}


@dataclass(frozen=True, slots=True)
class Call:
    """One LLM call of one session.

    ``gap_s`` is the time from this call's completion until the session
    submits its next call (tool execution plus client overhead). When the
    trace does not record it, it defaults to the sum of the tool durations.
    """

    session_id: str
    turn: int
    prompt: tuple[tuple[str, int], ...]
    output_tokens: int
    output_segment: str | None = None
    tools: tuple[ToolCall, ...] = ()
    gap_s: float | None = None
    timestamp_s: float | None = None
    latency_s: float | None = None

    @property
    def prompt_tokens(self) -> int:
        return sum(map(_second, self.prompt))

    @property
    def next_gap_s(self) -> float:
        """The gap the simulator waits after this call before the next one."""
        if self.gap_s is not None:
            return self.gap_s
        return sum(t.duration_s for t in self.tools)

    def to_json(self) -> dict:
        d: dict = {
            "session_id": self.session_id,
            "turn": self.turn,
            "prompt": [[s, n] for s, n in self.prompt],
            "output_tokens": self.output_tokens,
        }
        if self.output_segment is not None:
            d["output_segment"] = self.output_segment
        if self.tools:
            d["tools"] = [t.to_json() for t in self.tools]
        for key in ("gap_s", "timestamp_s", "latency_s"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        return d

    def to_line(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Session:
    """The calls of one session, in turn order (turn ``i`` at index ``i``)."""

    session_id: str
    calls: tuple[Call, ...]

    @property
    def start_s(self) -> float | None:
        return self.calls[0].timestamp_s if self.calls else None


@dataclass(slots=True)
class Trace:
    """A whole trace: sessions in order of first appearance in the file."""

    sessions: list[Session]
    header: dict = field(default_factory=dict)
    source: str = ""
    # Lines rejected by a lenient read (``skip_bad=True``): TraceFormatError objects.
    rejected: list = field(default_factory=list)

    @property
    def num_calls(self) -> int:
        return sum(len(s.calls) for s in self.sessions)

    def calls(self):
        for s in self.sessions:
            yield from s.calls


def header_line(**info) -> str:
    """The optional first line of a trace file: format, version and provenance."""
    d = {"format": FORMAT_NAME, "version": FORMAT_VERSION}
    d.update(info)
    return json.dumps(d, separators=(",", ":"))
