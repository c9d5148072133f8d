"""Derive roofline step-time profiles and write ``cwsim/profiles/<name>.json``.

The coefficients of the step-time model (``cwsim/steptime.py``,
``docs/step-time-model.md``) are derived here from stated model shapes, stated
GPU datasheet figures and stated efficiencies.  They are *estimates*: a profile
measured on real hardware should replace them (same JSON format, with
``source: "measured on ..."``).

Derivation (dtype bf16, 2 bytes per parameter / KV element)::

    step_overhead_s     = cpu_overhead_s + weight_bytes_read / (hbm_bw * bw_eff)
                          (weights read once per step: all linear layers + lm_head)
    prefill_token_s     = 2 * linear_params / (peak_flops * mfu)
                          (lm_head is computed only for the last token of a prompt,
                           so it is charged per decode sequence, not per prefill token)
    decode_seq_s        = 2 * (linear_params + lm_head_params) / (peak_flops * mfu)
                          + per_seq_cpu_s
    prefill_attn_pair_s = 4 * layers * q_heads * head_dim / (peak_flops * attn_eff)
                          (QK^T and PV, 2 FLOPs per multiply-add; causal pairs are
                           already counted by prefill_attn_pairs(q, c))
    decode_ctx_token_s  = kv_bytes_per_token / (hbm_bw * bw_eff)
                          (each decode sequence reads its whole KV context from HBM)
    kv_bytes_per_token  = 2 (K,V) * layers * kv_heads * head_dim * 2 bytes

Usage::

    python experiments/roofline_profiles.py              # writes cwsim/profiles/*.json
    python experiments/roofline_profiles.py --out-dir X  # somewhere else
    python experiments/roofline_profiles.py --table      # also print example step times

Output is deterministic (sorted keys, 2-space indent, coefficients rounded to
4 significant digits).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from cwsim.steptime import ACTIVATION_RESERVE_BYTES, StepTimeProfile, prefill_attn_pairs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "cwsim" / "profiles"

GIB = 1024**3


@dataclass(frozen=True)
class ModelShape:
    key: str  # short name used in profile names
    label: str  # human-readable model name
    layers: int
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    qkv_bias: bool = False
    tie_embeddings: bool = False
    dtype_bytes: int = 2  # bf16

    @property
    def layer_linear_params(self) -> int:
        """q, k, v, o projections + gated MLP (gate, up, down) of one layer."""
        q = self.hidden * self.q_heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.q_heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        bias = (self.q_heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return q + kv + o + mlp + bias

    @property
    def linear_params(self) -> int:
        return self.layers * self.layer_linear_params

    @property
    def lm_head_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        embed = self.vocab * self.hidden
        lm_head = 0 if self.tie_embeddings else self.lm_head_params
        norms = (2 * self.layers + 1) * self.hidden
        return self.linear_params + embed + lm_head + norms

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def attn_flops_per_pair(self) -> int:
        return 4 * self.layers * self.q_heads * self.head_dim


@dataclass(frozen=True)
class GpuSpec:
    key: str
    label: str
    peak_flops: float  # dense bf16 FLOP/s (no sparsity)
    hbm_bw: float  # bytes/s
    mem_bytes: int


@dataclass(frozen=True)
class Assumptions:
    mfu: float = 0.6  # achieved fraction of peak for the linear layers (matmuls)
    attn_eff: float = 0.5  # achieved fraction of peak for prefill attention (FlashAttention)
    bw_eff: float = 0.8  # achievable fraction of HBM bandwidth (weights, KV reads)
    cpu_overhead_s: float = 3e-3  # scheduler, input prep, launch/CUDA-graph replay, sampling, per step
    per_seq_cpu_s: float = 10e-6  # host-side work per decode sequence (input prep, sampling, output)


LLAMA_8B = ModelShape(
    key="llama-3.1-8b", label="Llama-3.1-8B (bf16)",
    layers=32, hidden=4096, q_heads=32, kv_heads=8, head_dim=128,
    intermediate=14336, vocab=128256,
)
QWEN_32B = ModelShape(
    key="qwen2.5-32b", label="Qwen2.5-32B / Qwen2.5-Coder-32B (bf16)",
    layers=64, hidden=5120, q_heads=40, kv_heads=8, head_dim=128,
    intermediate=27648, vocab=152064, qkv_bias=True,
)
H100 = GpuSpec(key="h100", label="NVIDIA H100 SXM 80 GB", peak_flops=989e12, hbm_bw=3.35e12, mem_bytes=80 * GIB)
A100 = GpuSpec(key="a100", label="NVIDIA A100 SXM 80 GB", peak_flops=312e12, hbm_bw=2.039e12, mem_bytes=80 * GIB)

MODELS = (LLAMA_8B, QWEN_32B)
GPUS = (H100, A100)
ASSUMPTIONS = Assumptions()


def _sig(x: float, digits: int = 4) -> float:
    """Round to ``digits`` significant digits (deterministic, readable JSON)."""
    return float(f"{x:.{digits - 1}e}")


def derive_profile(m: ModelShape, g: GpuSpec, a: Assumptions = ASSUMPTIONS) -> StepTimeProfile:
    """Roofline-derived :class:`StepTimeProfile` for model ``m`` on GPU ``g``."""
    matmul_flops = g.peak_flops * a.mfu
    attn_flops = g.peak_flops * a.attn_eff
    bw = g.hbm_bw * a.bw_eff
    weight_bytes_read = (m.linear_params + m.lm_head_params) * m.dtype_bytes
    weight_read_s = weight_bytes_read / bw
    weights_bytes = m.total_params * m.dtype_bytes

    step_overhead_s = _sig(a.cpu_overhead_s + weight_read_s)
    prefill_token_s = _sig(2 * m.linear_params / matmul_flops)
    decode_seq_s = _sig(2 * (m.linear_params + m.lm_head_params) / matmul_flops + a.per_seq_cpu_s)
    prefill_attn_pair_s = _sig(m.attn_flops_per_pair / attn_flops)
    decode_ctx_token_s = _sig(m.kv_bytes_per_token / bw)

    source = (
        f"roofline: {m.label} on {g.label} ({g.peak_flops / 1e12:g} TFLOP/s dense bf16, "
        f"{g.hbm_bw / 1e12:g} TB/s HBM); matmul MFU {a.mfu:g}, attention efficiency {a.attn_eff:g}, "
        f"bandwidth efficiency {a.bw_eff:g}, CPU/launch overhead {a.cpu_overhead_s * 1e3:g} ms/step, "
        f"host cost {a.per_seq_cpu_s * 1e6:g} us/decode seq; generated by experiments/roofline_profiles.py. "
        f"Estimate, not a measurement."
    )
    notes = "\n".join([
        f"shape: layers={m.layers} hidden={m.hidden} q_heads={m.q_heads} kv_heads={m.kv_heads} "
        f"head_dim={m.head_dim} intermediate={m.intermediate} vocab={m.vocab} "
        f"qkv_bias={m.qkv_bias} tied_embeddings={m.tie_embeddings} dtype=bf16",
        f"params: linear layers {m.linear_params:,} ({m.layer_linear_params:,}/layer), "
        f"lm_head {m.lm_head_params:,}, total {m.total_params:,} -> weights_bytes {weights_bytes:,}",
        f"step_overhead_s = cpu {a.cpu_overhead_s:g} s + weights read once per step "
        f"{weight_bytes_read:,} B / ({g.hbm_bw:g} B/s * {a.bw_eff:g}) = {a.cpu_overhead_s:g} + "
        f"{weight_read_s:.4e} = {step_overhead_s:.4e} s",
        f"prefill_token_s = 2 * {m.linear_params:,} FLOP / ({g.peak_flops:g} * {a.mfu:g}) = {prefill_token_s:.4e} s "
        f"(lm_head only runs for sampled positions, charged to decode_seq_s)",
        f"decode_seq_s = 2 * ({m.linear_params:,} + {m.lm_head_params:,}) FLOP / ({g.peak_flops:g} * {a.mfu:g}) "
        f"+ {a.per_seq_cpu_s:g} s host = {decode_seq_s:.4e} s",
        f"prefill_attn_pair_s = 4 * {m.layers} * {m.q_heads} * {m.head_dim} = {m.attn_flops_per_pair:,} FLOP / "
        f"({g.peak_flops:g} * {a.attn_eff:g}) = {prefill_attn_pair_s:.4e} s",
        f"decode_ctx_token_s = kv_bytes_per_token {m.kv_bytes_per_token:,} B "
        f"(2 * {m.layers} * {m.kv_heads} * {m.head_dim} * 2) / ({g.hbm_bw:g} * {a.bw_eff:g}) = "
        f"{decode_ctx_token_s:.4e} s",
        "terms are added, not max()-ed: weight reads and compute are assumed not to overlap "
        "(pessimistic for mid-sized batches); KV reads of prefill context and KV writes are ignored",
    ])
    prof = StepTimeProfile(
        name=f"{m.key}-{g.key}", model=m.label, gpu=g.label,
        step_overhead_s=step_overhead_s, prefill_token_s=prefill_token_s, decode_seq_s=decode_seq_s,
        prefill_attn_pair_s=prefill_attn_pair_s, decode_ctx_token_s=decode_ctx_token_s,
        kv_bytes_per_token=m.kv_bytes_per_token, weights_bytes=weights_bytes, gpu_mem_bytes=g.mem_bytes,
        source=source, notes="",
    )
    blocks = prof.default_kv_blocks(16)
    kv_note = (
        f"KV memory: {g.mem_bytes / GIB:g} GiB * 0.9 - weights {weights_bytes / GIB:.2f} GiB - "
        f"{ACTIVATION_RESERVE_BYTES / GIB:g} GiB activation reserve -> default_kv_blocks(16) = {blocks:,} blocks "
        f"= {blocks * 16:,} tokens"
    )
    return StepTimeProfile.from_json({**prof.to_json(), "notes": notes + "\n" + kv_note})


def generate_profiles(a: Assumptions = ASSUMPTIONS) -> dict[str, dict]:
    """All bundled roofline profiles as ``{name: to_json() dict}``."""
    out = {}
    for m in MODELS:
        for g in GPUS:
            p = derive_profile(m, g, a)
            out[p.name] = p.to_json()
    return out


def dumps_profile(d: dict) -> str:
    return json.dumps(d, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def write_profiles(out_dir: str | Path = DEFAULT_OUT_DIR, a: Assumptions = ASSUMPTIONS) -> list[Path]:
    """Write ``<out_dir>/<name>.json`` for every profile; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, d in generate_profiles(a).items():
        path = out_dir / f"{name}.json"
        path.write_text(dumps_profile(d), encoding="utf-8")
        paths.append(path)
    return paths


def example_table(profiles: list[StepTimeProfile]) -> str:
    """Markdown table of coefficients and example step times."""
    rows = [
        "| profile | overhead (ms) | prefill tok (us) | decode seq (us) | attn pair (ns) | decode ctx tok (ns) "
        "| decode 32 x 20k ctx (ms) | prefill 8192 on 16k cached (ms) | KV blocks (16 tok, 0.9) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        dec = p.step_time(0, 0.0, 32, 32 * 20_000)
        pre = p.step_time(8192, prefill_attn_pairs(8192, 16_384), 0, 0)
        blocks = p.default_kv_blocks(16)
        rows.append(
            f"| `{p.name}` | {p.step_overhead_s * 1e3:.2f} | {p.prefill_token_s * 1e6:.2f} | "
            f"{p.decode_seq_s * 1e6:.1f} | {p.prefill_attn_pair_s * 1e9:.3f} | {p.decode_ctx_token_s * 1e9:.1f} | "
            f"{dec * 1e3:.1f} | {pre * 1e3:.0f} | {blocks:,} ({blocks * 16:,} tok) |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help="where to write <name>.json")
    ap.add_argument("--table", action="store_true", help="print a markdown table of example step times")
    args = ap.parse_args(argv)
    for path in write_profiles(args.out_dir):
        print(f"wrote {path}")
    if args.table:
        profs = [StepTimeProfile.from_json(d) for d in generate_profiles().values()]
        print(example_table(profs))


if __name__ == "__main__":
    main()
