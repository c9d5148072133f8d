"""The offline eviction bound under a run's own schedule (``cwsim.eviction_bound``)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cwsim.block_pool import BlockPool
from cwsim.config import SimConfig
from cwsim.eviction_bound import MinResult, ReferenceStream, belady_min, next_references
from cwsim.policies.registry import POLICIES
from cwsim.runner import simulate
from tests.conftest import agent_trace


def brute_force_min_misses(ids: list[int], capacity: int, releases: list[bool] | None = None) -> int:
    """The fewest misses of a cache that caches every miss and never drops a pinned content:
    every eviction choice tried."""
    releases = releases or [False] * len(ids)
    pinned_before = []  # the pinned contents before each event (they follow from the stream alone)
    pins: dict[int, int] = {}
    for h, r in zip(ids, releases):
        pinned_before.append(frozenset(pins))
        pins[h] = pins.get(h, 0) + (-1 if r else 1)
        if not pins[h]:
            del pins[h]
    pinning = any(releases)

    @lru_cache(maxsize=None)
    def go(i: int, resident: frozenset) -> int:
        if i == len(ids):
            return 0
        h = ids[i]
        if releases[i] or h in resident:
            return go(i + 1, resident)
        if len(resident) < capacity:
            return 1 + go(i + 1, resident | {h})
        unpinned = resident - pinned_before[i] if pinning else resident
        return 1 + min(go(i + 1, (resident - {v}) | {h}) for v in unpinned)

    return go(0, frozenset())


@st.composite
def pinned_streams(draw):
    """Requests that reference contents and later release each hold, never more than
    ``capacity`` contents pinned at once."""
    capacity = draw(st.integers(1, 4))
    ids, releases, held = [], [], []
    for _ in range(draw(st.integers(0, 16))):
        if held and draw(st.booleans()):
            h = held.pop(draw(st.integers(0, len(held) - 1)))
            ids.append(h)
            releases.append(True)
            continue
        h = draw(st.integers(0, 5))
        if h not in held and len(set(held)) >= capacity:
            continue
        ids.append(h)
        releases.append(False)
        if draw(st.booleans()):  # held until released (else a reference with no hold: released at once)
            held.append(h)
        else:
            ids.append(h)
            releases.append(True)
    return ids, releases, capacity


# ------------------------------------------------------------------------------- MIN itself
def test_belady_min_on_the_textbook_stream():
    # 3 frames, 1 2 3 4 1 2 5 1 2 3 4 5: OPT has 7 faults (4 distinct pages fill and miss, then 5, 3, 4)
    res = belady_min(np.array([1, 2, 3, 4, 1, 2, 5, 1, 2, 3, 4, 5]), 3)
    assert res == MinResult(references=12, distinct=5, misses=7, evictions=4)
    assert res.remisses == 2


def test_next_references_points_at_the_next_use_or_past_the_end():
    assert next_references(np.array([7, 8, 7, 7, 9])).tolist() == [2, 6, 3, 8, 9]


def test_a_cache_that_holds_everything_misses_each_content_once():
    ids = np.array([3, 1, 3, 2, 1, 3, 2])
    assert belady_min(ids, 3) == MinResult(7, 3, 3, 0)
    assert belady_min(np.empty(0, dtype=np.int64), 5) == MinResult(0, 0, 0, 0)


@settings(max_examples=300, deadline=None)
@given(pinned_streams())
def test_belady_min_with_pins_equals_the_brute_force_optimum(stream):
    ids, releases, capacity = stream
    res = belady_min(np.array(ids, dtype=np.int64), capacity, np.array(releases, dtype=bool))
    assert res.misses == brute_force_min_misses(ids, capacity, releases)
    assert res.references == releases.count(False)


def test_a_pinned_content_is_not_dropped_even_when_its_next_use_is_farthest():
    # capacity 2; 1 is held (pinned) until its last use, 2 and 3 alternate, each released at once
    ids, rel = [1], [False]
    for h in (2, 3, 2, 3, 2, 3):
        ids += [h, h]
        rel += [False, True]
    ids, rel = np.array(ids + [1, 1]), np.array(rel + [True, False])
    assert belady_min(ids, 2, rel).misses == 7  # 1, then every 2 and 3 misses: only they can leave
    assert belady_min(ids[~rel], 2).misses == 4  # without pins: drop 1 (used last), 2 and 3 stay


def test_next_references_skips_releases():
    ids = np.array([7, 8, 7, 7, 9, 7])
    rel = np.array([0, 0, 1, 0, 0, 0], dtype=bool)
    assert next_references(ids, ~rel).tolist() == [3, 7, 3, 5, 10, 11]


def test_bad_capacity_and_ids_are_refused():
    with pytest.raises(ValueError, match="capacity"):
        belady_min(np.array([1]), 0)
    with pytest.raises(ValueError, match="content ids"):
        belady_min(np.array([-1, 2]), 2)
    with pytest.raises(ValueError, match="more than 1 contents pinned"):
        belady_min(np.array([1, 2]), 1, np.array([False, False]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=14), st.integers(1, 4))
def test_belady_min_equals_the_brute_force_optimum(ids, capacity):
    res = belady_min(np.array(ids, dtype=np.int64), capacity)
    assert res.misses == brute_force_min_misses(ids, capacity)
    assert res.evictions == max(0, res.misses - capacity)
    assert res.distinct == len(set(ids))


def test_the_heap_is_compacted_without_changing_the_answer(monkeypatch):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, size=3000)
    want = belady_min(ids, 7)
    import cwsim.eviction_bound as eb

    monkeypatch.setattr(eb, "_CHUNK", 16)  # compaction after every 16 references
    assert belady_min(ids, 7) == want


# ------------------------------------------------------------------- the stream a pool records
def test_the_pool_records_references_and_releases_in_order():
    pool = BlockPool(6)
    pool.references = stream = ReferenceStream()
    a = pool.get_new_blocks(3)  # blocks 1 2 3
    pool.cache_full_blocks(a[:2], [10, 11])  # computed: two misses
    pool.free_blocks(a[::-1])  # released, tail first (block 3 has no hash: no event)
    b = pool.find_longest_prefix([10, 11, 12], 3)
    pool.touch(b)  # a hit on both
    c = pool.get_new_blocks(1)
    pool.cache_full_blocks(c, [11])  # a duplicate of a cached content: a reference, not a miss
    pool.cache_full_blocks(pool.get_new_blocks(2), [12, 12])  # one content twice: one miss
    pool.release_uncached(c)
    ids, rel = stream.events()
    assert ids.tolist() == [10, 11, 11, 10, 10, 11, 11, 12, 12, 11]
    assert rel.tolist() == [False, False, True, True, False, False, False, False, False, True]
    assert stream.misses == 3
    assert len(stream) == 10


# ----------------------------------------------------------------------- the bound of a run
BOUNDED = [name for name, spec in POLICIES.items() if not spec.unbounded]
BOUND_KEYS = {"bound_evicted_blocks", "bound_remisses", "stream_references", "stream_distinct_blocks",
              "stream_remisses", "evictions_vs_bound"}


@pytest.fixture(scope="module")
def pressured_trace():
    return agent_trace(n_sessions=10, turns=8, seed=3, system_tokens=600)


def _run(trace, **kw):
    return simulate(trace, SimConfig(kv_blocks=800, agents=5, **kw)).summary


def _figures(s: dict) -> dict:
    return {k: v for k, v in s.items() if k not in BOUND_KEYS and k not in ("wall_s", "config")}


@pytest.mark.parametrize("policy", BOUNDED)
def test_every_policy_evicts_at_least_its_schedules_bound_and_the_bound_observes_only(pressured_trace, policy):
    plain = _run(pressured_trace, policy=policy)
    s = _run(pressured_trace, policy=policy, eviction_bound=True)
    assert _figures(s) == _figures(plain)  # recording the stream changes nothing the run does
    assert s["evicted_blocks"] > 0
    assert 0 < s["bound_evicted_blocks"] <= s["evicted_blocks"]
    assert 0 <= s["bound_remisses"] <= s["stream_remisses"]
    assert s["evictions_vs_bound"] == s["evicted_blocks"] / s["bound_evicted_blocks"]
    # the same schedule stepped one step at a time references the same blocks in the same order
    stepped = _run(pressured_trace, policy=policy, eviction_bound=True, decode_jumps=False)
    assert {k: stepped[k] for k in BOUND_KEYS} == {k: s[k] for k in BOUND_KEYS}


def test_the_bound_is_below_every_run_of_the_same_schedule_and_lru_is_not_it(pressured_trace):
    s = _run(pressured_trace, policy="vllm", eviction_bound=True)
    # vLLM's LRU order is not optimal on this stream: a better order alone would evict less
    assert s["bound_evicted_blocks"] < s["evicted_blocks"]
    assert s["stream_distinct_blocks"] < s["stream_references"]


def test_an_unbounded_pool_has_no_bound(pressured_trace):
    s = _run(pressured_trace, policy="infinite", eviction_bound=True)
    assert s["evicted_blocks"] == 0
    assert not BOUND_KEYS & set(s)


def test_cwsim_run_eviction_bound_prints_and_writes_the_bound(tmp_path):
    import json

    from typer.testing import CliRunner

    from cwsim.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--max-sessions", "4", "--agents", "4", "--kv-blocks", "4000",
                                   "--eviction-bound", "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["config"]["eviction_bound"] is True
    assert 0 < s["bound_evicted_blocks"] < s["evicted_blocks"]
    assert f"{s['bound_evicted_blocks']:,} blocks (evicted = {s['evictions_vs_bound']:.2f}x this)" in res.output
