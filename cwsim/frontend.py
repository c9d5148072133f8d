"""The server's frontend core, shared by the requests' own processing and part of every engine step.

On a machine with few cores (vLLM's CPU build on 2 cores binds its worker to one and leaves the
other to the API server, the engine core's loop and the clients) the frontend's work on a request
(its HTTP, its token ids parsed, its answer) and the engine's steps compete for a core:
``experiments/probe_frontend_contention.py`` measured decode steps 1.4-2.2x as long while prompts
arrived. The additive model charges a request's overhead as a plain delay outside the steps and
cannot show it.

The model, in two profile terms: every request brings ``request_overhead_s`` of work to the shared
core (the engine sees the request when it is done), and the first ``frontend_step_share`` of every
step's time is work on that core too (the engine core's scheduling and input and output processing;
the rest, the forward pass, runs elsewhere). The core is processor-shared: with ``n`` pieces of work
on it, each progresses at ``1 / n`` of its speed alone. With ``frontend_step_share`` 0 (every
bundled profile), or without a ``request_overhead_s`` to share it with, there is no shared core:
a request's overhead is a plain delay and a step one timeout, as before.

Invariant: ``_jobs`` maps each piece of work on the core to its remaining work (seconds alone),
as of ``_t``; the earliest to finish (ties: the first added) has a timer that ends it, and any
other timer is stale (its generation is not ``_gen``).
"""

from __future__ import annotations

import simpy

__all__ = ["SharedCore"]


class SharedCore:
    def __init__(self, env: simpy.Environment):
        self.env = env
        self._jobs: dict[simpy.Event, float] = {}  # insertion order: the tie-break
        self._t = env.now
        self._gen = 0

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def run(self, work_s: float) -> simpy.Event:
        """Put ``work_s`` (its time alone on the core) on the core now; the event fires when it is done."""
        done = self.env.event()
        if work_s <= 0:
            done.succeed()
            return done
        self._advance()
        self._jobs[done] = work_s
        self._arm()
        return done

    def _advance(self) -> None:
        """Bring every remaining work to now (each progressed 1/n of the time since ``_t``)."""
        now = self.env.now
        if self._jobs and now > self._t:
            step = (now - self._t) / len(self._jobs)
            for job in self._jobs:
                self._jobs[job] -= step
        self._t = now

    def _arm(self) -> None:
        self._gen += 1
        if not self._jobs:
            return
        job, left = min(self._jobs.items(), key=lambda kv: kv[1])
        gen = self._gen
        timer = self.env.timeout(max(0.0, left) * len(self._jobs))
        timer.callbacks.append(lambda _e: self._finish(gen, job))

    def _finish(self, gen: int, job: simpy.Event) -> None:
        if gen != self._gen:
            return  # stale: the work on the core changed since this timer was set
        self._advance()
        del self._jobs[job]
        self._arm()
        job.succeed()
