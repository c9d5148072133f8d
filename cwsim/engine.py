"""The engine as a SimPy process: vLLM v1's busy loop of scheduler steps.

Each iteration schedules a step (``cwsim.scheduler``), charges its time from
the step-time profile and applies its result. A run of decode-only steps in
which nothing can arrive, be admitted, be preempted or finish is advanced in
one jump: the number of steps is the smallest of (a) steps until the first
request finishes, (b) steps whose block allocations the free blocks still
cover, (c) steps that start before the next scheduled event in the
simulation (an arrival). Block allocations inside the jump are made in the
exact (step, running order) order the step-by-step loop would make them, so
the free queue and the evictions come out the same. A jump is taken only
when no request waits, or when the scheduling policy's order is static
(FCFS), or when no waiting request could be admitted even alone: then none
can be admitted during the jump either (free blocks only shrink, and each hit
a request loses to eviction is a block more it needs), whatever order a
dynamic policy (longest prefix match) gives the queue as blocks are evicted.
See ``Scheduler.admission_blocked``.

A policy that holds waiting calls back (``Policy.admit``) stops admission at the held one;
when it holds every waiting call and nothing runs, the engine waits for the next submission
or the policy's ``next_deadline``, when its answer may change. A decode jump over a held
call is exact, since the contract lets the answer change only at those events.

With a CPU tier (``cwsim.cpu_tier``), its transfers' events are applied by
its ``tick`` before each step (before the eviction policy's), a jump does
not run steps that start at or after its ``next_deadline``, and a step that
swaps blocks in (or waits for a prefetch copy) takes that load time longer.

Sessions are closed-loop processes: a session submits call k+1 once call k
has finished and its gap has elapsed (and, with a profile's
``request_overhead_s``, the engine sees it that much later: an API server's
own latency; with its ``frontend_step_share`` too, that work and part of
every step share one core: ``cwsim.frontend``). Events at one instant are ordered as
the oracle orders them (``replay.oracle``): a step's finished calls are
handled first (the engine yields once so that their sessions submit what is
due now), then every call due by then joins the waiting queue in the trace's
session order (``Scheduler.add``), then the next step is scheduled.
"""

from __future__ import annotations

import heapq
import math

import simpy

from cwsim.frontend import SharedCore
from cwsim.hashing import BlockIds, PrefixMemo, block_hashes, own_block_ids
from cwsim.request import Request
from cwsim.scheduler import Scheduler, SimulationError
from cwsim.steptime import StepTimeProfile
from cwsim.workload import Arrivals, SessionState, Workload


class Engine:
    def __init__(self, env: simpy.Environment, scheduler: Scheduler, profile: StepTimeProfile, block_size: int, ctx,
                 decode_jumps: bool = True, *, step_jitter: float = 0.0, seed: int = 0):
        self.env = env
        self.scheduler = scheduler
        self.profile = profile
        self.block_size = block_size
        self.ctx = ctx  # cwsim.policy_adapter.SimEnvironment: its clock is kept current here
        self.decode_jumps = decode_jumps and not step_jitter  # (jitter draws every step's time)
        self._idle: simpy.Event | None = None
        self._next_rid = 0
        self.block_ids = BlockIds()  # requests carry dense block ids as their hashes
        #: drop a session's own block hashes from ``block_ids`` when it ends (no sequence holds them again; off
        #: when the run needs every id's hash afterwards, as its eviction log does)
        self.forget_private = True
        #: a single-call session's own blocks are cached unlisted (``BlockPool.cache_unlisted_blocks``):
        #: with ``forget_private``, and where nothing follows every cached hash (no CPU tier, no
        #: reference stream, a pool that evicts); the runner sets it
        self.unlist_own = False
        self.steps = 0
        self.jumps = 0
        #: ``on_step(start, end, steps, plan, running, waiting)``: each engine iteration that ran steps (a decode
        #: jump is one call for its ``steps``; ``plan`` its first step's; ``running`` / ``waiting`` the scheduler's
        #: counts once the step was scheduled), or None
        self.on_step = None
        #: timing noise (``SimConfig.step_jitter``): each step's time times exp(N(-s^2/2, s)), mean 1
        self._jitter = None
        if step_jitter > 0:
            import numpy as np

            rng = np.random.default_rng((seed, 0x5EED))  # its own stream: arrivals keep theirs
            self._jitter = lambda: math.exp(step_jitter * rng.standard_normal() - 0.5 * step_jitter ** 2)
        # the server's frontend core, shared by the requests' processing and part of every step (cwsim.frontend)
        # (nothing to share with unless requests bring work to it)
        self.frontend = SharedCore(env) if profile.frontend_step_share and profile.request_overhead_s else None
        if self.frontend is not None and scheduler.async_scheduling:
            raise ValueError("a profile's frontend_step_share is modelled for the synchronous engine only "
                             "(not with async scheduling)")

    # ------------------------------------------------------------- requests
    def submit(self, sess: SessionState, turn: int, sent: float | None = None) -> Request:
        """Call ``turn`` of ``sess`` joins the waiting queue now; ``sent``: when its session sent it
        (its arrival; default now)."""
        call = sess.calls[turn]
        if sess.memo is None:
            sess.memo = PrefixMemo()
        unlisted_from = None
        if self.forget_private and len(sess.calls) == 1:  # its own blocks: nobody will ask for them, no hashing
            hashes = own_block_ids(call.segs, self.block_size, call.private_from, self.block_ids,
                                   sess.own_ids if self.scheduler.kv.pool.growable else None)
            if self.unlist_own:  # nor a hash-map entry
                unlisted_from = call.private_from // self.block_size
        elif self.forget_private:
            hashes = block_hashes(call.segs, self.block_size, sess.memo, self.block_ids, sess.private_ids,
                                  call.private_from // self.block_size)
        else:
            hashes = block_hashes(call.segs, self.block_size, sess.memo, self.block_ids)
        req = Request(self._next_rid, sess, turn, call.prompt_len, call.output_len, hashes,
                      self.env.now if sent is None else sent)
        if unlisted_from is not None:
            req.unlisted_from = unlisted_from
        if sess.hint is not None and sess.memo.reused:
            blocks, gens = sess.hint
            k = min(sess.memo.reused, len(blocks))
            req.hint = (blocks[:k], gens[:k])
        self._next_rid += 1
        req.done = self.env.event()
        self.scheduler.add(req)
        if self._idle is not None and not self._idle.triggered:
            self._idle.succeed()
        return req

    # ----------------------------------------------------------------- loop
    def run(self):
        if self.scheduler.async_scheduling:
            yield from self._run_async()
            return
        env, sched, prof = self.env, self.scheduler, self.profile
        while True:
            if not sched.running and not sched.waiting:
                self._idle = env.event()
                yield self._idle
                self._idle = None
            now = env.now
            self.ctx.now = now
            if (tier := self.ctx.tier) is not None:
                tier.tick(now)  # background transfers that ended or start by now
            self.ctx.tick(now)  # the policy's time hook (a pin that expires) before scheduling
            plan = sched.schedule(now)
            if plan.empty:
                if plan.held and not sched.running:
                    # the policy holds every waiting call back and nothing runs: until a submission or the
                    # policy's next deadline, when its answer may change
                    deadline = self.ctx.next_deadline()
                    if deadline <= now:
                        raise SimulationError(f"policy {self.ctx.policy.name!r} holds its waiting calls back with "
                                              f"nothing running past its own deadline ({deadline} <= {now})")
                    yield from self._wait(deadline - now)
                elif (tier := self.ctx.tier) is not None and not plan.preempted and not sched.running and sched.waiting:
                    # nothing fits while CPU-tier copies hold blocks: until the next transfer event (or a submission)
                    yield from self._wait(tier.next_deadline() - now)
                continue  # (everything running was preempted: admit next iteration)
            if (self.decode_jumps and plan.decode_only and plan.lazy + len(plan.scheduled) == len(sched.running)
                    and sched.admission_blocked() and (self.frontend is None or not self.frontend.busy)):
                n = self._plan_jump(plan)
                if n > 1:
                    dt = prof.decode_run_time(n, plan.decode_seqs, plan.decode_ctx)
                    self.steps += n
                    self.jumps += 1
                    if self.on_step is not None:
                        self.on_step(now, now + dt, n, plan, len(sched.running), len(sched.waiting))
                    yield env.timeout(dt)
                    if self._finish_jump(n, env.now):
                        yield env.timeout(0)  # sessions submit what is due now before the next step
                    continue
            dt = prof.step_time(plan.prefill_tokens, plan.attn_pairs, plan.decode_seqs, plan.decode_ctx)
            if plan.swap_in_s or plan.load_wait_s:
                dt += plan.transfer_s  # synchronous loads from the CPU tier
            if self._jitter is not None:
                dt *= self._jitter()
            self.steps += 1
            if self.on_step is not None:  # (the counts as scheduled: calls may arrive during the step)
                counts = len(sched.running), len(sched.waiting)
            if self.frontend is None:
                yield env.timeout(dt)
            else:  # the step's first part on the shared core, then the rest
                share = prof.frontend_step_share
                yield self.frontend.run(dt * share)
                yield env.timeout(dt * (1.0 - share))
            if self.on_step is not None:
                self.on_step(now, env.now, 1, plan, *counts)
            self.ctx.now = env.now
            if sched.update(plan, env.now):
                # the finished calls' sessions submit what is due now (a next call after no gap, a next
                # session) before the next step is scheduled, as the oracle orders events at one instant
                yield env.timeout(0)

    def _wait(self, delay: float):
        """Until the next submission, or ``delay`` seconds (``inf``: no limit)."""
        self._idle = self.env.event()
        yield self._idle if math.isinf(delay) else self.env.any_of([self._idle, self.env.timeout(delay)])
        self._idle = None

    def _run_async(self):
        """vLLM's engine core with async scheduling: two steps in flight.

        Each iteration schedules a step (while the one before it may still run on the device) and
        sends it; the device runs steps one after another. When two are in flight, or nothing more
        can be scheduled, the iteration waits for the older one and applies its output. A step that
        schedules nothing takes no device time but a turn in the queue, as in vLLM's batch queue.
        """
        from collections import deque

        env, sched, prof = self.env, self.scheduler, self.profile
        queue: deque = deque()
        device_free = 0.0
        while True:
            has_requests = bool(sched.running or sched.waiting or sched.finished_pending)
            if not has_requests and not queue:
                self._idle = env.event()
                yield self._idle
                self._idle = None
                continue
            now = env.now
            self.ctx.now = now
            if has_requests:
                self.ctx.tick(now)
                plan = sched.schedule(now)
                samples = sched.dispatch(plan)
                start = max(now, device_free)
                if plan.scheduled:
                    self.steps += 1
                    dt = prof.step_time(plan.prefill_tokens, plan.attn_pairs, plan.decode_seqs, plan.decode_ctx)
                    device_free = start + (dt if self._jitter is None else dt * self._jitter())
                    if self.on_step is not None:  # (its time on the device)
                        self.on_step(start, device_free, 1, plan, len(sched.running), len(sched.waiting))
                queue.appendleft((plan, samples, device_free if plan.scheduled else start))
                if len(queue) < 2 and (plan.scheduled or sched.running or sched.waiting or sched.finished_pending):
                    continue
            plan, samples, end = queue.pop()
            if end > now:
                yield env.timeout(end - now)
            self.ctx.now = env.now
            if sched.apply_output(plan, samples, env.now):
                yield env.timeout(0)  # the finished calls' sessions submit what is due now

    def _plan_jump(self, plan) -> int:
        """How many decode-only steps, starting with ``plan``'s, can run as one."""
        sched = self.scheduler
        sched.absorb(plan)  # the whole batch decodes: all of it lazily
        n = sched.steps_to_first_finish()
        if n <= 1:
            return 1
        horizon = self.env.peek() - self.env.now
        horizon = min(horizon, self.ctx.next_deadline() - self.env.now)  # nor past the policy's next tick
        if (tier := self.ctx.tier) is not None:  # nor past a transfer's start or end
            horizon = min(horizon, tier.next_deadline() - self.env.now)
        n = self.profile.decode_steps_starting_before(plan.decode_seqs, plan.decode_ctx, horizon, n)
        if n <= 1:
            return 1
        return sched.steps_within_free_blocks(n)

    def _finish_jump(self, n: int, now: float) -> list:
        sched = self.scheduler
        finished = sched.finish_jump(n)
        self.ctx.now = now
        for r in finished:
            sched.finish(r, now)
        return finished


def session_process(env: simpy.Environment, engine: Engine, sess: SessionState, workload: Workload, metrics):
    """One agent session: call, wait for the answer, run the tools, call again.

    A call reaches the engine the profile's ``request_overhead_s`` after it is sent (its arrival), or,
    with a shared frontend core (``cwsim.frontend``), once that core has done that much work on it."""
    sess.start = env.now
    workload.active_sessions += 1
    last = len(sess.calls) - 1
    overhead = engine.profile.request_overhead_s
    frontend = engine.frontend
    for turn, call in enumerate(sess.calls):
        if overhead:
            sent = env.now
            yield env.timeout(overhead) if frontend is None else frontend.run(overhead)
            req = engine.submit(sess, turn, sent)
        else:
            req = engine.submit(sess, turn)
        yield req.done
        if turn < last and call.gap_s > 0:
            yield env.timeout(call.gap_s)
    sess.end = env.now
    sess.memo = None
    workload.active_sessions -= 1
    if engine.forget_private:
        pool = engine.scheduler.kv.pool
        if pool.growable:  # nothing evicts there: drop what nobody will ask for, or the pool grows with the trace
            pool.drop_unreachable([*sess.private_ids.values(), *sess.own_ids])
            sess.own_ids = []
        sess.private_ids = {}  # its own blocks' hashes: nobody will ask for them again
    workload.release(sess)
    metrics.on_session_end(sess)


def start_sessions(env: simpy.Environment, engine: Engine, workload: Workload, arrivals: Arrivals, seed: int, metrics):
    """Start every session according to ``arrivals``.

    With start times (``poisson``, ``trace``), the sessions due at 0 start at once and one launcher
    process starts the others when they are due, in (time, session order) order: a session's process
    exists only from its start, so memory and the event queue grow with the sessions running, not
    with the trace. Its wake-ups are scheduled at SimPy's URGENT priority, at exactly the start time
    (``_UrgentAt``): a session start comes before every other event of that instant, as when every
    session's start was a timeout scheduled at time 0."""
    starts = arrivals.start_times(workload, seed)
    if starts is not None:
        order = sorted(range(len(starts)), key=starts.__getitem__)  # stable: equal starts keep session order
        k = 0
        while k < len(order) and starts[order[k]] <= 0:
            env.process(_session(env, engine, order[k], workload, metrics))
            k += 1
        if k < len(order):
            env.process(_launcher(env, engine, ((starts[i], i) for i in order[k:]), workload, metrics))
        return
    queue = workload.states()

    def agent():
        for sess in queue:
            yield from session_process(env, engine, sess, workload, metrics)

    for _ in range(min(arrivals.agents, workload.num_sessions)):
        env.process(agent())


def _session(env, engine, i, workload, metrics):
    yield from session_process(env, engine, workload.session(i), workload, metrics)


def _launcher(env, engine, due, workload, metrics):
    """Start session ``i`` at ``t`` for each ``(t, i)`` of ``due`` (in time order)."""
    for t, i in due:
        if t > env.now:
            yield _UrgentAt(env, t)
        env.process(_session(env, engine, i, workload, metrics))


class _UrgentAt(simpy.events.Event):
    """An event at time ``at`` exactly, at SimPy's URGENT priority: processed before the NORMAL events
    of its instant. (``env.timeout(at - env.now)`` is NORMAL and can miss ``at`` by an ulp: ``now +
    (at - now) != at`` in floating point, and for some pairs no delay lands on ``at``.) It is what
    ``simpy.Environment.schedule`` does (simpy 4.1.2, pinned), with an absolute time."""

    def __init__(self, env: simpy.Environment, at: float):
        super().__init__(env)
        self._ok = True
        self._value = None
        heapq.heappush(env._queue, (at, simpy.events.URGENT, next(env._eid), self))
