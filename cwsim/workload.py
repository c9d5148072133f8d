"""From a trace to what the engine simulates: sessions of calls with interned
segments, and the closed-loop session processes that submit them.

A session submits call k+1 when call k has finished and its gap (tool calls)
has elapsed. When sessions start is a choice (:class:`Arrivals`): as recorded
in the trace, by a Poisson process, or with a fixed number of concurrently
active agents, a new session starting when one ends (the CacheWise setting).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np

from cwsim.config import ConfigError
from cwsim.hashing import PrefixMemo, SegmentInterner
from cwsim.sequences import shared_tokens
from traces.format import Trace


_second = itemgetter(1)


@dataclass(slots=True)
class SimCall:
    segs: tuple[tuple[int, int], ...]  # prompt segments, then the output segment
    prompt_len: int
    output_len: int
    gap_s: float
    # tokens of this call's sequence (prompt + output) that the next call's prompt starts with
    next_shared_tokens: int
    tools: tuple = ()


@dataclass(slots=True, eq=False)
class SessionState:
    index: int
    session_id: str
    calls: list[SimCall]
    recorded_start_s: float | None
    shared_prefix_tokens: int = 0  # prefix of turn 0 that some other session shares
    memo: PrefixMemo | None = None
    hint: tuple | None = None  # (blocks, gens) of the last finished call's cached blocks
    start: float = -1.0
    end: float = -1.0
    requests: list = field(default_factory=list)


@dataclass(slots=True)
class Workload:
    sessions: list[SessionState]
    active_sessions: int = 0

    @property
    def num_calls(self) -> int:
        return sum(len(s.calls) for s in self.sessions)

    def largest_call(self) -> tuple[SessionState, int, int]:
        """``(session, turn, tokens)`` of the call holding the most KV at its last step:
        ``tokens = prompt + output - 1`` (the last token generated is not fed back)."""
        best = (self.sessions[0], 0, -1)
        for s in self.sessions:
            for turn, c in enumerate(s.calls):
                if c.prompt_len + c.output_len - 1 > best[2]:
                    best = (s, turn, c.prompt_len + c.output_len - 1)
        return best

    @classmethod
    def from_trace(cls, trace: Trace) -> "Workload":
        intern = SegmentInterner()
        pairs: dict[tuple[str, int], tuple[int, int]] = {}
        sessions: list[SessionState] = []
        for si, sess in enumerate(trace.sessions):
            calls: list[SimCall] = []
            for c in sess.calls:
                prompt = list(map(pairs.get, c.prompt))  # the same (segment, n) -> the same int pair
                if None in prompt:
                    for i, p in enumerate(prompt):
                        if p is None:
                            seg = c.prompt[i]
                            prompt[i] = pairs[seg] = (intern(seg[0]), seg[1])
                out_id = c.output_segment if c.output_segment is not None else f"\0out:{si}:{c.turn}"
                segs = (*prompt, (intern(out_id), c.output_tokens))
                prompt_len = sum(map(_second, prompt))
                calls.append(SimCall(segs, prompt_len, c.output_tokens, c.next_gap_s, 0, c.tools))
            for a, b in zip(calls, calls[1:]):
                n = len(a.segs)  # most prompts start with the whole previous call: one C-level compare
                if len(b.segs) > n and b.segs[:n] == a.segs:
                    a.next_shared_tokens = a.prompt_len + a.output_len
                else:
                    a.next_shared_tokens = shared_tokens(a.segs, b.segs[:-1])
            sessions.append(SessionState(si, sess.session_id, calls, sess.start_s))
        _mark_shared_prefixes(sessions)
        return cls(sessions)


def _mark_shared_prefixes(sessions: list[SessionState], depth: int = 8) -> None:
    """How much of each session's first prompt another session's first prompt shares."""
    counts: dict[tuple, int] = {}
    keys: list[list[tuple]] = []
    for s in sessions:
        prompt = s.calls[0].segs[:-1][:depth]
        ks = [prompt[: i + 1] for i in range(len(prompt))]
        keys.append(ks)
        for k in ks:
            counts[k] = counts.get(k, 0) + 1
    for s, ks in zip(sessions, keys):
        shared = [k for k in ks if counts[k] > 1]
        s.shared_prefix_tokens = sum(n for _, n in shared[-1]) if shared else 0


@dataclass(frozen=True, slots=True)
class Arrivals:
    """When sessions start.

    ``mode``: ``concurrent`` (``agents`` sessions active at once, the next in
    trace order starting when one ends), ``poisson`` (``rate`` sessions per
    second, seeded), or ``trace`` (the recorded start of each session's first
    call, shifted so the first session starts at 0).
    """

    mode: str = "concurrent"
    agents: int = 16
    rate: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in ("concurrent", "poisson", "trace"):
            raise ConfigError("arrivals", f"must be concurrent, poisson or trace, not {self.mode!r}")
        if self.mode == "concurrent" and self.agents < 1:
            raise ConfigError("agents", f"must be >= 1, got {self.agents}")
        if self.mode == "poisson" and not self.rate > 0:
            raise ConfigError("rate", f"must be > 0, got {self.rate}")

    def check(self, workload: Workload) -> None:
        """Raise ``ConfigError`` now if these arrivals cannot start ``workload``'s sessions."""
        self.start_times(workload, 0) if self.mode == "trace" else None

    def start_times(self, workload: Workload, seed: int) -> list[float] | None:
        """Start time of each session, or None for closed-loop ``concurrent`` starts."""
        n = len(workload.sessions)
        if self.mode == "poisson":
            gaps = np.random.default_rng(seed).exponential(1.0 / self.rate, size=n)
            return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()
        if self.mode == "trace":
            missing = [s.session_id for s in workload.sessions if s.recorded_start_s is None]
            if missing:
                raise ConfigError(
                    "arrivals", f"trace needs recorded timestamps, but {len(missing)} session(s) have none "
                    f"(first: {missing[0]!r}); use --arrivals concurrent or poisson"
                )
            t0 = min(s.recorded_start_s for s in workload.sessions)
            return [s.recorded_start_s - t0 for s in workload.sessions]
        return None
