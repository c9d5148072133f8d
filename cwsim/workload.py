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
from cwsim.sequences import common_prefix_len, shared_tokens
from traces.format import Trace
from traces.stream import FIRST_PROMPT_SEGMENTS, iter_sessions, segment_ids, session_info
from traces.transform import scale_gaps


_second = itemgetter(1)


#: a call's ``private_from`` when no block of it is its session's own (nothing to forget)
NOTHING_PRIVATE = 1 << 62


@dataclass(slots=True)
class SimCall:
    segs: tuple[tuple[int, int], ...]  # prompt segments, then the output segment
    prompt_len: int
    output_len: int
    gap_s: float
    # tokens of this call's sequence (prompt + output) that the next call's prompt starts with
    next_shared_tokens: int
    tools: tuple = ()
    # the first token of the sequence that lies in a segment no other session holds: the blocks from
    # there on are the session's own (no other session can ever ask for them)
    private_from: int = NOTHING_PRIVATE


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
    #: the ids of the session's own blocks by hash (``block_hashes``' private table): dropped when it ends
    private_ids: dict = field(default_factory=dict)
    #: the ids of a one-call session's own blocks, which no hash names (kept for an unbounded pool only)
    own_ids: list = field(default_factory=list)
    private_segments: tuple = ()


class Workload:
    """The sessions of a run, each made ready (a :class:`SessionState`) when the run reaches it.

    Built from a whole ``Trace`` (:meth:`from_trace`: every session ready at once, in
    ``sessions``), from a ``traces.stream.TraceIndex`` (:meth:`from_index`: sessions read from
    the file in order as the run asks for them, so memory follows the sessions in flight, not
    the trace) or from a ``traces.columnar.TraceTable`` (:meth:`from_table`: the same, built
    from the table's columns). All give the same states: segment ids are interned in trace order either way.
    ``session(i)`` hands out session ``i`` once (reading ahead keeps the skipped ones until asked
    for); ``release(sess)`` forgets a finished session's own segment ids.
    """

    __slots__ = ("infos", "sessions", "active_sessions", "_next", "_source", "_ready", "_intern", "_shared",
                 "_shared_prefix")

    def __init__(self, infos: list, source, shared, sessions: list[SessionState] | None = None):
        self.infos = infos  # traces.stream.SessionInfo of each session, in order
        self.sessions = sessions
        self.active_sessions = 0
        self._source = source  # traces.format.Session objects, in order
        self._next = 0
        self._ready: dict[int, SessionState] = {}
        self._intern = SegmentInterner()
        self._shared = shared  # segment id -> whether another session may hold it
        self._shared_prefix = shared_prefix_tokens([i.first_prompt for i in infos])

    @classmethod
    def from_trace(cls, trace: Trace, limit: int | None = None, gap_scale: float = 1.0) -> "Workload":
        """``gap_scale``: every gap times this (``traces.transform.scale_gaps``)."""
        sessions = trace.sessions[:limit] if limit is not None else trace.sessions
        if gap_scale != 1:
            sessions = list(scale_gaps(sessions, gap_scale))
        counts: dict[str, int] = {}
        for sess in sessions:
            for seg in segment_ids(sess):
                counts[seg] = counts.get(seg, 0) + 1
        shared = {seg for seg, n in counts.items() if n > 1}
        wl = cls([session_info(s) for s in sessions], iter(sessions), shared.__contains__)
        wl.sessions = [wl._make() for _ in sessions]
        return wl

    @classmethod
    def from_index(cls, index, limit: int | None = None, gap_scale: float = 1.0) -> "Workload":
        infos = index.sessions[:limit] if limit is not None else index.sessions
        return cls._streamed(infos, iter_sessions(index, len(infos)), index.shared, gap_scale)

    @classmethod
    def from_table(cls, table, limit: int | None = None, gap_scale: float = 1.0) -> "Workload":
        """From a ``traces.columnar.TraceTable``: like :meth:`from_index`, each session built from the
        table's columns when the run reaches it."""
        infos = table.infos[:limit] if limit is not None else table.infos
        return cls._streamed(infos, table.iter_sessions(len(infos)), table.shared, gap_scale)

    @classmethod
    def _streamed(cls, infos: list, sessions, shared, gap_scale: float) -> "Workload":
        return cls(infos, scale_gaps(sessions, gap_scale) if gap_scale != 1 else sessions, shared)

    @property
    def num_sessions(self) -> int:
        return len(self.infos)

    @property
    def num_calls(self) -> int:
        return sum(i.calls for i in self.infos)

    def largest_call(self) -> tuple[str, int, int]:
        """``(session_id, turn, tokens)`` of the call holding the most KV at its last step:
        ``tokens = prompt + output - 1`` (the last token generated is not fed back)."""
        best = max(self.infos, key=lambda i: i.largest_tokens)  # (the first of equals)
        return best.session_id, best.largest_turn, best.largest_tokens

    def session(self, i: int) -> SessionState:
        if self.sessions is not None:
            return self.sessions[i]
        ready = self._ready
        while self._next <= i:
            state = self._make()
            ready[state.index] = state
        return ready.pop(i)

    def states(self):
        """Every session, in order."""
        for i in range(len(self.infos)):
            yield self.session(i)

    def release(self, sess: SessionState) -> None:
        self._intern.forget(sess.private_segments)
        sess.private_segments = ()

    def _make(self) -> SessionState:
        si = self._next
        sess = next(self._source)
        self._next += 1
        intern, shared = self._intern, self._shared
        pairs: dict[tuple[str, int], tuple[int, int]] = {}  # the same (segment, n) -> the same int pair
        own: list[str] = []
        calls: list[SimCall] = []
        prev: tuple = ()  # the last call's prompt, and its mapped pairs and length
        prev_pairs: list[tuple[int, int]] = []
        prev_len = 0
        for c in sess.calls:
            raw = c.prompt
            n = len(prev)
            if len(raw) >= n and raw[:n] == prev:  # most prompts extend the last one: map the new part only
                new = list(map(pairs.get, raw[n:]))
                prompt_len = prev_len
            else:
                n, new, prompt_len = 0, list(map(pairs.get, raw)), 0
            if None in new:
                for i, p in enumerate(new):
                    if p is None:
                        seg = raw[n + i]
                        if seg[0] not in intern.ids and not shared(seg[0]):
                            own.append(seg[0])
                        new[i] = pairs[seg] = (intern(seg[0]), seg[1])
            prompt = prev_pairs + new if n else new
            prompt_len += sum(map(_second, new))
            prev, prev_pairs, prev_len = raw, prompt, prompt_len
            out_id = c.output_segment if c.output_segment is not None else f"\0out:{si}:{c.turn}"
            if out_id not in intern.ids and (c.output_segment is None or not shared(out_id)):
                own.append(out_id)
            segs = (*prompt, (intern(out_id), c.output_tokens))
            calls.append(SimCall(segs, prompt_len, c.output_tokens, c.next_gap_s, 0, c.tools))
        _mark_private(calls, set(map(intern.ids.__getitem__, own)))
        for a, b in zip(calls, calls[1:]):
            n = len(a.segs)  # most prompts start with the whole previous call: one C-level compare
            if len(b.segs) > n and b.segs[:n] == a.segs:
                a.next_shared_tokens = a.prompt_len + a.output_len
            else:
                a.next_shared_tokens = shared_tokens(a.segs, b.segs[:-1])
        state = SessionState(si, sess.session_id, calls, sess.start_s, self._shared_prefix[si])
        state.private_segments = tuple(own)
        return state


def _mark_private(calls: list[SimCall], own: set[int]) -> None:
    """Each call's ``private_from``: the first token in one of the session's own segments (``own``)."""
    if not own:
        return
    prev: tuple = ()
    j_prev = 0  # index in prev of its first own segment (len(prev) if none)
    for c in calls:
        segs = c.segs
        k = common_prefix_len(prev, segs)
        if j_prev < k:
            j = j_prev
        else:
            j = next((i for i in range(k, len(segs)) if segs[i][0] in own), len(segs))
        if j < len(segs):
            c.private_from = sum(map(_second, segs[:j]))
        prev, j_prev = segs, j


def shared_prefix_tokens(first_prompts: list[tuple], depth: int = FIRST_PROMPT_SEGMENTS) -> list[int]:
    """For each session's first prompt (its first ``depth`` segments or more), the tokens of it
    that another session's first prompt starts with too."""
    counts: dict[tuple, int] = {}
    keys: list[list[tuple]] = []
    for prompt in first_prompts:
        prompt = prompt[:depth]
        ks = [prompt[: i + 1] for i in range(len(prompt))]
        keys.append(ks)
        for k in ks:
            counts[k] = counts.get(k, 0) + 1
    out = []
    for ks in keys:
        shared = [k for k in ks if counts[k] > 1]
        out.append(sum(n for _, n in shared[-1]) if shared else 0)
    return out


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
        n = workload.num_sessions
        if self.mode == "poisson":
            gaps = np.random.default_rng(seed).exponential(1.0 / self.rate, size=n)
            return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()
        if self.mode == "trace":
            missing = [s.session_id for s in workload.infos if s.start_s is None]
            if missing:
                raise ConfigError(
                    "arrivals", f"trace needs recorded timestamps, but {len(missing)} session(s) have none "
                    f"(first: {missing[0]!r}); use --arrivals concurrent or poisson"
                )
            t0 = min(s.start_s for s in workload.infos)
            return [s.start_s - t0 for s in workload.infos]
        return None
