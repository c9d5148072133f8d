"""Tests for cwsim.steptime (step-time model, decode jump, profiles)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from cwsim.steptime import (
    ACTIVATION_RESERVE_BYTES,
    DEFAULT_PROFILE,
    StepTimeProfile,
    list_profiles,
    load_profile,
    prefill_attn_pairs,
)

REPO = Path(__file__).resolve().parents[1]
BUNDLED = ["llama-3.1-8b-a100", "llama-3.1-8b-h100", "qwen2.5-32b-a100", "qwen2.5-32b-h100"]  # the roofline ones


def make(**kw) -> StepTimeProfile:
    base = dict(
        name="toy", model="toy-model", gpu="toy-gpu",
        step_overhead_s=0.002, prefill_token_s=1e-5, decode_seq_s=3e-5,
        prefill_attn_pair_s=2e-9, decode_ctx_token_s=5e-8,
        kv_bytes_per_token=1000, weights_bytes=10_000_000, gpu_mem_bytes=100_000_000,
    )
    base.update(kw)
    return StepTimeProfile(**base)


def roofline_module():
    spec = importlib.util.spec_from_file_location("roofline_profiles", REPO / "experiments" / "roofline_profiles.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.modules.pop(spec.name, None)
    return mod


# ------------------------------------------------------------------ step time
def test_prefill_attn_pairs():
    assert prefill_attn_pairs(1, 0) == 1
    assert prefill_attn_pairs(4, 0) == 10  # 1+2+3+4
    assert prefill_attn_pairs(3, 5) == 3 * 5 + 6
    assert prefill_attn_pairs(0, 100) == 0
    # brute force: token i (0-based) of the chunk attends to c + i + 1 keys
    q, c = 37, 101
    assert prefill_attn_pairs(q, c) == sum(c + i + 1 for i in range(q))


def test_step_time_hand_computed():
    p = make()
    pairs = prefill_attn_pairs(100, 50)  # 5000 + 5050 = 10050
    expected = 0.002 + 1e-5 * 100 + 3e-5 * 4 + 2e-9 * 10050 + 5e-8 * 8000
    assert p.step_time(100, pairs, 4, 8000) == pytest.approx(expected, rel=1e-12)
    assert p.step_time(0, 0.0, 0, 0) == 0.002
    # only one term at a time
    assert p.step_time(10, 0, 0, 0) == pytest.approx(0.002 + 1e-4, rel=1e-12)
    assert p.step_time(0, 0, 0, 1000) == pytest.approx(0.002 + 5e-5, rel=1e-12)


def test_full_prefill_step_is_the_whole_budget_on_nothing_cached():
    p = make()
    # 512 tokens: 512 * 513 / 2 = 131,328 causal pairs, no decode
    assert p.full_prefill_step_s(512) == pytest.approx(0.002 + 1e-5 * 512 + 2e-9 * 131_328, rel=1e-12)


@pytest.mark.parametrize("n,batch,ctx", [(0, 4, 100), (1, 1, 0), (1, 32, 640_000), (7, 3, 12_345),
                                         (100, 64, 1_000_000), (1000, 1, 5), (257, 256, 2_000_000)])
def test_decode_run_time_equals_sum_of_steps(n, batch, ctx):
    for p in (make(), load_profile(DEFAULT_PROFILE), load_profile("qwen2.5-32b-a100")):
        brute = sum(p.step_time(0, 0.0, batch, ctx + k * batch) for k in range(n))
        assert p.decode_run_time(n, batch, ctx) == pytest.approx(brute, rel=1e-12, abs=0.0)


def test_decode_run_time_rejects_negative():
    with pytest.raises(ValueError):
        make().decode_run_time(-1, 1, 0)


# --------------------------------------------------------------- decode jump
def brute_steps_before(p, batch, ctx, horizon, max_steps):
    m = 0
    for k in range(max_steps):
        if p.decode_run_time(k, batch, ctx) < horizon:
            m += 1
        else:
            break
    return max(1, m)


def test_steps_before_exact_boundaries():
    p = make()
    batch, ctx = 8, 10_000
    for k in (1, 2, 3, 10, 57, 500):
        start_k = p.decode_run_time(k, batch, ctx)
        # a step starting exactly at the horizon does not count: steps 0..k-1 do
        assert p.decode_steps_starting_before(batch, ctx, start_k, 10_000) == k
        assert p.decode_steps_starting_before(batch, ctx, math.nextafter(start_k, math.inf), 10_000) == k + 1
        assert p.decode_steps_starting_before(batch, ctx, math.nextafter(start_k, 0.0), 10_000) == k


def test_steps_before_small_and_capped():
    p = make()
    assert p.decode_steps_starting_before(4, 100, 0.0, 50) == 1
    assert p.decode_steps_starting_before(4, 100, -1.0, 50) == 1
    assert p.decode_steps_starting_before(4, 100, 1e-12, 50) == 1  # only step 0 starts before
    assert p.decode_steps_starting_before(4, 100, 1e9, 50) == 50
    assert p.decode_steps_starting_before(4, 100, math.inf, 50) == 50
    assert p.decode_steps_starting_before(4, 100, 1e9, 1) == 1
    with pytest.raises(ValueError):
        p.decode_steps_starting_before(4, 100, 1.0, 0)


def test_steps_before_degenerate_coefficients():
    zero = make(step_overhead_s=0.0, decode_seq_s=0.0, decode_ctx_token_s=0.0)
    assert zero.decode_steps_starting_before(4, 100, 1.0, 77) == 77
    assert zero.decode_steps_starting_before(4, 100, 0.0, 77) == 1
    lin = make(decode_ctx_token_s=0.0)  # constant step time: b == 0
    a = lin.decode_run_time(1, 4, 100)
    assert lin.decode_steps_starting_before(4, 100, 10 * a, 1000) == brute_steps_before(lin, 4, 100, 10 * a, 1000)
    quad = make(step_overhead_s=0.0, decode_seq_s=0.0)  # a == 0 with empty context, b > 0
    for h in (1e-9, 1e-6, 1e-3, quad.decode_run_time(5, 4, 0)):
        assert quad.decode_steps_starting_before(4, 0, h, 1000) == brute_steps_before(quad, 4, 0, h, 1000)


coef = st.floats(min_value=0.0, max_value=1e-2, allow_nan=False, allow_infinity=False)


@settings(max_examples=400, deadline=None)
@given(
    overhead=coef, seq=coef, ctx_coef=st.floats(min_value=0.0, max_value=1e-6),
    batch=st.integers(0, 512), ctx=st.integers(0, 5_000_000),
    horizon=st.floats(min_value=-1.0, max_value=50.0, allow_nan=False),
    max_steps=st.integers(1, 400),
    at_step=st.one_of(st.none(), st.integers(0, 400)),
)
def test_steps_before_matches_brute_force(overhead, seq, ctx_coef, batch, ctx, horizon, max_steps, at_step):
    p = make(step_overhead_s=overhead, decode_seq_s=seq, decode_ctx_token_s=ctx_coef)
    if at_step is not None:  # put the horizon exactly on a step start
        horizon = p.decode_run_time(at_step, batch, ctx)
    got = p.decode_steps_starting_before(batch, ctx, horizon, max_steps)
    assert got == brute_steps_before(p, batch, ctx, horizon, max_steps)


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(BUNDLED), batch=st.integers(1, 512), ctx=st.integers(0, 20_000_000),
    horizon=st.floats(min_value=0.0, max_value=30.0), max_steps=st.integers(1, 2000),
)
def test_steps_before_bundled_profiles(name, batch, ctx, horizon, max_steps):
    p = load_profile(name)
    assert p.decode_steps_starting_before(batch, ctx, horizon, max_steps) == brute_steps_before(
        p, batch, ctx, horizon, max_steps)


# ------------------------------------------------------------------- profiles
def test_list_profiles():
    assert list_profiles() == sorted(BUNDLED + ["unit"])
    assert DEFAULT_PROFILE in list_profiles()


def test_unit_profile_counts_steps():
    p = load_profile("unit")
    assert p.step_time(5000, 1e9, 300, 10**7) == 1.0 == p.step_time(0, 0, 1, 0)
    assert p.decode_run_time(37, 64, 10**6) == 37.0
    assert p.decode_steps_starting_before(8, 1000, 5.0, 100) == 5  # steps start at 0, 1, ..., 4
    assert p.decode_steps_starting_before(8, 1000, 5.5, 100) == 6


@pytest.mark.parametrize("name", BUNDLED)
def test_load_bundled(name):
    p = load_profile(name)
    assert p.name == name
    assert p.source.startswith("roofline:")
    assert p.step_overhead_s > 0 and p.prefill_token_s > 0 and p.decode_seq_s > 0
    assert p.prefill_attn_pair_s > 0 and p.decode_ctx_token_s > 0
    assert p.weights_bytes < p.gpu_mem_bytes
    assert StepTimeProfile.from_json(p.to_json()) == p
    assert json.loads(json.dumps(p.to_json())) == p.to_json()
    assert p.default_kv_blocks(16) > 0


def test_bundled_sanity():
    l8 = load_profile("llama-3.1-8b-h100")
    assert l8.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert load_profile("qwen2.5-32b-h100").kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    # A100 slower than H100 on every coefficient
    for m in ("llama-3.1-8b", "qwen2.5-32b"):
        h, a = load_profile(f"{m}-h100"), load_profile(f"{m}-a100")
        for f in ("step_overhead_s", "prefill_token_s", "decode_seq_s", "prefill_attn_pair_s", "decode_ctx_token_s"):
            assert getattr(a, f) > getattr(h, f), (m, f)
    # 32B on one 80 GB GPU leaves little KV room compared with 8B
    assert load_profile("qwen2.5-32b-h100").default_kv_blocks(16) * 16 < 100_000
    assert l8.default_kv_blocks(16) * 16 > 300_000


def test_load_profile_from_path(tmp_path):
    p = make(name="mine", source="measured on nowhere")
    f = tmp_path / "mine.json"
    f.write_text(json.dumps(p.to_json()))
    assert load_profile(str(f)) == p
    assert load_profile(f) == p
    # metadata keys starting with '_' are ignored
    f2 = tmp_path / "meta.json"
    f2.write_text(json.dumps({**p.to_json(), "_comment": "fit on 2025-01-01"}))
    assert load_profile(str(f2)) == p


def test_load_profile_missing_field_names_field_and_file(tmp_path):
    d = make().to_json()
    del d["decode_ctx_token_s"]
    f = tmp_path / "broken.json"
    f.write_text(json.dumps(d))
    with pytest.raises(ValueError) as ei:
        load_profile(str(f))
    msg = str(ei.value)
    assert "decode_ctx_token_s" in msg and "broken.json" in msg


@pytest.mark.parametrize("field,value", [("prefill_token_s", "fast"), ("step_overhead_s", -1.0),
                                         ("kv_bytes_per_token", 0), ("weights_bytes", 1.5),
                                         ("name", 3), ("decode_seq_s", None), ("request_overhead_s", -0.001),
                                         ("request_overhead_s", "5ms")])
def test_load_profile_bad_field(tmp_path, field, value):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({**make().to_json(), field: value}))
    with pytest.raises(ValueError) as ei:
        load_profile(str(f))
    assert field in str(ei.value) and "bad.json" in str(ei.value)


def test_request_overhead_is_optional_and_written_only_when_set(tmp_path):
    """Files written before ``request_overhead_s`` existed load with 0; 0 is not written back."""
    d = make().to_json()
    assert "request_overhead_s" not in d and make().request_overhead_s == 0.0
    f = tmp_path / "server.json"
    f.write_text(json.dumps({**d, "request_overhead_s": 0.0055}))
    p = load_profile(str(f))
    assert p.request_overhead_s == 0.0055 and p.to_json()["request_overhead_s"] == 0.0055
    assert StepTimeProfile.from_json(p.to_json()) == p


def test_load_profile_unknown_field_and_bad_json(tmp_path):
    f = tmp_path / "typo.json"
    f.write_text(json.dumps({**make().to_json(), "step_overhead": 0.1}))
    with pytest.raises(ValueError, match="step_overhead"):
        load_profile(str(f))
    g = tmp_path / "garbage.json"
    g.write_text("{not json")
    with pytest.raises(ValueError, match="garbage.json"):
        load_profile(str(g))
    with pytest.raises(ValueError, match="does not exist"):
        load_profile(str(tmp_path / "nope.json"))


def test_unknown_name_lists_available():
    with pytest.raises(ValueError) as ei:
        load_profile("gpt-5-on-a-toaster")
    msg = str(ei.value)
    assert "gpt-5-on-a-toaster" in msg
    for name in BUNDLED:
        assert name in msg


def test_constructor_validates():
    with pytest.raises(ValueError, match="decode_seq_s"):
        make(decode_seq_s=float("nan"))
    with pytest.raises(ValueError, match="gpu_mem_bytes"):
        make(gpu_mem_bytes=-5)


# ------------------------------------------------------------------ KV blocks
def test_kv_block_conversions():
    p = make(kv_bytes_per_token=1000, weights_bytes=10_000_000, gpu_mem_bytes=100_000_000)
    assert p.kv_bytes_per_block(16) == 16_000
    assert p.kv_blocks_for_bytes(16_000, 16) == 1
    assert p.kv_blocks_for_bytes(15_999, 16) == 0
    assert p.kv_blocks_for_bytes(48_000.5, 16) == 3
    assert p.kv_blocks_for_bytes(-5, 16) == 0
    with pytest.raises(ValueError):
        p.kv_blocks_for_bytes(1000, 0)
    # 100e6 * 0.9 - 10e6 - reserve(0) = 80e6 bytes -> 5000 blocks of 16 tokens
    assert p.default_kv_blocks(16, 0.9, activation_reserve_bytes=0) == 5000
    assert p.default_kv_blocks(16, 0.9) == 0  # 2 GiB reserve eats everything
    big = make(kv_bytes_per_token=131072, weights_bytes=16 * 2**30, gpu_mem_bytes=80 * 2**30)
    free = 80 * 2**30 * 0.9 - 16 * 2**30 - ACTIVATION_RESERVE_BYTES
    assert big.default_kv_blocks(16) == int(free // (131072 * 16))
    assert big.default_kv_blocks(32) == int(free // (131072 * 32))
    with pytest.raises(ValueError):
        big.default_kv_blocks(16, 0.0)


# ------------------------------------------------------------- regeneration
def test_bundled_profiles_match_generator(tmp_path):
    mod = roofline_module()
    paths = mod.write_profiles(tmp_path)
    assert sorted(p.stem for p in paths) == BUNDLED
    bundled_dir = REPO / "cwsim" / "profiles"
    for path in paths:
        generated = json.loads(path.read_text())
        bundled = json.loads((bundled_dir / path.name).read_text())
        assert generated == bundled, path.name
        # byte-identical too (deterministic formatting)
        assert path.read_text() == (bundled_dir / path.name).read_text()
    assert mod.generate_profiles() == {n: load_profile(n).to_json() for n in BUNDLED}
