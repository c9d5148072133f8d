"""A measured step-time profile: vLLM's own engine steps, timed over a designed set of batches, fitted.

``calibrate(CalibrationConfig(...), out_file)`` builds vLLM's in-process
engine (:class:`replay.oracle.VllmEngine`, the oracle's) and times
``step()`` on batches of one kind at a time, so each step's terms of the
step-time model (``docs/step-time-model.md``) are known exactly:

- **prefill**: one request of ``q`` new tokens on top of ``c`` prefix-cached
  tokens (a request of the same first ``c`` tokens ran first), in one step:
  ``P = q``, ``A = q*c + q*(q+1)/2``;
- **decode**: ``b`` requests of prompt ``L``, after their prefill steps: each
  following step decodes all ``b``, ``D = b``, ``C = b * (L + j)`` at the j-th.

Every point is repeated and its median taken. The coefficients
(``step_overhead_s``, ``prefill_token_s``, ``decode_seq_s``,
``prefill_attn_pair_s``, ``decode_ctx_token_s``) are fitted by least squares
on relative error (each step weighted by 1 / its time), none negative (a term
that would be is dropped and the rest refitted). The profile file has
``source: "measured on ..."`` and, under ``_fit``, each coefficient's standard
error, the fit's mean absolute percentage error per kind of step and every
measured point; ``cwsim run --profile FILE`` loads it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from cwsim.steptime import StepTimeProfile, prefill_attn_pairs

TERMS = ["step_overhead_s", "prefill_token_s", "decode_seq_s", "prefill_attn_pair_s", "decode_ctx_token_s"]
#: each term's count in a measured point: ``S`` engine steps (1 when absent), ``R`` requests (0 when absent)
FEATURES = {"step_overhead_s": "S", "prefill_token_s": "P", "decode_seq_s": "D", "prefill_attn_pair_s": "A",
            "decode_ctx_token_s": "C", "request_overhead_s": "R"}


@dataclass(frozen=True, slots=True)
class CalibrationConfig:
    prefill_q: tuple[int, ...] = (32, 128, 512, 1024, 2048)
    prefill_c: tuple[int, ...] = (0, 512, 1536)
    decode_b: tuple[int, ...] = (1, 4, 16)
    decode_l: tuple[int, ...] = (64, 512, 1536)
    decode_steps: int = 6
    repeats: int = 3
    block_size: int = 32
    kv_blocks: int = 2048
    model: str | None = None  #: None: the tiny random-weight model
    model_cache: str | None = None

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.decode_steps < 1:
            raise ValueError("--repeats and --decode-steps must be >= 1")
        if any(c % self.block_size for c in self.prefill_c):
            raise ValueError(f"every prefix length must be a multiple of --block-size {self.block_size} "
                             "(only whole blocks are cached)")

    @property
    def max_len(self) -> int:
        return max(max(self.prefill_q) + max(self.prefill_c), max(self.decode_l) + self.decode_steps + 1) + 1


def _device() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} threads)"


def measure(config: CalibrationConfig, engine=None, on_point=None) -> list[dict]:
    """Timed steps: ``{"kind", "P", "A", "D", "C", "t"}`` per design point (the median over the repeats)."""
    from replay.oracle import OracleConfig, VllmEngine
    from replay.tokens import segment_tokens

    own = engine is None
    if own:
        oc = OracleConfig(kv_blocks=config.kv_blocks, block_size=config.block_size, max_num_seqs=max(config.decode_b),
                          max_num_batched_tokens=max(max(config.prefill_q), max(config.decode_b)),
                          model=config.model, model_cache=config.model_cache)
        engine = VllmEngine(oc, max_model_len=config.max_len)
    vocab = engine.vocab_size
    n = [0]

    def fresh(length: int) -> list[int]:  # tokens no earlier request had: no prefix hit
        n[0] += 1
        return segment_tokens(f"calibrate-{n[0]}", length, vocab)

    def run_out() -> None:
        while engine.has_unfinished():
            engine.step(0.0)

    def timed_step():
        t = time.perf_counter()
        outs, _, _, _ = engine.step(0.0)  # the oracle's clock does not matter here
        return time.perf_counter() - t, outs

    points = []
    try:
        run_out()
        engine.add("warm", fresh(256), 4)  # first steps pay one-off costs
        run_out()
        for q in config.prefill_q:
            for c in config.prefill_c:
                times = []
                for r in range(config.repeats):
                    prefix = fresh(c)
                    if c:
                        engine.add(f"p{n[0]}-warm", prefix, 1)
                        run_out()
                    engine.add(f"p{n[0]}", prefix + fresh(q), 1)
                    t, outs = timed_step()
                    cached = outs[0].num_cached_tokens if outs else None
                    if cached is not None and cached != c:
                        raise RuntimeError(f"calibration prefill q={q} c={c}: vLLM cached {cached} tokens, not {c}")
                    times.append(t)
                    run_out()
                points.append({"kind": "prefill", "q": q, "c": c, "P": q, "A": prefill_attn_pairs(q, c), "D": 0, "C": 0,
                               "t": statistics.median(times)})
                if on_point is not None:
                    on_point(points[-1])
        for b in config.decode_b:
            for L in config.decode_l:
                per_step = [[] for _ in range(config.decode_steps)]
                for r in range(config.repeats):
                    for i in range(b):
                        engine.add(f"d{n[0]}-{i}", fresh(L), config.decode_steps + 1)
                    started: set[str] = set()
                    while len(started) < b:  # prefill steps: not timed
                        outs, _, _, _ = engine.step(0.0)
                        started.update(o.request_id for o in outs if o.outputs[0].token_ids)
                    for j in range(config.decode_steps):
                        t, _ = timed_step()
                        per_step[j].append(t)
                    run_out()
                for j, ts in enumerate(per_step):
                    points.append({"kind": "decode", "b": b, "L": L, "P": 0, "A": 0.0, "D": b, "C": b * (L + j + 1),
                                   "t": statistics.median(ts)})
                if on_point is not None:
                    on_point(points[-1])
    finally:
        if own:
            engine.close()
    return points


def fit(points: list[dict], terms: list[str] = TERMS, *, relative: bool = True
        ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(coefficients of ``terms``, their standard errors, the fit's MAPE per kind of point), none negative.

    A point's time ``t`` is the sum over ``terms`` of the coefficient times the point's count
    (:data:`FEATURES`). Least squares on each point's relative error (a design's points weigh
    alike), or with ``relative=False`` on its error in seconds (many observed steps: the fitted
    times then sum to about the measured ones)."""
    import numpy as np

    default = {"S": 1.0, "R": 0.0}
    X = np.array([[float(p.get(FEATURES[t], default.get(FEATURES[t], 0.0))) for t in terms] for p in points])
    y = np.array([p["t"] for p in points])
    w = 1.0 / y if relative else np.ones_like(y)
    active = list(range(len(terms)))
    while True:
        Xa = X[:, active] * w[:, None]
        coef, *_ = np.linalg.lstsq(Xa, y * w, rcond=None)
        neg = [a for a, v in zip(active, coef) if v < 0]
        if not neg:
            break
        active.remove(min(neg, key=lambda a: coef[active.index(a)]))
    full = np.zeros(len(terms))
    full[active] = coef
    resid = (X @ full - y) * w
    dof = max(1, len(y) - len(active))
    sigma2 = float(resid @ resid) / dof
    cov = sigma2 * np.linalg.pinv(Xa.T @ Xa)
    stderr = np.zeros(len(terms))
    stderr[active] = np.sqrt(np.maximum(np.diag(cov), 0.0))
    pred = X @ full
    mape = {}
    for kind in sorted({p["kind"] for p in points}):
        idx = [i for i, p in enumerate(points) if p["kind"] == kind]
        mape[kind] = float(np.mean(np.abs(pred[idx] - y[idx]) / y[idx]))
    mape["all"] = float(np.mean(np.abs(pred - y) / y))
    return dict(zip(terms, map(float, full))), dict(zip(terms, map(float, stderr))), mape


def _model_facts(model_dir: Path, block_size: int) -> tuple[str, int, int]:
    cfg = json.loads((model_dir / "config.json").read_text())
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads", heads)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    kv_bytes = 2 * layers * kv_heads * head_dim * 2  # K and V, bf16
    weights = sum(f.stat().st_size for f in model_dir.glob("*.safetensors"))
    name = f"{cfg.get('model_type', 'model')} {cfg['hidden_size']}h x {layers} layers ({model_dir.name})"
    return name, kv_bytes, weights


def calibrate(config: CalibrationConfig, out_file: str | os.PathLike, *, name: str | None = None,
              on_point=None) -> StepTimeProfile:
    """Measure, fit, and write the profile to ``out_file`` (atomically); return it."""
    import vllm

    from replay.oracle import default_model_cache
    from replay.tiny_model import build_tiny_model
    from traces.files import atomic_write_text, ensure_parent

    out = ensure_parent(out_file)
    model_dir = Path(config.model) if config.model else build_tiny_model(config.model_cache or default_model_cache())
    config = CalibrationConfig(**{**asdict(config), "model": str(model_dir)})
    wall0 = time.perf_counter()
    points = measure(config, on_point=on_point)
    coef, err, mape = fit(points)
    model, kv_bytes, weights = _model_facts(model_dir, config.block_size)
    device = _device()
    profile = StepTimeProfile(
        name=name or f"measured-{model_dir.name}", model=model, gpu=device, **coef,
        kv_bytes_per_token=kv_bytes, weights_bytes=weights,
        gpu_mem_bytes=weights + config.kv_blocks * config.block_size * kv_bytes,
        source=(f"measured on {device} with vLLM {vllm.__version__}: {len(points)} design points "
                f"({config.repeats} repeats each) of the in-process engine's step(), fitted by "
                f"replay.calibrate (least squares on relative error); MAPE {100 * mape['all']:.1f}%"),
        notes="terms " + ", ".join(f"{k} = {coef[k]:.4g} +- {err[k]:.2g}" for k in TERMS),
    )
    d = profile.to_json()
    d["_fit"] = {"stderr": err, "mape": mape, "points": points, "config": asdict(config),
                 "wall_s": time.perf_counter() - wall0}
    atomic_write_text(out, json.dumps(d, indent=1) + "\n")
    return profile
