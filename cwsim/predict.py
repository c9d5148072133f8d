"""Tool-call predictor: when will a session call the LLM again, if at all?

Learned from a trace, per tool category (the category of the last tool a
response calls; ``none`` when it calls none): the empirical distribution of
the gap until the session's next call, and the probability that there is a
next call at all (after ``submit`` a session ends). Categories seen fewer
than ``min_samples`` times fall back to the pooled distribution.

Policies ask three things, all from the metadata a real server sees when a
response ends (its tool call), never from the future of the trace:
``p_continue(cat)``, ``survival(cat, t)`` = P(next call not yet arrived at t |
it comes), and ``expected_idle(cat, elapsed)`` = the expected remaining time
until the next call given it has not come after ``elapsed`` seconds.

``error`` injects prediction error so users can see how robust a policy is:
each prediction of the idle time is multiplied by ``exp(N(0, error))`` drawn
from a seeded generator keyed on the request, so runs stay deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from traces.columnar import TraceTable
from traces.format import Call, Session, Trace

NO_TOOL = "none"
#: predicted wait given to a session that is predicted to end (s)
END_HORIZON_S = 24 * 3600.0


def call_category(call: Call) -> str:
    """The category that predicts the gap after ``call``: its last tool's, or ``none``."""
    return call.tools[-1].category if call.tools else NO_TOOL


@dataclass
class _Dist:
    gaps: np.ndarray  # sorted gaps to the next call, of calls that had one
    n_calls: int  # calls of this category, last calls of sessions included
    #: the mean gap (nan without gaps): the expected idle time at a response's end, asked at every release
    mean: float = field(init=False)
    #: quantiles asked for so far (``q`` -> value): a TTL policy asks at every release
    quantiles: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.mean = float(self.gaps.mean()) if len(self.gaps) else math.nan

    @property
    def p_continue(self) -> float:
        return len(self.gaps) / self.n_calls if self.n_calls else 1.0


@dataclass
class ToolCallPredictor:
    min_samples: int = 20
    error: float = 0.0
    seed: int = 0
    dists: dict[str, _Dist] = field(default_factory=dict)
    pooled: _Dist | None = None

    # ------------------------------------------------------------- fitting
    @classmethod
    def fit(cls, trace: Trace | TraceTable | Iterable[Session], *, min_samples: int = 20, error: float = 0.0,
            seed: int = 0) -> "ToolCallPredictor":
        """Learn from a trace, or from its sessions (any iterable: one pass)."""
        gaps: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for sess in (trace.sessions if isinstance(trace, (Trace, TraceTable)) else trace):
            last = len(sess.calls) - 1
            for k, call in enumerate(sess.calls):
                cat = call_category(call)
                counts[cat] = counts.get(cat, 0) + 1
                if k < last:
                    gaps.setdefault(cat, []).append(call.next_gap_s)
        if not counts:
            raise ValueError("cannot fit a predictor on an empty trace")
        pred = cls(min_samples=min_samples, error=error, seed=seed)
        all_gaps = np.sort(np.array([g for v in gaps.values() for g in v], dtype=float))
        pred.pooled = _Dist(all_gaps, sum(counts.values()))
        for cat in sorted(counts):
            if counts[cat] >= min_samples:
                pred.dists[cat] = _Dist(np.sort(np.array(gaps.get(cat, []), dtype=float)), counts[cat])
        return pred

    def _dist(self, cat: str) -> _Dist:
        return self.dists.get(cat) or self.pooled

    # --------------------------------------------------------- predictions
    def p_continue(self, cat: str) -> float:
        return self._dist(cat).p_continue

    def survival(self, cat: str, t: float) -> float:
        """P(the next call has not arrived ``t`` s after the response | a next call comes)."""
        g = self._dist(cat).gaps
        if len(g) == 0:
            return 0.0
        return 1.0 - np.searchsorted(g, t, side="right") / len(g)

    def expected_idle(self, cat: str, elapsed: float = 0.0, key: int | None = None) -> float:
        """Expected remaining seconds until the next call, given none came after ``elapsed``.

        ``inf`` when the session is predicted to end (no gap ever observed
        that long, or no next call). ``key`` seeds the injected error.
        """
        d = self._dist(cat)
        if elapsed > 0:
            rest = d.gaps[d.gaps > elapsed]
            if len(rest) == 0:
                return math.inf
            idle = float(rest.mean() - elapsed)
        elif len(d.gaps):  # at 0, a gap of 0 is a call at once, not an end
            idle = d.mean - elapsed if elapsed else d.mean
        else:
            return math.inf
        if self.error > 0 and key is not None:
            idle *= float(np.exp(np.random.default_rng((self.seed, key)).normal(0.0, self.error)))
        return idle

    def predicted_wait(self, cat: str, key: int | None = None) -> float:
        """Seconds until the session calls again after a response of category ``cat``, as seen when
        the response ends: ``END_HORIZON_S`` when the session is predicted to end (``p_continue <
        0.5``) or no gap that long was ever seen, else the expected idle time (``key`` seeds the
        injected error)."""
        if self.p_continue(cat) < 0.5:
            return END_HORIZON_S
        idle = self.expected_idle(cat, key=key)
        return idle if math.isfinite(idle) else END_HORIZON_S

    def typical_idle(self) -> float:
        """The mean gap to a next call over all categories (0 when none was seen)."""
        return self.pooled.mean if len(self.pooled.gaps) else 0.0

    def quantile(self, cat: str, q: float) -> float:
        d = self._dist(cat)
        v = d.quantiles.get(q)
        if v is None:
            v = d.quantiles[q] = float(np.quantile(d.gaps, q)) if len(d.gaps) else 0.0
        return v

    def confidence(self, cat: str) -> float:
        """How much to trust this category's idle prediction, in [0, 1].

        Grows with the sample size and shrinks with the spread of the gaps
        (coefficient of variation), and with injected error.
        """
        d = self._dist(cat)
        n = len(d.gaps)
        if n == 0:
            return 0.0
        mean = float(d.gaps.mean())
        cv = float(d.gaps.std() / mean) if mean > 0 else 0.0
        return (n / (n + self.min_samples)) / (1.0 + cv) / (1.0 + self.error)

    # ---------------------------------------------------------- evaluation
    def evaluate(self, trace: Trace) -> dict:
        """Prediction error on another trace: idle-time and continuation errors.

        ``idle_mae_s`` / ``idle_median_abs_log_error`` compare the predicted
        expected idle (at elapsed 0) with the true gap of calls that have a
        next call; ``continue_brier`` is the Brier score of ``p_continue``.
        """
        abs_err, log_err, brier = [], [], []
        for sess in trace.sessions:
            last = len(sess.calls) - 1
            for k, call in enumerate(sess.calls):
                cat = call_category(call)
                brier.append((self.p_continue(cat) - (1.0 if k < last else 0.0)) ** 2)
                if k < last:
                    pred = self.expected_idle(cat)
                    if math.isfinite(pred):
                        true = call.next_gap_s
                        abs_err.append(abs(pred - true))
                        log_err.append(abs(math.log((pred + 1e-3) / (true + 1e-3))))
        return {
            "calls": sum(len(s.calls) for s in trace.sessions),
            "idle_mae_s": float(np.mean(abs_err)) if abs_err else None,
            "idle_median_abs_log_error": float(np.median(log_err)) if log_err else None,
            "continue_brier": float(np.mean(brier)) if brier else None,
            "categories": sorted(self.dists),
        }
