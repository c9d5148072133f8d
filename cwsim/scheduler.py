"""One scheduling step of vLLM v1's scheduler (``vllm/v1/core/sched/scheduler.py``).

No clock here: :meth:`Scheduler.schedule` decides the next step's batch and
:meth:`Scheduler.update` applies its result; the engine (``cwsim.engine``)
charges the time. Per step, as vLLM does:

1. Running requests first, in order: each gets the tokens it still needs
   (a prefill chunk, or 1 for decode) within the token budget. When its
   blocks cannot be allocated, the scheduling policy's preemption victim (FCFS:
   the last admitted) is preempted: its blocks are freed (tail first, still
   cached) and it goes back to the front of the waiting queue, to be
   recomputed from its prefix-cache hits.
2. If nothing was preempted, waiting requests in the policy's order while
   there is token budget and fewer than ``max_num_seqs`` running: the longest
   cached prefix shortens the prefill, and chunked prefill takes what the
   budget allows. The first request that cannot get blocks stops admission.
   With a CPU tier (``cwsim.cpu_tier``), the prefix blocks that follow the GPU
   hit in the tier are swapped in rather than computed: their load time is
   added to the step (``StepPlan.transfer_s``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policies.base import SchedulingPolicy
from cwsim.request import Request
from cwsim.steptime import prefill_attn_pairs


class SimulationError(RuntimeError):
    """The simulated engine cannot make progress (e.g. a prompt larger than the pool)."""


@dataclass(slots=True)
class StepPlan:
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    admitted: int = 0
    prefill_tokens: int = 0
    attn_pairs: float = 0.0
    decode_seqs: int = 0
    decode_ctx: int = 0
    #: CPU tier loads this step waits for: synchronous swap-ins (summed) and prefetch copies (the latest end)
    swap_in_s: float = 0.0
    load_wait_s: float = 0.0

    @property
    def transfer_s(self) -> float:
        return self.load_wait_s + self.swap_in_s

    @property
    def decode_only(self) -> bool:
        return self.prefill_tokens == 0 and not self.preempted and self.admitted == 0


class Scheduler:
    def __init__(self, kv: KVCacheManager, policy: SchedulingPolicy, metrics, *, max_num_seqs: int, max_num_batched_tokens: int,
                 cpu_tier=None):
        self.kv = kv
        self.cpu_tier = cpu_tier  # cwsim.cpu_tier.CpuTier or None
        self.policy = policy
        self.metrics = metrics
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def _preempt(self, victim: Request, now: float) -> None:
        self.kv.free(victim, now, "preempt")
        victim.num_computed = 0
        victim.preemptions += 1
        self.waiting.insert(0, victim)

    def schedule(self, now: float) -> StepPlan:
        plan = StepPlan()
        kv, running = self.kv, self.running
        budget = self.max_num_batched_tokens
        scheduled = plan.scheduled
        bs = kv.block_size
        decode_seqs = decode_ctx = 0
        i = 0
        if running and len(running) <= budget and (ctx := self._decode_all(plan)) is not None:
            i = decode_seqs = len(running)
            budget -= i
            decode_ctx = ctx
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed
            n_new = req.prompt_len + req.num_generated - computed
            if n_new == 1 and req.num_generated and (
                    computed % bs or (len(req.blocks) * bs == computed and (kv.pool.num_free or kv.pool.growable))):
                # one decode token, what allocate_slots would do without its checks: inside the
                # last block nothing is allocated; at a block boundary the one new block is free
                # (no free block: the general path below, which may preempt)
                if computed % bs == 0:
                    req.blocks = np.concatenate((req.blocks, kv.pool.get_new_blocks(1)))
                if (computed + 1) % bs == 0:
                    kv.cache_blocks(req, computed + 1)
                scheduled.append((req, 1))
                decode_seqs += 1
                decode_ctx += computed
                budget -= 1
                i += 1
                continue
            if n_new > budget:
                n_new = budget
            while kv.allocate_slots(req, n_new) is None:
                victim = self.policy.preemption_victim(running)
                vi = running.index(victim)
                running.pop(vi)
                for j, (r, n) in enumerate(scheduled):
                    if r is victim:  # undo its share of this step
                        scheduled.pop(j)
                        budget += n
                        break
                if vi < i:
                    i -= 1
                self._preempt(victim, now)
                plan.preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append((req, n_new))
                budget -= n_new
                i += 1
                continue
            break
        n_fast = len(scheduled) if not plan.preempted else 0
        if not plan.preempted and self.waiting:
            self._admit(plan, budget, now)
        if n_fast == len(scheduled) and decode_seqs == n_fast:
            plan.decode_seqs, plan.decode_ctx = decode_seqs, decode_ctx
        else:  # account the batch request by request
            prefill_tokens = decode_seqs = decode_ctx = 0
            attn_pairs = 0.0
            for req, n in scheduled:
                computed, gen = req.num_computed, req.num_generated
                if gen == 0 or computed < req.prompt_len + gen - 1:  # req.in_prefill
                    prefill_tokens += n
                    attn_pairs += prefill_attn_pairs(n, computed)
                else:
                    decode_seqs += 1
                    decode_ctx += computed
            plan.prefill_tokens, plan.attn_pairs = prefill_tokens, attn_pairs
            plan.decode_seqs, plan.decode_ctx = decode_seqs, decode_ctx
        if not scheduled and not running and self.waiting and not plan.preempted and not (
                self.cpu_tier is not None and self.cpu_tier.holds_blocks()):  # else: wait for the copies
            req = self.waiting[0]
            need = -(-req.num_tokens // kv.block_size)
            raise SimulationError(
                f"request of session {req.session.session_id!r} turn {req.turn} needs {need} blocks "
                f"({req.num_tokens} tokens) but the pool has {kv.pool.num_usable_blocks} usable blocks: "
                "raise --kv-blocks / --kv-gib"
            )
        return plan

    def _decode_all(self, plan: StepPlan) -> int | None:
        """Schedule one decode token for every running request in one go.

        Applies only when every running request decodes and the blocks they need
        are free (so nothing is preempted): then popping them together hands
        out exactly the blocks the request-by-request loop would, in running order.
        Returns the batch's decode context (the sum of computed tokens), or None
        when it does not apply.
        """
        running, kv = self.running, self.kv
        bs = kv.block_size
        last = bs - 1
        need: list[Request] = []
        fill: list[tuple[Request, int]] = []
        ctx = 0
        for r in running:
            c = r.num_computed
            g = r.num_generated
            if g == 0 or c != r.prompt_len + g - 1:
                return None
            ctx += c
            m = c % bs
            if m == 0:
                need.append(r)
            if m == last:
                fill.append((r, c + 1))
        if need:
            if len(need) > kv.pool.num_free:
                return None
            got = kv.pool.get_new_blocks(len(need))
            concat = np.concatenate
            for i, r in enumerate(need):
                r.blocks = concat((r.blocks, got[i : i + 1]))
        if fill:
            kv.cache_blocks_of(fill)
        plan.scheduled.extend([(r, 1) for r in running])
        return ctx

    def admission_blocked(self) -> bool:
        """True when no waiting request can be admitted before a running one finishes.

        Checked before jumping over decode-only steps: during the jump free
        blocks only shrink and a waiting request's needs only grow (a hit lost
        to eviction is a block more to allocate), so a request that cannot fit
        now cannot fit then, whatever order a dynamic policy gives the queue.
        With a static order only the head matters, and it already failed.
        """
        if not self.waiting or self.policy.static or len(self.running) >= self.max_num_seqs:
            return True
        kv = self.kv
        bs, pool = kv.block_size, kv.pool
        budget = self.max_num_batched_tokens - len(self.running)
        if budget <= 0:
            return True
        for req in self.waiting:
            hits = kv.longest_prefix(req)
            hit_tokens = len(hits) * bs
            tokens = hit_tokens + min(req.num_tokens - hit_tokens, budget)
            need = -(-tokens // bs) - len(hits) + int(np.count_nonzero(pool.ref[hits] == 0))
            if need <= pool.num_free:
                return False
        return True

    def _admit(self, plan: StepPlan, budget: int, now: float) -> None:
        kv, policy, waiting, tier = self.kv, self.policy, self.waiting, self.cpu_tier
        bs = kv.block_size
        if policy.static or len(waiting) > getattr(policy, "max_queue", len(waiting)):
            order = waiting
        else:
            order = sorted(waiting, key=policy.priority)  # stable: ties keep queue order
        admitted: list[Request] = []
        for req in order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            hits, hit_tokens = kv.get_computed_blocks(req)
            if tier is None:
                n_new = min(req.num_tokens - hit_tokens, budget)
                if kv.allocate_slots(req, n_new, hits) is None:
                    break
                req.num_computed = hit_tokens
                self.metrics.on_admit(req, hit_tokens, now)
            else:  # the prefix continues in the CPU tier: swap those blocks in
                n_hit = len(hits)
                n_swap = tier.continuation(req.hashes, n_hit, (req.num_tokens - 1) // bs)
                swap_tokens = n_swap * bs
                n_new = min(req.num_tokens - hit_tokens - swap_tokens, budget)
                if kv.allocate_slots(req, swap_tokens + n_new, hits) is None:
                    break
                req.num_computed = hit_tokens + swap_tokens
                if n_swap:
                    plan.swap_in_s += tier.swap_in(req.hashes[n_hit : n_hit + n_swap])
                plan.load_wait_s = max(plan.load_wait_s, tier.load_wait(hits, now))
                self.metrics.on_admit(req, hit_tokens, now, swap_tokens)
            self.running.append(req)
            plan.scheduled.append((req, n_new))
            budget -= n_new
            admitted.append(req)
        if admitted:
            plan.admitted = len(admitted)
            if order is waiting:
                del waiting[: len(admitted)]
            else:
                ids = {id(r) for r in admitted}
                waiting[:] = [r for r in waiting if id(r) not in ids]

    def update(self, plan: StepPlan, now: float) -> list[Request]:
        """Apply a finished step: computed tokens, new tokens, finished requests."""
        finished: list[Request] = []
        for req, n in plan.scheduled:
            computed = req.num_computed + n
            req.num_computed = computed
            gen = req.num_generated
            if computed >= req.prompt_len + gen:
                req.num_generated = gen = gen + 1
                if req.first_token < 0:
                    req.first_token = now
                if gen >= req.output_len:
                    finished.append(req)
        for req in finished:
            self.finish(req, now)
        return finished

    def finish(self, req: Request, now: float) -> None:
        self.running.remove(req)
        req.finish = now
        self.kv.free(req, now, "finish")
        self.metrics.on_finish(req, now)
        if req.done is not None:  # the session's completion event
            req.done.succeed()
