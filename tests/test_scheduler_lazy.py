"""The scheduler's lazy decode batch against the request-by-request reference.

Two schedulers over two identical pools get the same requests at the same
steps: one keeps its decoders lazily (``lazy_decode=True``, the default), the
other schedules every request one by one (``lazy_decode=False``). After every
step the two must agree exactly: the plan, every request's counters, block
table and cached blocks, the waiting queue and the pool's free-queue order.
"""

from __future__ import annotations

import random

import pytest

from cwsim.block_pool import BlockPool
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies.api import Policy
from cwsim.policy_adapter import SimEnvironment
from cwsim.request import Request
from cwsim.scheduler import Scheduler
from cwsim.workload import SessionState, SimCall

BS = 4


class Recorder:
    """The scheduler's metrics hooks, recording what finished when."""

    def __init__(self):
        self.finished: list[tuple[int, float]] = []

    def on_admit(self, *args):
        pass

    def on_finish(self, req, now):
        self.finished.append((req.rid, now))


class FirstRunningVictim(Policy):
    """Preempts the earliest admitted running request: the victim is a lazy decoder."""

    name = "first-victim"

    def preemption_victim(self, running):
        return running[0]


def make(lazy: bool, num_blocks: int, budget: int, policy: Policy, max_num_seqs: int = 64):
    pool = BlockPool(num_blocks)
    kv = KVCacheManager(pool, BS)
    env = SimEnvironment(policy, kv)
    sched = Scheduler(kv, env, Recorder(), max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                      lazy_decode=lazy)
    env.attach(sched)
    return sched


def request(rid, _session, turn, prompt, output, hashes, arrival) -> Request:
    """A request of its own session (numbered by ``rid``, so that requests arriving at the same
    instant keep the order they were added in, as with no session)."""
    sess = SessionState(rid, f"s{rid}", [SimCall((), prompt, output, 0.0, 0)], None)
    return Request(rid, sess, turn, prompt, output, hashes, arrival)


def workload(seed: int, n: int) -> list[tuple[int, tuple]]:
    """(arrival step, request fields): prompts share a 3-block prefix in pairs, so some hit."""
    rng = random.Random(seed)
    out = []
    for rid in range(n):
        prompt = rng.randint(3, 40)
        output = rng.randint(1, 30)
        n_blocks = (prompt + output) // BS
        family = rid // 2
        hashes = [1000 * family + i if i < 3 else 10**6 + 1000 * rid + i for i in range(n_blocks)]
        out.append((rng.randint(0, 60), (rid, None, 0, prompt, output, hashes, 0.0)))
    return out


def state(sched: Scheduler, plan, finished) -> tuple:
    reqs = sorted(sched.running + sched.waiting, key=lambda r: r.rid)
    return (
        [(r.rid, *sched.counters(r), r.blocks.tolist(), r.num_cached_blocks, r.preemptions) for r in reqs],
        [r.rid for r in sched.running],
        [r.rid for r in sched.waiting],
        sched.kv.pool.free_block_ids(),
        sorted(sched.kv.pool.cached.items()),  # which block a hash lookup returns
        (plan.prefill_tokens, plan.attn_pairs, plan.decode_seqs, plan.decode_ctx, plan.admitted,
         [r.rid for r in plan.preempted]),
        [r.rid for r in finished],
    )


def run_both(seed: int, num_blocks: int, budget: int, policy_cls, steps: int = 400):
    arrivals = workload(seed, 24)
    pair = [make(lazy, num_blocks, budget, policy_cls()) for lazy in (True, False)]
    stats = {"lazy_seen": 0, "preemptions": 0, "lazy_preempted": 0}
    for step in range(steps):
        now = float(step)
        for at, fields in arrivals:
            if at == step:
                for sched in pair:
                    sched.add(request(*fields))
        out = []
        for sched in pair:
            was_lazy = {r.rid for r in sched.running if r.lazy}
            plan = sched.schedule(now)
            if sched.lazy_decode:
                stats["lazy_seen"] = max(stats["lazy_seen"], plan.lazy)
                stats["preemptions"] += len(plan.preempted)
                stats["lazy_preempted"] += sum(r.rid in was_lazy for r in plan.preempted)
            finished = sched.update(plan, now)
            sched.kv.pool.check_invariants()
            sched.check_invariants()
            out.append(state(sched, plan, finished))
        assert out[0] == out[1], f"step {step}"
    done = [s.metrics.finished for s in pair]
    assert done[0] == done[1] and len(done[0]) == 24  # everything finished, in the same order
    return stats, pair


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_blocks,budget", [(200, 64), (60, 64), (40, 9)])
def test_lazy_batch_matches_request_by_request(seed, num_blocks, budget):
    stats, pair = run_both(seed, num_blocks, budget, Policy)
    assert stats["lazy_seen"] >= 3  # the lazy batch really carried decoders
    assert pair[1]._n_lazy == 0  # the reference never went lazy


@pytest.mark.parametrize("seed", range(4))
def test_preempting_a_lazy_decoder_matches_the_reference(seed):
    stats, _ = run_both(seed, 40, 64, FirstRunningVictim)
    assert stats["lazy_preempted"] > 0  # the victim was a lazy decoder (and the runs still agreed)


@pytest.mark.parametrize("seed", range(3))
def test_a_jump_equals_its_single_steps(seed):
    """finish_jump(n) leaves the same state as n single decode steps."""
    rng = random.Random(seed)
    pair = [make(lazy, 300, 512, Policy()) for lazy in (True, False)]
    for rid in range(6):  # pairs with the same content: which copy of a block is cached first matters
        fields = (rid, None, 0, rng.randint(5, 30), rng.randint(20, 60),
                  [10**4 * (rid // 2) + i for i in range(30)], 0.0)
        for sched in pair:
            sched.add(request(*fields))
    lazy, ref = pair
    for sched in pair:  # one prefill step: everyone decodes from then on
        sched.update(sched.schedule(0.0), 0.0)
    jumps = 0
    while lazy.running:
        plan = lazy.schedule(1.0)
        ref_plan = ref.schedule(1.0)
        assert plan.decode_only and plan.lazy == len(lazy.running)
        n = min(lazy.steps_to_first_finish(), lazy.steps_within_free_blocks(rng.randint(1, 40)))
        finished = lazy.finish_jump(n)
        for r in finished:
            lazy.finish(r, 1.0)
        ref_finished = ref.update(ref_plan, 1.0)
        for _ in range(n - 1):
            ref_finished += ref.update(ref.schedule(1.0), 1.0)
        jumps += n > 1
        assert [r.rid for r in finished] == [r.rid for r in ref_finished]
        lazy.check_invariants()
        assert state(lazy, plan, finished)[:4] == state(ref, plan, ref_finished)[:4]
    assert jumps >= 3 and not ref.running


def test_a_jump_caches_duplicate_blocks_in_step_order():
    """Two requests with the same content, the later one ahead: it fills each shared block first.

    A (prompt 5) and B (prompt 9, admitted after A, hits A's first block) decode
    the same hashes; B reaches each later block 4 steps before A. Within one
    jump the step order decides which copy a lookup returns, as in single steps.
    """
    hashes = list(range(100, 112))
    pair = [make(lazy, 100, 512, Policy()) for lazy in (True, False)]
    for sched in pair:
        sched.add(request(0, None, 0, 5, 30, hashes, 0.0))
        sched.add(request(1, None, 0, 9, 30, hashes, 0.0))
        sched.update(sched.schedule(0.0), 0.0)
    lazy, ref = pair
    plan = lazy.schedule(1.0)
    n = lazy.steps_to_first_finish()
    assert n == 29
    finished = lazy.finish_jump(n)
    b_blocks = dict(zip(hashes, lazy.running[1].blocks.tolist()))
    assert [r.rid for r in finished] == [0, 1]  # both generate their 30th token in the jump's last step
    for r in finished:
        lazy.finish(r, 1.0)
    ref.update(ref.schedule(1.0), 1.0)
    for _ in range(n - 1):
        ref.update(ref.schedule(1.0), 1.0)
    assert lazy.kv.pool.cached[104] == b_blocks[104]  # B filled it first
    assert sorted(lazy.kv.pool.cached.items()) == sorted(ref.kv.pool.cached.items())
    assert state(lazy, plan, [])[:4] == state(ref, plan, [])[:4]


@pytest.mark.parametrize("seed", range(4))
def test_steps_within_free_blocks_is_the_most_steps_the_free_blocks_cover(seed):
    """The closed form against its definition: the largest ``m <= n`` whose allocations the free blocks
    cover (step by step, each step after the current one a block for each request of the bucket due
    then), over batches whose buckets differ in size and pools nearly full."""
    rng = random.Random(seed)
    sched = make(True, rng.randint(60, 90), 512, Policy())
    for rid in range(rng.randint(3, 9)):
        sched.add(request(rid, None, 0, rng.randint(1, 9), 200, [10**4 * rid + i for i in range(60)], 0.0))
    sched.update(sched.schedule(0.0), 0.0)  # their prefills: from here on they decode, lazily
    checked = covered_all = 0
    while sched.running:
        plan = sched.schedule(1.0)
        if not plan.decode_only:  # (a preemption: a step request by request)
            sched.update(plan, 1.0)
            continue
        sched.absorb(plan)  # as the engine does before it plans a jump: the whole batch lazily
        free = sched.kv.pool.num_free
        need = [0]  # need[m - 1]: the blocks that m steps allocate after the current one
        for t in range(sched.step + 1, sched.step + 300):
            need.append(need[-1] + len(sched._buckets[-t % BS]))
        for n in (1, 2, 5, 17, 40, 300):
            want = max(m for m in range(1, n + 1) if need[m - 1] <= free)
            assert sched.steps_within_free_blocks(n) == want
            checked += 1
            covered_all += want == n
        for r in sched.finish_jump(1):
            sched.finish(r, 1.0)
    assert checked > covered_all > 0  # both branches: all n steps covered, and the closed form
