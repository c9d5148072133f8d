"""vLLM's engine core with the model's outputs emulated: its own scheduler, KV cache
manager and batch queue, no forward pass.

The oracle (``replay.oracle``) normally runs the real engine: the tiny model
computes every step. Scheduling does not depend on what the model computes,
only on how many tokens each step schedules and which requests sample one, so
the same engine core can run with an **emulated executor** in place of the
model executor (the one boundary replaced; the scheduler, the KV cache
manager, the block pool and the engine core's step loop are vLLM's own):

- ``execute_model`` records the step's batch; ``sample_tokens`` returns a
  ``ModelRunnerOutput`` with one token for every request the step completes
  (not a partial prefill chunk), drawn deterministically per request and
  position (:func:`replay.tokens.segment_tokens`);
- the executor keeps the device's timeline in engine steps: a batch that
  schedules tokens runs for one unit, starting when it is dispatched or when
  the batch before it ends, whichever is later; its output is there at its end.

This is how **async scheduling** is run on a machine whose platform forces it
off: with ``async_scheduling=True`` the scheduler is vLLM's ``AsyncScheduler``
and the engine core steps with its batch queue (two batches in flight:
``EngineCore.step_with_batch_queue``), exactly the code a GPU engine runs. In
sync mode the emulated engine must equal the real one step for step (a test
checks it), which is what validates the emulation.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


class _Ready:
    """A finished future (vLLM's executor futures' surface) that tells the executor when it is read."""

    def __init__(self, value, on_read=None):
        self._value = value
        self._on_read = on_read

    def result(self, timeout=None):
        if self._on_read is not None:
            self._on_read()
        return self._value

    def done(self) -> bool:
        return True


@dataclass
class _Batch:
    output: object
    end: float
    executed: bool


class EmulatedExecutor:
    """Stands where vLLM's model executor stands; answers each batch with emulated sampled tokens."""

    def __init__(self, core, vocab_size: int):
        self.core = core
        self.vocab_size = vocab_size
        self.now = 0.0  # the oracle's clock, set before each engine step
        self.gpu_free = 0.0
        self.read_end: float | None = None  # end of the last batch whose output the core read
        self.executed = 0  # batches dispatched that scheduled tokens
        self._pending: _Batch | None = None
        self._sampled: dict[str, int] = {}

    def _token(self, request_id: str) -> int:
        from replay.tokens import segment_tokens

        k = self._sampled.get(request_id, 0)
        self._sampled[request_id] = k + 1
        return segment_tokens(f"\0generated:{request_id.rsplit('-', 1)[0]}", 1, self.vocab_size, start=k)[0]

    def execute_model(self, scheduler_output, non_block: bool = False):
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        n = scheduler_output.total_num_scheduled_tokens
        start = max(self.now, self.gpu_free)
        end = start + 1.0 if n > 0 else start
        self.gpu_free = end
        if n == 0:
            batch = _Batch(EMPTY_MODEL_RUNNER_OUTPUT, end, False)
            return _Ready(batch.output, lambda b=batch: self._read(b)) if non_block else batch.output
        self.executed += 1
        reqs = self.core.scheduler.requests
        ids = list(scheduler_output.num_scheduled_tokens)
        # a request samples a token unless this step leaves it inside its prefill (decided now, at dispatch)
        sampled = [[] if reqs[r].is_prefill_chunk else [self._token(r)] for r in ids]
        out = ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                sampled_token_ids=sampled)
        self._pending = _Batch(out, end, True)
        return _Ready(None) if non_block else None

    def sample_tokens(self, grammar_output, non_block: bool = False):
        batch, self._pending = self._pending, None
        if non_block:
            return _Ready(batch.output, lambda b=batch: self._read(b))
        self._read(batch)
        return batch.output

    def _read(self, batch: _Batch) -> None:
        self.read_end = batch.end

    def take_draft_token_ids(self):
        return None

    def shutdown(self) -> None:
        pass

    def __getattr__(self, name):
        raise AttributeError(f"the emulated executor has no {name!r} (vLLM called a part it does not emulate)")


def install(core, vocab_size: int, async_scheduling: bool) -> EmulatedExecutor:
    """Give ``core`` (a real ``EngineCore``) a fresh scheduler of vLLM's (``AsyncScheduler`` when
    ``async_scheduling``) and the emulated executor; with async scheduling, the batch queue
    of two batches in flight and vLLM's ``step_with_batch_queue``."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    old = core.scheduler
    cls = AsyncScheduler if async_scheduling else Scheduler
    if hasattr(old, "cw"):  # the policy plugin's scheduler: its variant of the same kind
        from replay.vllm_plugin.scheduler import AsyncPolicyScheduler, SyncPolicyScheduler

        cls = AsyncPolicyScheduler if async_scheduling else SyncPolicyScheduler
    core.scheduler = cls(vllm_config=core.vllm_config, kv_cache_config=old.kv_cache_config,
                         structured_output_manager=core.structured_output_manager, block_size=old.block_size,
                         include_finished_set=False, log_stats=old.log_stats)
    real_executor = core.model_executor
    executor = EmulatedExecutor(core, vocab_size)
    executor.supported_tasks = real_executor.supported_tasks
    core.model_executor = executor
    try:
        real_executor.shutdown()
    except Exception:  # noqa: BLE001 - the real model is no longer used
        pass
    if async_scheduling:
        core.batch_queue_size = 2
        core.batch_queue = deque(maxlen=2)
        core.step_fn = core.step_with_batch_queue
    else:
        core.batch_queue = None
        core.step_fn = core.step
    return executor
