"""The CPU KV tier (``cwsim.cpu_tier``): transfer timelines, counts, LRU, and no tier = no change.

Unit tests drive a bare pool and tier with round numbers (0.1 s per block);
one end-to-end test pins a whole run's timeline by hand (one offload +
prefetch, one offload + swap-in). The identity test compares runs without a
tier with numbers recorded before the tier existed.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from cwsim.block_pool import BlockPool, FreedBlocks
from cwsim.config import SimConfig
from cwsim.cpu_tier import DEFAULT_PCIE_GBPS, CpuTier
from cwsim.runner import simulate
from cwsim.steptime import StepTimeProfile
from tests.conftest import agent_trace
from traces.format import Call, Session, ToolCall, Trace, header_line

BT = 0.1  # seconds per block below: 1000 bytes per block at 1e-5 GB/s = 10^4 bytes/s


class Recorder:
    """A score function that records what the pool asks it (and scores everything 0: LRU)."""

    def __init__(self):
        self.calls: list[FreedBlocks] = []

    def __call__(self, freed: FreedBlocks) -> float:
        self.calls.append(freed)
        return 0.0


def setup(num_blocks: int = 12, capacity: int = 8):
    rec = Recorder()
    evicted: list[list[int]] = []
    pool = BlockPool(num_blocks, rec, on_evict=evicted.append)
    lost: list[list[int]] = []
    tier = CpuTier(capacity, pool, block_bytes=1000, pcie_gbps=1e-5, on_evict=lost.append)
    assert tier.transfer_time(1) == pytest.approx(BT)
    return pool, tier, rec, evicted, lost


def cached_release(pool: BlockPool, hashes: list[int], now: float = 0.0) -> np.ndarray:
    """Allocate blocks for ``hashes``, cache them, free them tail first; return them tail first."""
    blocks = pool.get_new_blocks(len(hashes))
    pool.cache_full_blocks(blocks, hashes)
    pool.free_block_table(blocks, None, now)
    return blocks[::-1].copy()


def test_default_bandwidth_and_block_time():
    pool = BlockPool(4)
    tier = CpuTier(10, pool, block_bytes=16 * 131072)  # llama-3.1-8b: 128 KiB per token, 16-token blocks
    assert DEFAULT_PCIE_GBPS == 25.0
    assert tier.block_time == pytest.approx(16 * 131072 / 25e9)


# ------------------------------------------------------------------ offload
def test_offload_holds_blocks_while_copying_then_frees_them_unhashed_not_evicted():
    pool, tier, _, evicted, _ = setup()
    blocks = cached_release(pool, [101, 102, 103, 104])  # blocks 4, 3, 2, 1
    assert tier.offload(blocks, [104, 103, 102, 101], now=1.0)
    assert tier.reserved == 4 and tier.room() == 4
    assert tier.next_deadline() == 1.0  # the request itself is taken at the next tick
    tier.tick(1.0)
    assert (pool.ref[blocks] == 1).all() and pool.num_free == 11 - 4  # held by the copy
    assert all(h in pool.cached for h in (101, 102, 103, 104))  # still hits while copying
    assert tier.next_deadline() == pytest.approx(1.0 + 4 * BT)
    tier.tick(1.39)
    assert len(tier) == 0 and tier.offloaded_blocks == 0
    tier.tick(1.4)
    assert tier.offloaded_blocks == 4 and tier.offload_copied_blocks == 4
    assert list(tier.lru) == [104, 103, 102, 101] and tier.reserved == 0
    assert not any(h in pool.cached for h in (101, 102, 103, 104))
    # unhashed free blocks at the front, in the order given; not evictions
    assert pool.free_block_ids()[:4] == blocks.tolist()
    assert pool.num_evicted == 0 and evicted == [] and pool.num_free_hashed == 0
    pool.get_new_blocks(11)  # reusing them evicts nothing either
    assert pool.num_evicted == 0 and evicted == []
    assert tier.next_deadline() == np.inf
    pool.check_invariants()


def test_offloads_are_fifo_on_one_link_and_duplicates_are_not_copied():
    pool, tier, _, _, _ = setup(num_blocks=16, capacity=10)
    a = cached_release(pool, [1, 2, 3, 4])
    b = cached_release(pool, [5, 6])
    assert tier.offload(a, pool.hash_of[a].tolist(), now=1.0)
    assert tier.offload(b, pool.hash_of[b].tolist(), now=1.1)
    tier.tick(1.1)
    assert [(j.start, j.end) for j in tier._d2h] == [(1.0, pytest.approx(1.4)), (pytest.approx(1.4), pytest.approx(1.6))]
    tier.tick(1.61)
    assert tier.offloaded_blocks == 6 and len(tier) == 6
    # a block whose hash the tier already holds is freed without a copy
    c = cached_release(pool, [5, 7])
    assert tier.offload(c, pool.hash_of[c].tolist(), now=2.0)
    tier.tick(2.0)
    assert tier.next_deadline() == pytest.approx(2.0 + BT)
    tier.tick(2.11)
    assert tier.offloaded_blocks == 8 and tier.offload_copied_blocks == 7
    pool.check_invariants()


def test_block_hit_during_the_copy_stays_cached():
    pool, tier, _, _, _ = setup()
    blocks = cached_release(pool, [11, 12, 13])
    tier.offload(blocks, pool.hash_of[blocks].tolist(), now=0.0)
    tier.tick(0.0)
    hit = np.array([pool.cached[11]])
    pool.touch(hit)  # a request hits block of hash 11 while it is being copied
    tier.tick(0.31)
    assert tier.offloaded_blocks == 2 and 11 in pool.cached and pool.ref[hit[0]] == 1
    assert 11 in tier and 12 in tier and 13 in tier
    pool.check_invariants()


def test_offload_refused_without_room():
    pool, tier, _, _, _ = setup(capacity=3)
    blocks = cached_release(pool, [1, 2, 3, 4])
    assert not tier.offload(blocks, [4, 3, 2, 1], now=0.0)
    assert tier.offload(blocks[:3], [4, 3, 2], now=0.0)
    assert not tier.offload(blocks[3:], [1], now=0.0)  # the 3 reserved fill it
    tier.tick(10.0)
    assert tier.offload(blocks[3:], [1], now=10.0)  # full, but the LRU entry can make room


# --------------------------------------------------------------------- LRU
def test_full_tier_evicts_least_recently_used_and_reports_lost_content():
    pool, tier, _, evicted, lost = setup(num_blocks=20, capacity=4)
    a = cached_release(pool, [1, 2, 3])  # given tail first: 3, 2, 1
    tier.offload(a, [3, 2, 1], now=0.0)
    tier.tick(1.0)
    assert list(tier.lru) == [3, 2, 1]
    b = cached_release(pool, [4, 5])
    tier.offload(b, [5, 4], now=1.0)
    tier.tick(2.0)
    assert list(tier.lru) == [2, 1, 5, 4] and lost == [[3]] and tier.cpu_evicted_blocks == 1
    assert tier.swap_in([2]) == pytest.approx(BT)  # a load makes 2 the most recently used
    assert list(tier.lru) == [1, 5, 4, 2]
    c = cached_release(pool, [6, 7])
    pool.cache_full_blocks(pool.get_new_blocks(1), [5])  # 5 is cached on the GPU again: not lost
    tier.offload(c, [7, 6], now=2.0)
    tier.tick(3.0)
    assert list(tier.lru) == [4, 2, 7, 6] and lost == [[3], [1]] and tier.cpu_evicted_blocks == 3
    assert evicted == [] and pool.num_evicted == 0
    pool.check_invariants()


# ------------------------------------------------------------------ prefetch
def test_prefetch_timeline_hits_wait_for_the_copy_and_release_is_scored():
    pool, tier, rec, _, _ = setup(num_blocks=16)
    blocks = cached_release(pool, [1, 2, 3, 4])
    tier.offload(blocks, [4, 3, 2, 1], now=0.0)
    tier.tick(1.0)
    assert tier.offloaded_blocks == 4
    owner = object()
    p = tier.prefetch([1, 2, 3, 4], at=5.0, owner=owner)
    assert tier.next_deadline() == 5.0
    tier.tick(4.99)
    assert 1 not in pool.cached
    tier.tick(5.0)
    got = p.blocks
    assert len(got) == 4 and all(pool.cached[h] == b for h, b in zip([1, 2, 3, 4], got.tolist()))
    assert (pool.ref[got] == 1).all() and tier.prefetched_blocks == 0
    assert tier.next_deadline() == pytest.approx(5.4)
    assert tier.load_wait(got[:2], now=5.1) == pytest.approx(0.3)
    assert tier.holds_blocks()
    n_calls = len(rec.calls)
    tier.tick(5.41)
    assert tier.prefetched_blocks == 4 and not tier.holds_blocks()
    assert tier.load_wait(got, now=5.41) == 0.0
    freed = rec.calls[n_calls]
    assert freed.reason == "prefetch" and freed.request is owner and freed.now == pytest.approx(5.4)
    assert freed.blocks.tolist() == got[::-1].tolist() and freed.hashes.tolist() == [4, 3, 2, 1]
    assert pool.free_block_ids()[-4:] == got[::-1].tolist()  # cached, released last: evicted last
    pool.check_invariants()


def test_prefetch_skips_gpu_blocks_stops_at_a_gap_queues_and_can_be_cancelled():
    pool, tier, _, _, _ = setup(num_blocks=20, capacity=10)
    a = cached_release(pool, [2, 3, 5])
    tier.offload(a, [5, 3, 2], now=0.0)
    tier.tick(1.0)
    pool.cache_full_blocks(pool.get_new_blocks(1), [1])  # hash 1 is on the GPU (in use)
    p1 = tier.prefetch([1, 2, 3, 4, 5], at=2.0)  # 1 on GPU, 2 and 3 in the tier, 4 nowhere: 5 is useless
    p2 = tier.prefetch([5], at=2.05)  # queued behind p1 on the same link
    p3 = tier.prefetch([5], at=2.0)
    tier.cancel(p3)  # same start as p1, cancelled before it starts
    tier.tick(2.0)
    assert len(p1.blocks) == 2 and p1.end == pytest.approx(2.2)
    assert tier.next_deadline() == pytest.approx(2.2)
    tier.tick(2.21)
    assert p2.start == pytest.approx(2.2) and p2.end == pytest.approx(2.3)
    tier.tick(3.0)
    assert tier.prefetched_blocks == 3 and p3.blocks.size == 0 and p3.cancelled
    tier.cancel(p2)  # done: no effect
    assert not p2.cancelled
    pool.check_invariants()


def test_prefetch_loads_at_most_the_free_blocks():
    pool, tier, _, _, _ = setup(num_blocks=8, capacity=8)
    a = cached_release(pool, [1, 2, 3, 4, 5])
    tier.offload(a, pool.hash_of[a].tolist(), now=0.0)
    tier.tick(1.0)
    pool.get_new_blocks(5)  # 2 free left
    p = tier.prefetch([1, 2, 3, 4, 5], at=1.0)
    tier.tick(1.0)
    assert len(p.blocks) == 2 and pool.cached[1] in p.blocks and pool.cached[2] in p.blocks
    assert p.end == pytest.approx(1.2)


# --------------------------------------------------- end to end, by hand
STEP = StepTimeProfile(
    name="flat", model="test", gpu="test",
    step_overhead_s=0.1, prefill_token_s=0.0, decode_seq_s=0.0, prefill_attn_pair_s=0.0, decode_ctx_token_s=0.0,
    kv_bytes_per_token=250, weights_bytes=0, gpu_mem_bytes=2**30,
)  # every step 0.1 s; a 4-token block is 1000 bytes


def _trace_files(tmp_path):
    prof = tmp_path / "flat.json"
    prof.write_text(json.dumps(STEP.to_json()))
    ptrace = tmp_path / "pred.jsonl"  # "slow": always 10 s to the next call; no tool: the last call
    lines = [header_line()]
    for k in range(20):
        lines.append(Call(f"p{k}", 0, (("x", 4),), 1, None, (ToolCall("t", "slow"),), gap_s=10.0).to_line())
        lines.append(Call(f"p{k}", 1, (("x", 4),), 1).to_line())
    ptrace.write_text("\n".join(lines) + "\n")
    return str(prof), str(ptrace)


def hand_trace() -> Trace:
    """A returns after 10 s, as predicted; B after 2 s, before its prefetch."""
    sessions = []
    for name, gap in (("A", 10.0), ("B", 2.0)):
        x = name.lower()
        sessions.append(Session(name, (
            Call(name, 0, ((x, 16),), 4, f"{x}0", (ToolCall("t", "slow"),), gap_s=gap),
            Call(name, 1, ((x, 16), (f"{x}0", 4), (f"{x}t", 4)), 1, f"{x}1"),
        )))
    return Trace(sessions, source="hand")


@pytest.mark.parametrize("jumps", [True, False])
def test_hand_computed_timeline_offload_prefetch_swap_in(tmp_path, jumps):
    """One agent, sessions A then B; steps of 0.1 s; 4-token blocks moved in 0.1 s each (PCIe 1e-5 GB/s).

    A0 (16-token prompt, 4 output tokens): prefill 0-0.1, 3 decode steps to 0.4; its 4 full blocks
    (16 tokens; the last output token is never computed) are freed at 0.4. Predicted tool time 10 s
    > 2 s: offload 4 blocks 0.4-0.8 (then freed unhashed), prefetch at 0.4 + 10 - 0.4 - 0.5 = 9.5,
    copied 9.5-9.9. A1 arrives at 10.4: hits the 4 prefetched blocks (16 tokens), computes 8, ends 10.5.
    B0 runs 10.5-10.9, offload 10.9-11.3, prefetch planned at 19.9. B1 arrives at 12.9: misses the GPU,
    the tier holds its 4 blocks: swapped in (0.4 s added to the step), 8 tokens computed: ends at
    12.9 + 0.1 + 0.4 = 13.4. B's prefetch never runs (nothing is left to simulate).
    """
    prof, ptrace = _trace_files(tmp_path)
    cfg = SimConfig(policy="tokencake", kv_blocks=64, block_size=4, profile=prof, agents=1, predictor_trace=ptrace,
                    pcie_gbps=1e-5, decode_jumps=jumps)
    s = simulate(hand_trace(), cfg, tmp_path / "out").summary
    assert s["cpu_kv_blocks"] == 63  # tokencake's default tier: the GPU pool's usable blocks
    assert (s["offloaded_blocks"], s["prefetched_blocks"], s["swap_in_hits"], s["swapped_in_tokens"]) == (8, 4, 4, 16)
    assert s["evicted_blocks"] == 0 and s["harmful_evictions"] == 0 and s["cpu_evicted_blocks"] == 0
    assert (s["prompt_tokens"], s["cached_prompt_tokens"], s["recomputed_prompt_tokens"]) == (80, 16, 0)
    assert s["prefix_hit_rate"] == pytest.approx(0.2)
    assert s["makespan_s"] == pytest.approx(13.4)
    assert s["total_session_time_s"] == pytest.approx(10.5 + 2.9)
    assert s["steps"] == 10 and s["decode_jumps"] == (2 if jumps else 0)
    rows = (tmp_path / "out" / "requests.csv").read_text().splitlines()[1:]
    finish = {(r.split(",")[0], int(r.split(",")[1])): float(r.split(",")[5]) for r in rows}
    assert finish == {("A", 0): pytest.approx(0.4), ("A", 1): pytest.approx(10.5),
                      ("B", 0): pytest.approx(10.9), ("B", 1): pytest.approx(13.4)}
    cached = {(r.split(",")[0], int(r.split(",")[1])): int(r.split(",")[8]) for r in rows}
    assert cached == {("A", 0): 0, ("A", 1): 16, ("B", 0): 0, ("B", 1): 0}  # swapped-in tokens are not GPU hits


def test_hand_trace_without_tier_recomputes(tmp_path):
    """The same run with the tier off (space scheduler only): nothing moves; B1 hits its blocks on the GPU."""
    prof, ptrace = _trace_files(tmp_path)
    cfg = SimConfig(policy="tokencake", kv_blocks=64, block_size=4, profile=prof, agents=1, predictor_trace=ptrace,
                    cpu_kv_blocks=0)
    s = simulate(hand_trace(), cfg).summary
    assert (s["offloaded_blocks"], s["prefetched_blocks"], s["swap_in_hits"], s["cpu_kv_blocks"]) == (0, 0, 0, 0)
    assert s["cached_prompt_tokens"] == 32 and s["makespan_s"] == pytest.approx(13.0)


def test_kv_gib_conversion_for_the_tier(tmp_path):
    prof, ptrace = _trace_files(tmp_path)
    cfg = SimConfig(policy="vllm", kv_blocks=64, block_size=4, profile=prof, agents=1, cpu_kv_gib=1000 * 10 / 2**30)
    assert simulate(hand_trace(), cfg).summary["cpu_kv_blocks"] == 10
    with pytest.raises(ValueError):
        SimConfig(cpu_kv_blocks=5, cpu_kv_gib=1.0)
    with pytest.raises(ValueError):
        SimConfig(pcie_gbps=0.0)


# ------------------------------------------------ no tier: nothing changes
GOLDEN = json.loads((Path(__file__).parent / "data" / "no_tier_golden.json").read_text())
TIER_FIELDS = ("offloaded_blocks", "prefetched_blocks", "swap_in_hits", "swapped_in_tokens", "cpu_evicted_blocks",
               "cpu_kv_blocks")


@pytest.fixture(scope="module")
def golden_trace():
    return agent_trace(n_sessions=8, turns=12, seed=3)


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_without_tier_results_are_those_recorded_before_the_tier_existed(golden_trace, key):
    """Every summary field (but host time, trace and config) equals the run recorded before the change."""
    policy, kv = key.split("/")
    s = simulate(golden_trace, SimConfig(policy=policy, kv_blocks=int(kv), agents=4)).summary
    assert {k: s[k] for k in GOLDEN[key]} == GOLDEN[key]
    assert all(s[f] == 0 for f in TIER_FIELDS)


@pytest.mark.parametrize("policy", ["vllm", "cachewise"])
def test_a_tier_no_policy_fills_changes_nothing(golden_trace, policy):
    s = simulate(golden_trace, SimConfig(policy=policy, kv_blocks=1300, agents=4, cpu_kv_blocks=500)).summary
    key = f"{policy}/1300"
    assert {k: s[k] for k in GOLDEN[key]} == GOLDEN[key]
    assert s["cpu_kv_blocks"] == 500 and s["offloaded_blocks"] == s["swap_in_hits"] == 0


def test_cli_flags(tmp_path):
    from typer.testing import CliRunner

    from cwsim.cli import app

    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--policy", "tokencake", "--max-sessions", "2", "--kv-blocks", "20000",
                                   "--cpu-kv-blocks", "5000", "--pcie-gbps", "12.5", "--offload-threshold-s", "1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    s = json.loads((out / "summary.json").read_text())
    assert s["cpu_kv_blocks"] == 5000 and s["config"]["pcie_gbps"] == 12.5
    assert s["config"]["offload_threshold_s"] == 1.0
    assert all(f in s for f in TIER_FIELDS)
    assert "offloaded / prefetched / swapped in" in res.output
    assert "prefix hit rate (GPU; swap-ins excluded)" in res.output
    res = CliRunner().invoke(app, ["run", "--max-sessions", "1", "--cpu-kv-blocks", "1", "--cpu-kv-gib", "1"])
    assert res.exit_code == 2 and "not both" in res.output
