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

import bisect
import heapq
from dataclasses import dataclass, field
from operator import attrgetter

import numpy as np

from cwsim.kv_cache_manager import KVCacheManager
from cwsim.request import Request
from cwsim.steptime import prefill_attn_pairs


_seq = attrgetter("seq")


class SimulationError(RuntimeError):
    """The simulated engine cannot make progress (e.g. a prompt larger than the pool)."""


@dataclass(slots=True)
class StepPlan:
    """One step's batch. ``lazy``: the first ``lazy`` running requests (the lazy
    decode batch) each decode one token; ``scheduled``: every other request's
    ``(request, tokens)``, in running order, then the admitted ones."""

    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    lazy: int = 0
    preempted: list[Request] = field(default_factory=list)
    admitted: int = 0
    prefill_tokens: int = 0
    attn_pairs: float = 0.0
    decode_seqs: int = 0
    decode_ctx: int = 0
    #: CPU tier loads this step waits for: synchronous swap-ins (summed) and prefetch copies (the latest end)
    swap_in_s: float = 0.0
    load_wait_s: float = 0.0
    #: admission stopped at a request the policy holds back (``Policy.admit``)
    held: bool = False

    @property
    def transfer_s(self) -> float:
        return self.load_wait_s + self.swap_in_s

    @property
    def empty(self) -> bool:
        return not self.scheduled and not self.lazy

    @property
    def decode_only(self) -> bool:
        return self.prefill_tokens == 0 and not self.preempted and self.admitted == 0


class Scheduler:
    """vLLM v1's scheduler step, with the running batch's decoders kept lazily.

    Most running requests are *decoders* (one new token per step, ``num_computed
    == num_tokens - 1``); visiting each of them every step would make a step cost
    O(batch). Instead they form the *lazy decode batch*, stated as one invariant:

        ``step`` counts the steps applied so far. A lazy request ``r`` has
        ``num_computed == step + r.c_off`` (and ``num_generated == num_computed
        - prompt_len + 1``), its block table and cached-block count are exact,
        it is in ``_buckets[r.c_off % block_size]`` (each bucket ordered by
        admission ``seq``, which is running order) and in ``_fin[F]`` for the
        step count ``F`` at which it will have generated ``output_len`` tokens.
        ``_n_lazy`` and ``_sum_off`` are the batch's size and sum of ``c_off``.

    So at a step starting at ``step = S``, the requests that need a new block are
    exactly ``_buckets[-S % block_size]``, those whose token fills a block are
    ``_buckets[(block_size - 1 - S) % block_size]``, the batch's decode context
    is ``_n_lazy * S + _sum_off``, and the requests that finish are ``_fin[S +
    1]``: a decode step costs O(1) plus the requests that allocate, fill or
    finish, and a run of decode steps (``steps_to_first_finish``,
    ``steps_within_free_blocks``, ``finish_jump``) the same.
    A request joins the batch when a step leaves it decoding, and leaves it
    (counters written back) when it finishes or is preempted; any step the
    shortcut does not cover exactly (a decoder that cannot get its block, a
    non-lazy request before a lazy one) first writes back the whole batch and
    runs request by request.
    """

    def __init__(self, kv: KVCacheManager, policy, metrics, *, max_num_seqs: int, max_num_batched_tokens: int,
                 cpu_tier=None, lazy_decode: bool = True, reserve_full_isl: bool = True, watermark: float = 0.0,
                 long_prefill_token_threshold: int = 0, async_scheduling: bool = False):
        self.kv = kv
        #: vLLM's AsyncScheduler: a step is scheduled while the one before it is in flight
        #: (``dispatch`` / ``apply_output`` instead of ``update``; request by request, no lazy batch)
        self.async_scheduling = async_scheduling
        if async_scheduling:
            lazy_decode = False
            if cpu_tier is not None:
                raise ValueError("async scheduling is not modelled with a CPU KV tier")
        #: steps dispatched whose output has not been applied (async scheduling)
        self.inflight = 0
        #: a request finished since the last schedule (vLLM's has_finished_requests)
        self.finished_pending = False
        #: vLLM's scheduler_reserve_full_isl: admit only when the whole sequence fits (prefix hits counted)
        self.reserve_full_isl = reserve_full_isl
        #: vLLM's watermark in blocks (int(watermark * pool blocks)), kept free when admitting while something runs
        self.watermark_blocks = int(watermark * kv.pool.num_blocks)
        #: vLLM's long_prefill_token_threshold: chunk cap when more than one request is eligible (0: none)
        self.long_prefill_token_threshold = long_prefill_token_threshold
        #: False: every request is scheduled request by request (the reference the lazy batch is tested against)
        self.lazy_decode = lazy_decode
        self.cpu_tier = cpu_tier  # cwsim.cpu_tier.CpuTier or None
        #: the policy's decisions (``cwsim.policy_adapter.SimEnvironment``): ``static``, ``max_queue``,
        #: ``priority_key(req)``, ``preemption_victim(running)``, ``on_arrival(req)``, ``on_finish(req, now)``
        self.policy = policy
        self.metrics = metrics
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.step = 0
        self._admissions = 0
        self._buckets: list[list[Request]] = [[] for _ in range(kv.block_size)]
        self._fin: dict[int, list[Request]] = {}
        self._fin_heap: list[int] = []
        self._n_lazy = 0
        self._sum_off = 0
        #: the policy decides nothing of its own: it sees no arrivals (no views)
        self._passive = getattr(policy, "passive", False)
        #: requests added that the policy has not seen arrive yet
        self._arrivals = 0

    def add(self, req: Request) -> None:
        """Queue a new request. Requests that arrive at the same instant queue in the
        trace's session order, whatever order their sessions submitted them in; the policy
        sees them arrive in that order too (``note_arrivals``, at the next step: vLLM numbers its
        requests in the order they are added, and the oracle adds them in queue order)."""
        if not self._passive:
            self._arrivals += 1
        waiting = self.waiting
        i = len(waiting)
        if i and req.session is not None:
            k = req.session.index
            while i and (w := waiting[i - 1]).arrival == req.arrival and not w.preemptions \
                    and w.session is not None and w.session.index > k:
                i -= 1
        waiting.insert(i, req)

    # ------------------------------------------------------ lazy decode batch
    def _join(self, req: Request) -> None:
        """``req`` decodes from now on (its counters are current): add it to the lazy batch."""
        if not self.lazy_decode:
            return
        c_off = req.num_computed - self.step
        req.c_off = c_off
        req.lazy = True
        bucket = self._buckets[c_off % self.kv.block_size]
        if not bucket or bucket[-1].seq < req.seq:
            bucket.append(req)
        else:
            bisect.insort(bucket, req, key=_seq)
        f = req.output_len - req.num_generated + self.step
        fin = self._fin.get(f)
        if fin is None:
            self._fin[f] = [req]
            heapq.heappush(self._fin_heap, f)
        else:
            fin.append(req)
        self._n_lazy += 1
        self._sum_off += c_off

    def counters(self, req: Request) -> tuple[int, int]:
        """``(num_computed, num_generated)`` of a request, current also while it is lazy."""
        if req.lazy:
            c = self.step + req.c_off
            return c, c - req.prompt_len + 1
        return req.num_computed, req.num_generated

    def check_invariants(self) -> None:
        """The lazy batch's invariant (class docstring), checked in O(batch): for tests."""
        bs = self.kv.block_size
        lazy = [r for r in self.running if r.lazy]
        assert self._n_lazy == len(lazy) == sum(map(len, self._buckets)), "lazy count drifted"
        assert self._sum_off == sum(r.c_off for r in lazy), "sum of offsets drifted"
        for phase, bucket in enumerate(self._buckets):
            assert all(r.lazy and r.c_off % bs == phase for r in bucket), "request in the wrong bucket"
            assert [r.seq for r in bucket] == sorted(r.seq for r in bucket), "bucket out of running order"
        assert [r.seq for r in self.running] == sorted(r.seq for r in self.running), "running order is not admission order"
        in_fin = {id(r): f for f, rs in self._fin.items() for r in rs}
        assert len(in_fin) == len(lazy), "finish index drifted"
        for r in lazy:
            c, g = self.counters(r)
            assert c == self.step + r.c_off and 1 <= g < r.output_len, "lazy request is not decoding"
            assert in_fin[id(r)] == self.step + r.output_len - g, "finish step drifted"
            assert len(r.blocks) == -(-c // bs) and r.num_cached_blocks == c // bs, "block table out of date"
        assert all(f in self._fin_heap for f in self._fin), "finish heap lost a step"

    def _write_back(self, req: Request) -> None:
        c = self.step + req.c_off
        req.num_computed = c
        req.num_generated = c - req.prompt_len + 1
        req.lazy = False

    def _drop(self, req: Request) -> None:
        """Take ``req`` out of the buckets and counts, its counters written back (not out of ``_fin``)."""
        self._write_back(req)
        self._buckets[req.c_off % self.kv.block_size].remove(req)
        self._n_lazy -= 1
        self._sum_off -= req.c_off

    def _leave(self, req: Request) -> None:
        """Take ``req`` out of the lazy batch before it finishes (a preemption)."""
        self._drop(req)
        f = req.output_len - req.num_generated + self.step
        fin = self._fin[f]
        fin.remove(req)
        if not fin:
            del self._fin[f]

    def _write_back_all(self) -> None:
        for bucket in self._buckets:
            for r in bucket:
                self._write_back(r)
            bucket.clear()
        self._fin.clear()
        self._fin_heap.clear()
        self._n_lazy = self._sum_off = 0

    def _lazy_prefix(self) -> bool:
        """True when the lazy requests are exactly the first ``_n_lazy`` running ones."""
        for r in self.running[self._n_lazy:]:
            if r.lazy:
                return False
        return True

    def _preempt(self, victim: Request, now: float) -> None:
        if victim.lazy:
            self._leave(victim)
        self.kv.free(victim, now, "preempt")
        victim.num_computed = 0
        victim.preemptions += 1
        if victim.in_flight:  # async: what is in flight for it arrives stale
            victim.stale = victim.in_flight
            victim.placeholders = 0
        self.waiting.insert(0, victim)

    def note_arrivals(self) -> None:
        """The policy sees the requests added since the last step arrive, in queue order. They are
        among the queue's last requests (``add`` puts a request behind every other but those that
        arrived at the same instant): the scan from the tail stops once it has found them all."""
        new, left = [], self._arrivals
        self._arrivals = 0
        for req in reversed(self.waiting):
            if req.view is None:
                new.append(req)
                left -= 1
                if not left:
                    break
        on_arrival = self.policy.on_arrival
        for req in reversed(new):
            on_arrival(req)

    def schedule(self, now: float) -> StepPlan:
        if self._arrivals:
            self.note_arrivals()
        plan = StepPlan()
        kv, running = self.kv, self.running
        budget = self.max_num_batched_tokens
        scheduled = plan.scheduled
        bs = kv.block_size
        thr = self.long_prefill_token_threshold
        if thr and len(running) + len(self.waiting) <= 1:
            thr = 0  # nobody to starve: the one request may use the whole budget (as vLLM)
        i = 0
        if self._n_lazy:
            if self._n_lazy <= budget and self._lazy_prefix() and self._decode_lazy():
                i = plan.lazy = self._n_lazy
                budget -= i
            else:  # the shortcut does not cover this step exactly: request by request
                self._write_back_all()
        asyn = self.async_scheduling
        while i < len(running) and budget > 0:
            req = running[i]
            computed = req.num_computed
            n_new = req.prompt_len + req.num_generated - computed
            if asyn:
                p = req.placeholders
                if p and computed + 2 - p >= req.prompt_len + req.output_len:
                    i += 1  # its last token is in flight: nothing more to schedule
                    continue
                n_new += p
            elif n_new == 1 and req.num_generated and (
                    computed % bs or (len(req.blocks) * bs == computed and (kv.pool.num_free or kv.pool.growable))):
                # one decode token, what allocate_slots would do without its checks: inside the
                # last block nothing is allocated; at a block boundary the one new block is free
                # (no free block: the general path below, which may preempt)
                if computed % bs == 0:
                    req.append_blocks(kv.pool.get_new_blocks(1))
                if (computed + 1) % bs == 0:
                    kv.cache_blocks(req, computed + 1)
                scheduled.append((req, 1))
                budget -= 1
                i += 1
                continue
            if 0 < thr < n_new:
                n_new = thr
            if n_new > budget:
                n_new = budget
            while kv.allocate_slots(req, n_new) is None:
                victim = self.policy.preemption_victim(running)
                vi = running.index(victim)
                running.pop(vi)
                if victim.lazy:  # scheduled by the lazy shortcut: undo its token
                    plan.lazy -= 1
                    budget += 1
                else:
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
        if not plan.preempted and self.waiting:
            self._admit(plan, budget, now, thr)
        # account the batch: the lazy decoders at once, the rest request by request
        decode_seqs = self._n_lazy if plan.lazy else 0
        decode_ctx = decode_seqs * self.step + self._sum_off if plan.lazy else 0
        prefill_tokens = 0
        attn_pairs = 0.0
        for req, n in scheduled:
            computed, gen = req.num_computed, req.num_generated
            if gen == 0 or computed < req.prompt_len + gen - 1:  # still in prefill
                prefill_tokens += n
                attn_pairs += prefill_attn_pairs(n, computed)
            else:
                decode_seqs += 1
                decode_ctx += computed
        plan.prefill_tokens, plan.attn_pairs = prefill_tokens, attn_pairs
        plan.decode_seqs, plan.decode_ctx = decode_seqs, decode_ctx
        if not scheduled and not running and self.waiting and not plan.preempted and not self.inflight \
                and not plan.held and not (  # held: the engine waits for a submission or the policy's deadline
                self.cpu_tier is not None and self.cpu_tier.holds_blocks()):  # else: wait for the copies
            req = self.waiting[0]
            need = -(-req.num_tokens // kv.block_size)
            raise SimulationError(
                f"request of session {req.session.session_id!r} turn {req.turn} needs {need} blocks "
                f"({req.num_tokens} tokens) but the pool has {kv.pool.num_usable_blocks} usable blocks: "
                "raise --kv-blocks / --kv-gib"
            )
        return plan

    def _decode_lazy(self) -> bool:
        """Schedule one decode token for every lazy request in one go.

        Applies only when the blocks they need are free (so nothing is
        preempted): then popping them together hands out exactly the blocks the
        request-by-request loop would, in running order. Returns False when it
        does not apply (nothing changed).
        """
        bs, pool, step = self.kv.block_size, self.kv.pool, self.step
        need = self._buckets[-step % bs]
        if need:
            if len(need) > pool.num_free:
                return False
            self.kv.hand_out(need, pool.get_new_blocks(len(need)))
        fill = self._buckets[(bs - 1 - step) % bs]
        if fill:
            self.kv.cache_next_blocks(fill)  # (step + c_off + 1 tokens: one block more each)
        return True

    # ------------------------------------------------------------ decode jumps
    def absorb(self, plan: StepPlan) -> None:
        """Move a decode-only plan's request-by-request decoders into the lazy batch."""
        for req, _ in plan.scheduled:
            self._join(req)
        plan.lazy += len(plan.scheduled)
        plan.scheduled.clear()

    def steps_to_first_finish(self) -> int:
        """Decode steps, the current one included, until the first lazy request finishes."""
        heap, fin = self._fin_heap, self._fin
        while heap[0] not in fin:
            heapq.heappop(heap)
        return heap[0] - self.step

    def steps_within_free_blocks(self, n: int) -> int:
        """The most steps ``m <= n`` (the current one first) whose allocations the free blocks cover.

        The steps after the current one allocate a block for each request of the bucket due then,
        every bucket once a cycle of ``block_size`` steps: with ``m - 1 = q * block_size + r``
        (``0 <= r < block_size``), ``q * _n_lazy + P[r]`` blocks, ``P[r]`` the requests of the ``r``
        buckets due first. So the answer is in closed form."""
        free, bs, n_lazy = self.kv.pool.num_free, self.kv.block_size, self._n_lazy
        q, r = divmod(n - 1, bs)
        if (q + (r > 0)) * n_lazy <= free:  # (P[r] <= _n_lazy: the bound is covered, so are the n steps)
            return n
        step, buckets = self.step, self._buckets
        due = [0]  # P[0..bs-1]
        for j in range(bs - 1):
            due.append(due[-1] + len(buckets[-(step + 1 + j) % bs]))
        if q * n_lazy + due[r] <= free:
            return n
        q = free // n_lazy  # (the lazy batch is not empty: else every m is covered)
        r = bisect.bisect_right(due, free - q * n_lazy) - 1  # (free - q * n_lazy < n_lazy = P[bs])
        return q * bs + r + 1

    def _in_step_order(self, n: int, phase: int) -> list[Request]:
        """The requests of bucket ``(phase - t) % block_size`` for the steps ``t`` after the current one
        of ``n`` (a request once a step it is in), step by step: a cycle of ``block_size`` steps,
        repeated, then the rest. ``phase`` 0: those that need a new block; ``block_size - 1``: those whose
        token fills one."""
        bs, step, buckets = self.kv.block_size, self.step, self._buckets
        out: list[Request] = []
        for t in range(step + 1, step + 1 + min(n - 1, bs)):
            out += buckets[(phase - t) % bs]
        q, r = divmod(n - 1, bs)
        if q:
            out *= q
            for t in range(step + 1, step + 1 + r):
                out += buckets[(phase - t) % bs]
        return out

    def finish_jump(self, n: int) -> list[Request]:
        """Apply ``n`` decode steps of the whole (lazy) batch, the planned current one first.

        Blocks are allocated, and the blocks the steps fill are cached, in
        (step, running order), as ``n`` single steps would.
        """
        step, kv = self.step, self.kv
        if n > 1:
            order = self._in_step_order(n, 0)
            if order:
                kv.hand_out(order, kv.pool.get_new_blocks(len(order)))
            # blocks filled by steps 1..n-1 (step 0's were cached when it was scheduled), one by one
            filled = self._in_step_order(n, kv.block_size - 1)
            if filled:
                kv.cache_next_blocks(filled)
        self.step = step + n
        return self._finish_lazy()

    def _finish_lazy(self) -> list[Request]:
        """The lazy requests that have generated their last token at the current step count."""
        heap = self._fin_heap
        while heap and heap[0] <= self.step:
            heapq.heappop(heap)
        fin = self._fin.pop(self.step, None)
        if fin is None:
            return []
        if len(fin) > 1:
            fin.sort(key=_seq)
        for req in fin:
            self._drop(req)
        return fin

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
        thr = self.long_prefill_token_threshold
        gates = self.policy.gates
        for req in self.waiting:
            if gates and not self.policy.admit(req):  # held back, and so until an event or a deadline
                continue
            hits = kv.longest_prefix(req)
            hit_tokens = len(hits) * bs
            chunk = min(req.num_tokens - hit_tokens, budget)
            if 0 < thr < chunk:
                chunk = thr
            tokens = req.num_tokens if self.reserve_full_isl else hit_tokens + chunk  # the full check needs more
            need = -(-tokens // bs) - len(hits) + int(np.count_nonzero(pool.ref[hits] == 0)) + self.watermark_blocks
            if need <= pool.num_free:
                return False
        return True

    def _admit(self, plan: StepPlan, budget: int, now: float, thr: int = 0) -> None:
        kv, policy, waiting, tier = self.kv, self.policy, self.waiting, self.cpu_tier
        bs = kv.block_size
        full, wm = self.reserve_full_isl, self.watermark_blocks
        if policy.static or (policy.max_queue is not None and len(waiting) > policy.max_queue):
            order = waiting
        else:
            order = sorted(waiting, key=policy.priority_key)  # stable: ties keep queue order
        admitted: list[Request] = []
        skipped = False
        gates = policy.gates
        for req in order:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if gates and not policy.admit(req):  # the policy holds it back: admission stops, as for blocks
                plan.held = True
                break
            if req.stale:  # async: its stale output is still in flight (vLLM skips it this step; with two
                # steps in flight it has always arrived by the next schedule, so this does not arise)
                skipped = True
                continue
            hits, hit_tokens = kv.get_computed_blocks(req)
            reserve = wm if self.running else 0  # vLLM: the watermark only while something is scheduled
            if tier is None:
                n_new = req.num_tokens - hit_tokens
                if 0 < thr < n_new:
                    n_new = thr
                if n_new > budget:
                    n_new = budget
                if kv.allocate_slots(req, n_new, hits, reserve, full) is None:
                    break
                req.num_computed = hit_tokens
                self.metrics.on_admit(req, hit_tokens, now)
            else:  # the prefix continues in the CPU tier: swap those blocks in
                n_hit = len(hits)
                n_swap = tier.continuation(req.hashes, n_hit, (req.num_tokens - 1) // bs)
                swap_tokens = n_swap * bs
                n_new = req.num_tokens - hit_tokens - swap_tokens
                if 0 < thr < n_new:
                    n_new = thr
                if n_new > budget:
                    n_new = budget
                if kv.allocate_slots(req, swap_tokens + n_new, hits, reserve, full) is None:
                    break
                req.num_computed = hit_tokens + swap_tokens
                if n_swap:
                    plan.swap_in_s += tier.swap_in(req.hashes[n_hit : n_hit + n_swap])
                plan.load_wait_s = max(plan.load_wait_s, tier.load_wait(hits, now))
                self.metrics.on_admit(req, hit_tokens, now, swap_tokens)
            self._admissions += 1
            req.seq = self._admissions
            self.running.append(req)
            plan.scheduled.append((req, n_new))
            budget -= n_new
            admitted.append(req)
        if admitted:
            plan.admitted = len(admitted)
            if order is waiting and not skipped:
                del waiting[: len(admitted)]
            else:
                ids = {id(r) for r in admitted}
                waiting[:] = [r for r in waiting if id(r) not in ids]

    def update(self, plan: StepPlan, now: float) -> list[Request]:
        """Apply a finished step: computed tokens, new tokens, finished requests.

        Lazy decoders advance with the step counter; a request this step leaves
        decoding joins the lazy batch. Finished requests are freed in running
        order (the lazy ones come first).
        """
        self.step += 1
        finished = self._finish_lazy() if self._n_lazy else []
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
                else:
                    self._join(req)
        for req in finished:
            self.finish(req, now)
        return finished

    # ------------------------------------------------------- async scheduling
    def dispatch(self, plan: StepPlan) -> list[bool]:
        """Async scheduling: the step is sent; its tokens count as computed at once, and each
        request it completes (not left inside its prefill) gets a placeholder for the token it
        will sample. Returns, per scheduled request, whether it samples."""
        self.finished_pending = False
        samples = []
        for req, n in plan.scheduled:
            c = req.num_computed + n
            req.num_computed = c
            req.in_flight += n
            s = c >= req.prompt_len + req.num_generated + req.placeholders
            if s:
                req.placeholders += 1
            samples.append(s)
        if plan.scheduled:
            self.inflight += 1
        return samples

    def apply_output(self, plan: StepPlan, samples: list[bool], now: float) -> list[Request]:
        """Async scheduling: a dispatched step's output arrives: sampled tokens are appended, the
        blocks they fill cached, finished requests freed. A preempted request's stale output is
        appended but changes no counter and caches nothing."""
        if plan.scheduled:
            self.inflight -= 1
        finished = []
        for (req, n), s in zip(plan.scheduled, samples):
            req.in_flight -= n
            stale = req.stale > 0
            if stale:
                req.stale -= n
            if req.finish >= 0 or not s:
                continue
            req.num_generated += 1
            if req.first_token < 0:
                req.first_token = now
            if not stale:
                req.placeholders -= 1
                self.kv.cache_blocks(req, req.num_computed - req.placeholders)
            if req.num_generated >= req.output_len:
                finished.append(req)
        for req in finished:
            self.finish(req, now)
        if finished:
            self.finished_pending = True
        return finished

    def finish(self, req: Request, now: float) -> None:
        if self.async_scheduling and req not in self.running:  # a stale token finished a preempted request
            self.waiting.remove(req)
            req.finish = now
            self.policy.on_finish(req, now)
            self.metrics.on_finish(req, now)
            if req.done is not None:
                req.done.succeed()
            return
        self.running.remove(req)
        req.finish = now
        self.kv.free(req, now, "finish")
        self.policy.on_finish(req, now)
        self.metrics.on_finish(req, now)
        if req.done is not None:  # the session's completion event
            req.done.succeed()
