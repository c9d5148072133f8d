"""Simulation configuration: one dataclass, whose fields are the CLI's flags."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
    gpu_memory_utilization: float = 0.9
    arrivals: str = "concurrent"
    agents: int = 16
    rate: float = 0.1
    seed: int = 0
    #: advance runs of decode-only steps in one jump (False: step by step, to validate the jump)
    decode_jumps: bool = True
    #: trace the tool-call predictor learns from (None: the simulated trace itself)
    predictor_trace: str | None = None
    #: injected prediction error: idle predictions are multiplied by exp(N(0, this))
    predictor_error: float = 0.0
    #: prefix-aware scheduling: a request waiting longer than this goes first
    aging_s: float = 30.0
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

    def __post_init__(self) -> None:
        checks = [
            (self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}"),
            (self.kv_blocks is None or self.kv_blocks >= 2, f"kv_blocks must be >= 2, got {self.kv_blocks}"),
            (self.kv_gib is None or self.kv_gib > 0, f"kv_gib must be > 0, got {self.kv_gib}"),
            (not (self.kv_blocks is not None and self.kv_gib is not None), "give kv_blocks or kv_gib, not both"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1, f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (0.0 <= self.watermark < 1.0, f"--watermark must be in [0, 1), got {self.watermark}"),
            (self.long_prefill_token_threshold >= 0,
             f"--long-prefill-token-threshold must be >= 0, got {self.long_prefill_token_threshold}"),
            (self.max_sessions is None or self.max_sessions >= 1, f"max_sessions must be >= 1, got {self.max_sessions}"),
            (self.predictor_error >= 0, f"predictor_error must be >= 0, got {self.predictor_error}"),
            (self.aging_s >= 0, f"aging_s must be >= 0, got {self.aging_s}"),
            (self.cpu_kv_blocks is None or self.cpu_kv_blocks >= 0, f"cpu_kv_blocks must be >= 0, got {self.cpu_kv_blocks}"),
            (self.cpu_kv_gib is None or self.cpu_kv_gib >= 0, f"cpu_kv_gib must be >= 0, got {self.cpu_kv_gib}"),
            (not (self.cpu_kv_blocks is not None and self.cpu_kv_gib is not None),
             "give cpu_kv_blocks or cpu_kv_gib, not both"),
            (self.pcie_gbps > 0, f"pcie_gbps must be > 0, got {self.pcie_gbps}"),
            (self.offload_threshold_s >= 0, f"offload_threshold_s must be >= 0, got {self.offload_threshold_s}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)

    def to_dict(self) -> dict:
        return asdict(self)
