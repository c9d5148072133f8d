"""One recording: session inference, turns, token counts and the trace lines of the calls.

The proxy calls :meth:`Recording.begin` when a request arrives (the session is
decided then, so the hints can go upstream with it), then
:meth:`Recording.finish` with the answer's :class:`~recorder.responses.Outcome`,
or :meth:`Recording.fail`. No text reaches the trace: a line holds segment ids
(:mod:`recorder.segments`), counts, tool names and categories, times.

Sessions
    A request that names its session (``X-Session-ID`` header, or a
    ``session_id`` body field) belongs to that session. Otherwise a call whose
    prompt extends an earlier call's prompt continues that call's session:
    since segment ids are chained, the id at a position identifies the whole
    prompt up to there, so the recorder looks, from the longest prefix down,
    for the id that ended a session's last prompt or its last answer. An exact
    repeat of a finished prompt starts a new session (two agents starting
    alike); a retry after a failed call continues, since the failed call is
    not a turn. Completions-API string prompts are one unit each, so without
    a header each such call is its own session.

Turns and failures
    Turns count the calls that got an answer, from 0. A call that failed (an
    error status, the upstream unreachable or timing out, a broken or
    client-closed stream) is not a turn: it is noted in the ``meta.failed_after``
    of the session's previous call, and its time is part of that call's gap.

Token counts
    Prompt: a segment keeps one count for the whole recording. New segments
    share what the upstream's usage reports beyond the known ones, in
    proportion to their length (largest remainder, each >= 1); without a usage
    they get the estimate ``len / CHARS_PER_TOKEN``. Output: the usage's
    completion tokens, else the number of streamed output events (one token
    each on vLLM), else the estimate. ``meta.tokens`` says which.

Times (seconds from the recording's start; ``perf_counter`` clock)
    ``timestamp_s`` = request received, ``latency_s`` = answer done - received,
    ``meta.ttft_s`` = first streamed output - received. The gap of a call is
    the next call's receipt - this call's done (>= 0); the proxy cannot see
    the tools run, so each tool's ``duration_s`` is the gap divided by the
    number of tools (their sum is the gap). A session's last call keeps gap
    null and durations 0.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from recorder.responses import Outcome
from recorder.segments import Unit, chain, estimate_tokens, prompt_units
from recorder.tools import tool_category
from traces.importers.common import chain_id, split_total

__all__ = ["CallStart", "Recording"]

_ROUND = 6


@dataclass
class _Session:
    sid: str
    next_turn: int = 0
    held: dict | None = None  # the last finished call, waiting for the next call's arrival
    held_done: float = 0.0
    keys: tuple[str, ...] = ()  # index entries that point here
    prev_tools: tuple[tuple[str, str], ...] = ()  # (name, category) of the last answer
    writers: set[str] = field(default_factory=set)


@dataclass
class CallStart:
    """A call on its way: what :meth:`Recording.begin` decided about it."""

    api: str
    session: _Session
    turn: int
    units: list[Unit]
    ids: list[str]
    t_sent: float
    meta: dict

    @property
    def session_id(self) -> str:
        return self.session.sid

    def hints(self) -> dict:
        """The ``vllm_xargs`` entries for the upstream (``docs/record.md``, hint schema)."""
        s = self.session
        names = [n for n, _ in s.prev_tools]
        cats = [c for _, c in s.prev_tools]
        gap = self.t_sent - s.held_done if s.held is not None else -1.0
        return {
            "session_id": s.sid,
            "cw_turn": self.turn,
            "cw_prev_tool": names[0] if names else "",
            "cw_prev_category": cats[0] if cats else "",
            "cw_prev_tools": names,
            "cw_prev_categories": cats,
            "cw_prev_gap_s": round(max(0.0, gap), 3) if gap >= 0 else -1.0,
        }


class Recording:
    """Sessions and lines of one recording, written through ``writer`` (a
    :class:`recorder.writer.TraceAppender` or anything with ``hold``/``write``/``close``).

    ``salt`` salts the segment ids and is kept nowhere else; ``name`` prefixes
    the inferred session ids (``<name>-s<k>``); ``known_turns`` maps session
    ids already in the file to their next turn (a recording appended to it).
    """

    def __init__(self, writer, salt: str, name: str, clock=time.perf_counter, known_turns: dict | None = None):
        self.writer = writer
        self.salt = salt
        self.name = name
        self.clock = clock
        self.t0 = clock()
        self._sessions: dict[str, _Session] = {}
        self._index: dict[str, _Session] = {}  # last prompt id / answer id -> session
        self._counts: dict[str, int] = {}  # segment id -> tokens, fixed for the recording
        self._known_turns = dict(known_turns or {})
        self._n_inferred = 0
        self.calls = 0
        self.failed = 0
        self.unattached_failures = 0
        self.closed = False
        self.recovered = 0  # calls a crashed earlier recording of the file left in its journal

    # ------------------------------------------------------------------ arrival

    def begin(self, api: str, body: dict, session_header: str | None = None, t_received: float | None = None) -> CallStart:
        """A request of ``api`` (``chat``, ``completions``, ``messages``) arrived with JSON ``body``
        (at ``t_received`` on :attr:`clock`; default now)."""
        t = self.clock() if t_received is None else t_received
        units = prompt_units(api, body)
        ids = chain(units, self.salt)
        named = session_header or (body.get("session_id") if isinstance(body.get("session_id"), str) else None)
        s = self._named(named) if named else self._inferred(ids)
        meta = {"api": api, "stream": bool(body.get("stream"))}
        if isinstance(body.get("model"), str):
            meta["model"] = body["model"]
        return CallStart(api, s, s.next_turn, units, ids, t, meta)

    def _named(self, sid: str) -> _Session:
        s = self._sessions.get(sid)
        if s is None:
            s = self._sessions[sid] = _Session(sid, self._known_turns.get(sid, 0))
        return s

    def _inferred(self, ids: list[str]) -> _Session:
        last = len(ids) - 1
        for k in range(last, -1, -1):
            s = self._index.get(ids[k])
            if s is not None and (k < last or ids[k] != s.keys[0]):
                return s  # extends the session's last prompt (strictly) or its last answer
        sid = f"{self.name}-s{self._n_inferred}"
        self._n_inferred += 1
        s = self._sessions[sid] = _Session(sid)
        return s

    # ------------------------------------------------------------------ completion

    def _prompt_counts(self, start: CallStart, reported: int | None) -> list[int]:
        counts = self._counts
        known = [counts.get(i) for i in start.ids]
        for k, u in enumerate(start.units):
            if known[k] is None and u.tokens:
                known[k] = max(1, u.tokens)
        new = [k for k, c in enumerate(known) if c is None]
        if new:
            est = [estimate_tokens(start.units[k].text) for k in new]
            remaining = reported - sum(c for c in known if c is not None) if reported else 0
            if reported and remaining >= len(new):
                est = split_total(remaining, [len(start.units[k].text) for k in new])
            elif reported:
                est = [1] * len(new)
            for k, n in zip(new, est):
                known[k] = n
        for i, n in zip(start.ids, known):
            counts.setdefault(i, n)
        return known

    def finish(self, start: CallStart, out: Outcome, t_done: float | None = None) -> dict:
        """The call got its answer: its line is held until the session's next call arrives."""
        t_done = self.clock() if t_done is None else t_done
        s = start.session
        meta = dict(start.meta)
        counts = self._prompt_counts(start, out.prompt_tokens)
        if out.output_tokens is not None:
            output_tokens, meta["tokens"] = max(1, out.output_tokens), "usage"
        elif out.chunks:
            output_tokens, meta["tokens"] = out.chunks, "stream events"
        else:
            output_tokens, meta["tokens"] = estimate_tokens(out.output_text), "estimated"
        if out.prompt_tokens is not None:
            meta["prompt_tokens_reported"] = out.prompt_tokens
        else:
            meta["tokens"] += ", prompt estimated"
        if out.cached_tokens is not None:
            meta["cached_tokens"] = out.cached_tokens
        if out.first_token_t is not None:
            meta["ttft_s"] = round(out.first_token_t - start.t_sent, _ROUND)
        out_id = None
        if start.api != "completions" and start.ids:
            out_id = chain_id(start.ids[-1], "assistant", self.salt + out.output_text)
            self._counts.setdefault(out_id, output_tokens)
        tools = tuple((name, tool_category(name, args, s.writers)) for name, args in out.tools)
        line = {
            "session_id": s.sid,
            "turn": s.next_turn,
            "prompt": [[i, n] for i, n in zip(start.ids, counts)],
            "output_tokens": output_tokens,
            **({"output_segment": out_id} if out_id else {}),
            "tools": [{"name": n or "unnamed", "category": c, "duration_s": 0.0} for n, c in tools],
            "timestamp_s": round(start.t_sent - self.t0, _ROUND),
            "latency_s": round(max(0.0, t_done - start.t_sent), _ROUND),
            "meta": meta,
        }
        s.next_turn += 1
        self._release(s, start.t_sent)
        s.held, s.held_done, s.prev_tools = line, t_done, tools
        self.writer.hold(line)
        for key in s.keys:
            if self._index.get(key) is s:
                del self._index[key]
        s.keys = (start.ids[-1],) + ((out_id,) if out_id else ()) if start.ids else ()
        for key in s.keys:
            self._index[key] = s
        self.calls += 1
        return line

    def fail(self, start: CallStart, status: int, kind: str, out: Outcome | None = None,
             t_done: float | None = None) -> None:
        """The call got no (whole) answer: note it on the session's previous call."""
        t_done = self.clock() if t_done is None else t_done
        self.failed += 1
        s = start.session
        if s.held is None:
            self.unattached_failures += 1
            return
        note = {"status": status, "kind": kind, "after_s": round(max(0.0, start.t_sent - s.held_done), _ROUND),
                "latency_s": round(max(0.0, t_done - start.t_sent), _ROUND)}
        if out is not None and out.chunks:
            note["output_events"] = out.chunks
        s.held["meta"].setdefault("failed_after", []).append(note)

    def _release(self, s: _Session, t_next: float | None) -> None:
        """Write the session's held call, its gap known (``t_next``) or not (closing)."""
        line = s.held
        if line is None:
            return
        s.held = None
        if t_next is not None:
            gap = round(max(0.0, t_next - s.held_done), _ROUND)
            line["gap_s"] = gap
            for tool in line["tools"]:
                tool["duration_s"] = round(gap / len(line["tools"]), _ROUND)
        if not line["tools"]:
            del line["tools"]
        self.writer.write(line)

    def close(self) -> None:
        """Write every held call (as its session's last) and close the writer."""
        if self.closed:
            return
        self.closed = True
        for s in self._sessions.values():
            self._release(s, None)
        self.writer.close()

    @property
    def sessions(self) -> int:
        return sum(1 for s in self._sessions.values() if s.next_turn > self._known_turns.get(s.sid, 0))
