"""Which call of which session is due when: the closed loop the simulator runs, for a real engine.

Both drivers of a real vLLM use it, the oracle (time in engine steps) and the
live replay (wall-clock seconds), so the arrival rule is written once:

- ``arrivals="concurrent"``: ``agents`` sessions start at 0; when a session's
  last call finishes, the next session in trace order starts at that instant;
- ``arrivals="trace"``: every session starts at its recorded first timestamp,
  shifted so the earliest starts at 0;
- a session's call k+1 is due when call k has finished plus call k's gap
  (``Call.next_gap_s``), both times ``time_scale``;
- due calls come out ordered by (due time, the session's index in the trace).

``ClosedLoop(sessions, ...)`` holds the due calls; the driver asks for
:meth:`pop_due` at each instant it can submit and reports each finished call
with :meth:`finished`.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from traces.format import Session

ARRIVALS = ("concurrent", "trace")


class ArrivalError(ValueError):
    """These arrivals cannot start these sessions (say, ``trace`` without recorded timestamps)."""


class ClosedLoop:
    """The due calls of ``sessions``: ``(time, session index, turn)``, earliest first."""

    def __init__(self, sessions: Sequence[Session], arrivals: str = "concurrent", agents: int = 16,
                 time_scale: float = 1.0):
        if arrivals not in ARRIVALS:
            raise ArrivalError(f"--arrivals must be concurrent or trace, not {arrivals!r}")
        if agents < 1:
            raise ArrivalError(f"--agents must be >= 1, got {agents}")
        if not time_scale >= 0:
            raise ArrivalError(f"--time-scale must be >= 0, got {time_scale}")
        self.sessions = sessions
        self.arrivals = arrivals
        self.time_scale = time_scale
        self._due: list[tuple[float, int, int]] = []
        n = len(sessions)
        if arrivals == "trace":
            missing = [s.session_id for s in sessions if s.start_s is None]
            if missing:
                raise ArrivalError(f"--arrivals trace needs recorded timestamps on every session's first call "
                                   f"({len(missing)} without, first: {missing[0]!r})")
            t0 = min((s.start_s for s in sessions), default=0.0)
            for si, s in enumerate(sessions):
                heapq.heappush(self._due, ((s.start_s - t0) * time_scale, si, 0))
            self._next_session = n
        else:
            self._next_session = min(agents, n)
            for si in range(self._next_session):
                heapq.heappush(self._due, (0.0, si, 0))

    def __bool__(self) -> bool:
        """Whether any call is still due (in the future or now)."""
        return bool(self._due)

    def next_time(self) -> float | None:
        """When the earliest due call is due; None when none is."""
        return self._due[0][0] if self._due else None

    def pop_due(self, now: float) -> list[tuple[float, int, int]]:
        """Every call due by ``now``, in (due time, session index) order; they leave the loop."""
        out = []
        while self._due and self._due[0][0] <= now:
            out.append(heapq.heappop(self._due))
        return out

    def finished(self, si: int, turn: int, t: float) -> bool:
        """Call ``turn`` of session ``si`` finished at ``t``: its successor becomes due.

        Returns True when it was the session's last call (the session is done).
        """
        calls = self.sessions[si].calls
        if turn + 1 < len(calls):
            heapq.heappush(self._due, (t + calls[turn].next_gap_s * self.time_scale, si, turn + 1))
            return False
        if self.arrivals == "concurrent" and self._next_session < len(self.sessions):
            heapq.heappush(self._due, (t, self._next_session, 0))
            self._next_session += 1
        return True
