"""Facts an engine learns online, computed one way for both engines' adapters.

The simulator's adapter (``cwsim.policy_adapter``) and the vLLM plugin
(``replay.vllm_plugin``) feed these trackers the same events (a request
arrives, a request finishes, a request's block table is released), so the
views they give a policy (``Environment.active_sessions``, ``Release.shared``,
the session numbers) are equal by construction, not by two implementations
that happen to agree.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

try:  # the C function itself, without np.count_nonzero's Python wrapper
    from numpy._core.multiarray import count_nonzero as _cnz
except ImportError:  # pragma: no cover - other numpy layouts
    _cnz = np.count_nonzero

#: default of ``SessionActivity.idle_s``: an agent away this long counts as gone (s)
DEFAULT_SESSION_IDLE_S = 600.0


class SessionActivity:
    """Which sessions are active: a request of theirs is in the engine, or their latest request
    finished at most ``idle_s`` seconds ago. Also numbers the sessions in the order the engine
    first sees them, and keeps each one's start (the arrival of its first request)."""

    def __init__(self, idle_s: float = DEFAULT_SESSION_IDLE_S):
        if not idle_s >= 0:
            raise ValueError(f"session idle time must be >= 0, got {idle_s}")
        self.idle_s = idle_s
        self._number: dict[str, int] = {}
        self._start: dict[str, float] = {}
        self._in_engine: dict[str, int] = {}
        self._last_finish: dict[str, float] = {}
        self._finishes: deque[tuple[float, str]] = deque()  # (finish time, session), in time order
        self._active: set[str] = set()
        self._horizon = math.inf  # the oldest finish + idle_s: nothing expires up to then

    def arrive(self, session_id: str, now: float) -> tuple[int, float]:
        """A request of ``session_id`` arrives at ``now``: the session's ``(number, start)``."""
        number = self._number.setdefault(session_id, len(self._number))
        start = self._start.setdefault(session_id, now)
        self._in_engine[session_id] = self._in_engine.get(session_id, 0) + 1
        self._active.add(session_id)
        return number, start

    def finish(self, session_id: str, now: float) -> None:
        """A request of ``session_id`` finished at ``now``."""
        self._in_engine[session_id] -= 1
        self._last_finish[session_id] = now
        if not self._finishes:
            self._horizon = now + self.idle_s
        self._finishes.append((now, session_id))

    def _expire(self, now: float) -> None:
        fin, idle = self._finishes, self.idle_s
        while fin and fin[0][0] + idle < now:
            t, sid = fin.popleft()
            if self._in_engine[sid] == 0 and self._last_finish[sid] == t:
                self._active.discard(sid)
        self._horizon = fin[0][0] + idle if fin else math.inf

    def count(self, now: float) -> int:
        if now > self._horizon:
            self._expire(now)
        return len(self._active)

    def is_active(self, session_id: str, now: float) -> bool:
        if now > self._horizon:
            self._expire(now)
        return session_id in self._active


class SessionFacts:
    """``Environment.active_sessions`` and ``session_active`` from an adapter's ``sessions``
    (a :class:`SessionActivity`) and its clock ``now``: one implementation for both adapters."""

    sessions: SessionActivity
    now: float

    @property
    def active_sessions(self) -> int:
        return self.sessions.count(self.now)

    def session_active(self, session_id: str) -> bool:
        return self.sessions.is_active(session_id, self.now)


class BlockSharing:
    """Per block: has a request of another session held it since its content was cached?

    Fed every release of a request's block table, and every block that loses
    its hash (:meth:`forget`: evicted, or freed uncached once copied to a CPU
    tier; the content's cached life ends, and its record with it).
    A block's record is the last session that released it and whether it was
    shared. A block released while another reference to it remains (another
    request holds it) is shared.

    A record is one integer, ``session << 1 | shared`` (-1: none), so a release
    reads and writes one array.
    """

    def __init__(self, num_blocks: int):
        self._rec = np.full(num_blocks, -1, dtype=np.int32)

    @property
    def size(self) -> int:
        """Blocks it has room for."""
        return len(self._rec)

    def grow(self, num_blocks: int) -> None:
        n = num_blocks - len(self._rec)
        if n > 0:
            self._rec = np.concatenate([self._rec, np.full(n, -1, dtype=np.int32)])

    def forget(self, blocks) -> None:
        """``blocks`` (ids) lose their hashes: their records go with their content."""
        self._rec[blocks] = -1

    def release(self, blocks: np.ndarray, hashed: np.ndarray, refs_after: np.ndarray, session: int) -> np.ndarray:
        """Session number ``session`` releases ``blocks`` (distinct ids; ``hashed`` and ``refs_after``
        per block): whether each is shared. Records the hashed ones."""
        if not 0 <= session < 1 << 30:
            raise ValueError(f"session number out of range: {session}")
        cur = session << 1  # this release's record, unshared
        # x == 0: this session released it last, unshared; 0 < x < 2**31: another session released it
        # last, or it was shared already; -1 (no record) makes x >= 2**31
        x = self._rec[blocks]
        x ^= cur
        x = x.view(np.uint32)
        x -= np.uint32(1)  # 0 wraps to the top
        shared = x < np.uint32(0x7FFFFFFF)
        shared |= refs_after > 0
        rec = shared.astype(np.int32)
        rec |= cur
        if _cnz(hashed) == len(hashed):  # the common case: every block of the table has a hash
            self._rec[blocks] = rec
        else:
            self._rec[blocks[hashed]] = rec[hashed]
        return shared
