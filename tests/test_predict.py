"""The tool-call predictor: exact statistics on a hand-made trace, injected error, evaluation."""

import math
from pathlib import Path

import numpy as np
import pytest

from cwsim.predict import NO_TOOL, ToolCallPredictor, call_category
from traces.format import Call, Session, ToolCall, Trace
from traces.reader import load_trace

BUNDLED = Path(__file__).resolve().parents[1] / "traces" / "data" / "miniswe-deepseek.jsonl.gz"


def session(sid: str, steps) -> Session:
    """A session from ``(category or None, gap_s)`` steps; ``None``: a call without tools."""
    calls = []
    for t, (cat, gap) in enumerate(steps):
        tools = () if cat is None else (ToolCall("bash", "other", 0.5), ToolCall("bash", cat, 0.5))
        calls.append(Call(sid, t, (("sys", 10), (f"{sid}/p{t}", 5)), 3, None, tools, gap))
    return Session(sid, tuple(calls))


def hand_trace(shift: float = 0.0) -> Trace:
    """Gaps per category (the category is the *last* tool's):

    test:   1 2 3 4           (4 calls, all followed by a call)
    read:   0.1 0.2 0.3       (3 calls)
    none:   5 6, and 1 last   (3 calls, p_continue 2/3)
    grep:   7                 (1 call: below min_samples=3, pooled)
    submit: always last       (3 calls, p_continue 0)
    pooled: 10 gaps of 14 calls; gaps 0.1 0.2 0.3 1 2 3 4 5 6 7 (sum 28.6)
    """
    s = shift
    return Trace([
        session("s0", [("test", 1 + s), ("read", 0.1 + s), ("test", 2 + s), ("submit", 0)]),
        session("s1", [("read", 0.2 + s), ("test", 3 + s), (None, 5 + s), ("submit", 0)]),
        session("s2", [("test", 4 + s), ("read", 0.3 + s), ("grep", 7 + s), (None, 6 + s), ("submit", 0)]),
        session("s3", [(None, 0)]),
    ], source="hand")


@pytest.fixture
def pred() -> ToolCallPredictor:
    return ToolCallPredictor.fit(hand_trace(), min_samples=3)


def test_call_category_is_the_last_tools_or_none():
    s = hand_trace().sessions
    assert call_category(s[0].calls[0]) == "test"  # tools (other, test): the last one counts
    assert call_category(s[3].calls[0]) == NO_TOOL == "none"


def test_p_continue(pred):
    assert sorted(pred.dists) == ["none", "read", "submit", "test"]
    assert pred.p_continue("test") == 1.0
    assert pred.p_continue("read") == 1.0
    assert pred.p_continue("submit") == 0.0
    assert pred.p_continue("none") == pytest.approx(2 / 3)
    # grep (1 call) and unseen categories use the pooled statistics: 10 of 14 calls continue
    assert pred.p_continue("grep") == pytest.approx(10 / 14)
    assert pred.p_continue("edit") == pytest.approx(10 / 14)


def test_survival(pred):
    # P(gap > t | a next call comes); test gaps 1 2 3 4
    assert pred.survival("test", 0.0) == 1.0
    assert pred.survival("test", 1.0) == 0.75  # the call with gap 1 has arrived at t = 1
    assert pred.survival("test", 2.5) == 0.5
    assert pred.survival("test", 4.0) == 0.0
    assert pred.survival("submit", 1.0) == 0.0  # no gap ever observed
    assert pred.survival("grep", 0.25) == pytest.approx(0.8)  # pooled: 2 of 10 gaps <= 0.25


def test_expected_idle(pred):
    assert pred.expected_idle("test") == pytest.approx(2.5)
    assert pred.expected_idle("read") == pytest.approx(0.2)
    assert pred.expected_idle("none") == pytest.approx(5.5)
    assert pred.expected_idle("grep") == pytest.approx(2.86)  # pooled mean 28.6 / 10
    # given no call came after `elapsed`: mean of the longer gaps, minus elapsed
    assert pred.expected_idle("test", 1.5) == pytest.approx((2 + 3 + 4) / 3 - 1.5)
    assert pred.expected_idle("test", 1.0) == pytest.approx((2 + 3 + 4) / 3 - 1.0)
    assert pred.expected_idle("none", 5.0) == pytest.approx(1.0)
    # no gap that long, or no next call: predicted to end
    assert pred.expected_idle("test", 4.0) == math.inf
    assert pred.expected_idle("submit") == math.inf


def test_expected_idle_at_elapsed_0_counts_zero_gaps():
    """A next call that comes at once (gap 0) is a prediction of 0 s, not of the session's end."""
    tr = Trace([session("a", [("edit", 0), ("edit", 0), ("edit", 0), ("submit", 0)]),
                session("b", [("find", 0), ("find", 2), ("find", 4), ("submit", 0)])])
    pred = ToolCallPredictor.fit(tr, min_samples=3)
    assert pred.expected_idle("edit") == 0.0
    assert pred.expected_idle("find") == pytest.approx(2.0)
    assert pred.expected_idle("find", 1.0) == pytest.approx(2.0)  # gaps 2 and 4 remain: 3 - 1


def test_quantile(pred):
    assert pred.quantile("test", 0.0) == 1.0
    assert pred.quantile("test", 0.5) == pytest.approx(2.5)
    assert pred.quantile("test", 1.0) == 4.0
    assert pred.quantile("read", 0.5) == pytest.approx(0.2)
    assert pred.quantile("submit", 0.5) == 0.0


def test_fallback_to_pooled_below_min_samples():
    many = ToolCallPredictor.fit(hand_trace(), min_samples=5)
    assert many.dists == {}  # no category has 5 calls: all pooled
    for cat in ("test", "read", "submit", "none"):
        assert many.p_continue(cat) == pytest.approx(10 / 14)
        assert many.expected_idle(cat) == pytest.approx(2.86)
    one = ToolCallPredictor.fit(hand_trace(), min_samples=1)
    assert one.expected_idle("grep") == 7.0 and one.p_continue("grep") == 1.0
    with pytest.raises(ValueError):
        ToolCallPredictor.fit(Trace([]))


def test_confidence(pred):
    # n / (n + min_samples) / (1 + cv) / (1 + error), cv = population std / mean
    assert pred.confidence("test") == pytest.approx((4 / 7) / (1 + math.sqrt(1.25) / 2.5))
    assert pred.confidence("submit") == 0.0
    tr = hand_trace()
    confs = [ToolCallPredictor.fit(tr, min_samples=3, error=e).confidence("test") for e in (0.0, 0.5, 1.0, 2.0)]
    assert all(0.0 <= c <= 1.0 for c in confs)
    assert confs == sorted(confs, reverse=True) and len(set(confs)) == 4
    assert confs[2] == pytest.approx(confs[0] / 2)
    for cat in ("test", "read", "none", "grep", "submit", "edit"):
        assert 0.0 <= pred.confidence(cat) <= 1.0


def test_injected_error_is_deterministic():
    tr = hand_trace()
    noisy = ToolCallPredictor.fit(tr, min_samples=3, error=0.5, seed=0)
    a = noisy.expected_idle("test", key=7)
    assert a == noisy.expected_idle("test", key=7)  # same key, same value
    assert a != pytest.approx(2.5)
    mult = math.exp(np.random.default_rng((0, 7)).normal(0.0, 0.5))
    assert a == pytest.approx(2.5 * mult)
    # the multiplier belongs to the request (the key), whatever the category
    assert noisy.expected_idle("read", key=7) == pytest.approx(0.2 * mult)
    assert noisy.expected_idle("test", key=8) != a
    assert ToolCallPredictor.fit(tr, min_samples=3, error=0.5, seed=1).expected_idle("test", key=7) != a
    assert noisy.expected_idle("test") == pytest.approx(2.5)  # no key: no error
    assert noisy.expected_idle("submit", key=7) == math.inf
    exact = ToolCallPredictor.fit(tr, min_samples=3, error=0.0, seed=0)
    assert exact.expected_idle("test", key=7) == pytest.approx(2.5)
    # log-normal: log(idle / 2.5) ~ N(0, 0.5) over requests
    logs = np.log([noisy.expected_idle("test", key=k) / 2.5 for k in range(2000)])
    assert abs(logs.mean()) < 0.05 and abs(logs.std() - 0.5) < 0.05


def test_evaluate_on_its_own_trace(pred):
    ev = pred.evaluate(hand_trace())
    assert ev["calls"] == 14
    assert ev["categories"] == ["none", "read", "submit", "test"]
    # (predicted, true) per continuing call: test 2.5 vs 1..4, read 0.2 vs .1 .2 .3, grep 2.86 vs 7, none 5.5 vs 5 6
    pairs = [(2.5, g) for g in (1, 2, 3, 4)] + [(0.2, g) for g in (0.1, 0.2, 0.3)] + [(2.86, 7)] + [(5.5, 5), (5.5, 6)]
    assert ev["idle_mae_s"] == pytest.approx(np.mean([abs(p - t) for p, t in pairs]))
    assert ev["idle_mae_s"] == pytest.approx(9.34 / 10)
    logs = [abs(math.log((p + 1e-3) / (t + 1e-3))) for p, t in pairs]
    assert ev["idle_median_abs_log_error"] == pytest.approx(float(np.median(logs)))
    # Brier: only grep (p 5/7, continues) and none (p 2/3: 2 continue, 1 ends) miss
    assert ev["continue_brier"] == pytest.approx(((2 / 7) ** 2 + 2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 14)


def test_evaluate_error_grows_on_a_shifted_trace(pred):
    own = pred.evaluate(hand_trace())
    shifted = pred.evaluate(hand_trace(shift=10.0))
    assert shifted["idle_mae_s"] > own["idle_mae_s"] + 5
    assert shifted["idle_median_abs_log_error"] > own["idle_median_abs_log_error"]
    assert shifted["continue_brier"] == pytest.approx(own["continue_brier"])  # same sessions ends


def test_bundled_trace_held_out_half():
    trace = load_trace(BUNDLED)
    train, test = Trace(trace.sessions[::2]), Trace(trace.sessions[1::2])
    pred = ToolCallPredictor.fit(train)
    ev = pred.evaluate(test)
    assert ev["calls"] == test.num_calls
    assert ev["continue_brier"] < 0.05  # only the last call of a session ends it
    assert "submit" in ev["categories"] and pred.p_continue("submit") < 0.05
    for cat in ev["categories"]:
        if cat != "submit":
            assert pred.p_continue(cat) > 0.9
            assert 0.0 < pred.confidence(cat) <= 1.0
            assert 0.0 < pred.expected_idle(cat) < math.inf
    assert ev["idle_mae_s"] is not None and math.isfinite(ev["idle_mae_s"])
    assert 0.0 < ev["idle_median_abs_log_error"] < 1.0
    # held-out error is of the order of the training error, not an artefact of fitting
    own = pred.evaluate(train)
    assert ev["idle_median_abs_log_error"] < 2 * own["idle_median_abs_log_error"]
