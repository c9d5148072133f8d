"""Simulation configuration: one dataclass, whose fields are the CLI's flags."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass


class ConfigError(ValueError):
    """A bad configuration value. ``field`` is the :class:`SimConfig` field, ``problem`` what is
    wrong with it; the message names the CLI flags (``--kv-blocks must be >= 2, got 1``), which
    are the fields with dashes."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{flag(field)} {_with_flags(problem)}")

    def __reduce__(self):
        return (type(self), (self.field, self.problem))


def flag(field: str) -> str:
    """The CLI flag of a configuration field: ``kv_blocks`` -> ``--kv-blocks``."""
    return "--" + field.replace("_", "-")


def _with_flags(text: str) -> str:
    """``together with kv_blocks`` -> ``together with --kv-blocks``, for every field named."""
    names = "|".join(sorted(SimConfig.__dataclass_fields__, key=len, reverse=True))
    return re.sub(rf"(?<![-\w])({names})\b", lambda m: flag(m.group(1)), text)


@dataclass(frozen=True, slots=True)
class SimConfig:
    policy: str = "vllm"
    #: KV pool size in blocks, null block included (vLLM's --num-gpu-blocks-override);
    #: None: from kv_gib, else from the profile's GPU memory
    kv_blocks: int | None = None
    kv_gib: float | None = None
    block_size: int = 16
    profile: str = "llama-3.1-8b-h100"
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    #: vLLM's scheduler switches, under vLLM's names and with vLLM 0.32's defaults:
    #: admit a waiting request only when its whole sequence fits in the free blocks (prefix hits counted)
    scheduler_reserve_full_isl: bool = True
    #: share of the pool's blocks kept free when admitting (while something runs)
    watermark: float = 0.0
    #: cap on one request's prefill chunk in a step when more than one request is eligible (0: none)
    long_prefill_token_threshold: int = 0
    #: vLLM's async scheduling (AsyncScheduler + two steps in flight); off: the plain scheduler, as vLLM on
    #: CPUs and with --no-async-scheduling (vLLM 0.32 turns it on by default on GPUs)
    async_scheduling: bool = False
    gpu_memory_utilization: float = 0.9
    arrivals: str = "concurrent"
    agents: int = 16
    rate: float = 0.1
    seed: int = 0
    #: advance runs of decode-only steps in one jump (False: step by step, to validate the jump)
    decode_jumps: bool = True
    #: timing noise: every engine step's time times a lognormal factor of mean 1 whose log has this
    #: standard deviation, drawn from ``seed`` (0: none). A run under pressure can turn on when a call
    #: arrives; an ensemble over seeds shows how far a result moves with the noise a real engine has.
    #: Steps are then taken one by one (no decode jumps)
    step_jitter: float = 0.0
    #: trace the tool-call predictor learns from (None: the simulated trace itself)
    predictor_trace: str | None = None
    #: injected prediction error: idle predictions are multiplied by exp(N(0, this))
    predictor_error: float = 0.0
    #: prefix-aware scheduling: a request waiting longer than this goes first
    aging_s: float = 30.0
    #: every gap between a call's answer and the session's next call (tools, client) times this: a
    #: workload regime (tools 10x / 100x slower), seen by the run and the tool-call predictor alike
    gap_scale: float = 1.0
    #: stop after this many sessions (the first ones in trace order); None: all
    max_sessions: int | None = None
    #: CPU KV tier size in blocks (cwsim.cpu_tier); 0: no tier; None: from cpu_kv_gib, else the
    #: policy's default (0 for every policy but tokencake, which gets a tier the size of the GPU pool)
    cpu_kv_blocks: int | None = None
    cpu_kv_gib: float | None = None
    #: effective PCIe bandwidth per direction between GPU and CPU tier, GB/s (10^9 bytes/s)
    pcie_gbps: float = 25.0
    #: tokencake: offload a session's blocks during a tool call predicted to last longer than this
    offload_threshold_s: float = 2.0
    #: working-set admission: a session stays resident at least this long after its call ends (s;
    #: 0: the policy's horizon alone, ``idle_factor`` x the tool's expected idle time). Where an engine
    #: step can outlast that horizon (tool times scaled down, a slow engine), about two full-budget
    #: prefill steps keeps a session's next call from losing its residency to the step in progress
    min_idle_s: float = 0.0
    #: also compute the offline eviction bound under this run's own schedule (Belady's MIN on the
    #: blocks it referenced, ``cwsim.eviction_bound``): ``bound_*`` / ``stream_*`` in the summary
    eviction_bound: bool = False

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, "block_size", f"must be >= 1, got {self.block_size}"),
            (self.kv_blocks is None or self.kv_blocks >= 2, "kv_blocks", f"must be >= 2, got {self.kv_blocks}"),
            (self.kv_gib is None or self.kv_gib > 0, "kv_gib", f"must be > 0, got {self.kv_gib}"),
            (not (self.kv_blocks is not None and self.kv_gib is not None), "kv_gib", "cannot be given together with kv_blocks (give one, not both)"),
            (0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
             f"must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.max_num_seqs >= 1, "max_num_seqs", f"must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1, "max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens}"),
            (0.0 <= self.watermark < 1.0, "watermark", f"must be in [0, 1), got {self.watermark}"),
            (self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold",
             f"must be >= 0, got {self.long_prefill_token_threshold}"),
            (self.max_sessions is None or self.max_sessions >= 1, "max_sessions", f"must be >= 1, got {self.max_sessions}"),
            (self.predictor_error >= 0, "predictor_error", f"must be >= 0, got {self.predictor_error}"),
            (self.aging_s >= 0, "aging_s", f"must be >= 0, got {self.aging_s}"),
            (self.gap_scale >= 0, "gap_scale", f"must be >= 0, got {self.gap_scale}"),
            (0 <= self.step_jitter <= 1, "step_jitter", f"must be in [0, 1], got {self.step_jitter}"),
            (self.cpu_kv_blocks is None or self.cpu_kv_blocks >= 0, "cpu_kv_blocks", f"must be >= 0, got {self.cpu_kv_blocks}"),
            (self.cpu_kv_gib is None or self.cpu_kv_gib >= 0, "cpu_kv_gib", f"must be >= 0, got {self.cpu_kv_gib}"),
            (not (self.cpu_kv_blocks is not None and self.cpu_kv_gib is not None), "cpu_kv_gib",
             "cannot be given together with cpu_kv_blocks (give one, not both)"),
            (self.pcie_gbps > 0, "pcie_gbps", f"must be > 0, got {self.pcie_gbps}"),
            (self.offload_threshold_s >= 0, "offload_threshold_s", f"must be >= 0, got {self.offload_threshold_s}"),
            (self.min_idle_s >= 0, "min_idle_s", f"must be >= 0, got {self.min_idle_s}"),
        ]
        for ok, name, problem in checks:
            if not ok:
                raise ConfigError(name, problem)

    def to_dict(self) -> dict:
        return asdict(self)
