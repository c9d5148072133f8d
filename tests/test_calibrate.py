"""`cwreplay calibrate`: the fit (no vLLM) and a measured profile that `cwsim run --profile` loads (vLLM)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from cwsim.steptime import StepTimeProfile, prefill_attn_pairs
from replay.calibrate import TERMS, CalibrationConfig, fit
from tests.conftest import ROUND_PROFILE


def _points(truth: StepTimeProfile, noise: float = 0.0, seed: int = 0):
    import random

    rng = random.Random(seed)
    pts = []
    for q in (32, 128, 512, 2048):
        for c in (0, 512, 1536):
            a = prefill_attn_pairs(q, c)
            pts.append({"kind": "prefill", "P": q, "A": a, "D": 0, "C": 0})
    for b in (1, 4, 16):
        for L in (64, 512, 1536):
            for j in range(1, 5):
                pts.append({"kind": "decode", "P": 0, "A": 0.0, "D": b, "C": b * (L + j)})
    for p in pts:
        t = truth.step_time(p["P"], p["A"], p["D"], p["C"])
        p["t"] = t * (1 + rng.uniform(-noise, noise))
    return pts


TRUTH = StepTimeProfile(name="t", model="m", gpu="g", step_overhead_s=2e-3, prefill_token_s=3e-6, decode_seq_s=5e-5,
                        prefill_attn_pair_s=1e-10, decode_ctx_token_s=2e-8, kv_bytes_per_token=1, weights_bytes=0,
                        gpu_mem_bytes=0)


def test_fit_recovers_known_coefficients():
    coef, err, mape = fit(_points(TRUTH))
    for k in TERMS:
        assert coef[k] == pytest.approx(getattr(TRUTH, k), rel=1e-6), k
    assert mape["all"] < 1e-9


def test_fit_with_noise_reports_errors_and_keeps_terms_non_negative():
    truth = StepTimeProfile(**{**TRUTH.to_json(), "decode_ctx_token_s": 0.0})
    coef, err, mape = fit(_points(truth, noise=0.05, seed=1))
    assert all(v >= 0 for v in coef.values())
    assert coef["step_overhead_s"] == pytest.approx(2e-3, rel=0.1)
    assert 0 < mape["all"] < 0.05 and set(mape) == {"prefill", "decode", "all"}
    assert all(e >= 0 for e in err.values()) and err["step_overhead_s"] > 0


def test_fit_with_a_request_term_separates_it_from_the_step_overhead():
    """Server points: a whole request (one prefill step, R = 1) and decode steps (R = 0); the
    request's own latency is identified only because the decode points pin the step overhead."""
    from replay.calibrate_server import SERVER_TERMS

    pts = _points(TRUTH)
    for p in pts:
        if p["kind"] == "prefill":
            p["R"] = 1
            p["t"] += 0.006
    coef, err, mape = fit(pts, SERVER_TERMS)
    assert coef["request_overhead_s"] == pytest.approx(0.006, rel=1e-6)
    for k in TERMS:
        assert coef[k] == pytest.approx(getattr(TRUTH, k), rel=1e-6), k
    assert mape["all"] < 1e-9
    # the five-term fit cannot tell the two apart: it takes the decode and prefill overheads as one
    five, _, five_mape = fit(pts)
    assert set(five) == set(TERMS) and five_mape["prefill"] > 0.01


def test_the_servers_block_size_and_pool_come_from_its_metrics():
    from replay.calibrate_server import cache_config
    from replay.live import ReplayError

    text = ('# TYPE vllm:cache_config_info gauge\nvllm:cache_config_info{block_size="32",cache_dtype="auto",'
            'num_gpu_blocks="1024",num_gpu_blocks_override="1024"} 1.0\nvllm:num_requests_running 0\n')
    assert cache_config(text, "http://h:1") == (32, 1024)
    with pytest.raises(ReplayError, match="http://h:1.*vllm:cache_config_info"):
        cache_config("vllm:num_requests_running 0\n", "http://h:1")


def test_a_server_design_must_fit_the_step_budget():
    from replay.calibrate_server import ServerCalibrationConfig

    with pytest.raises(ValueError, match="480 new tokens .* does not fit one step of --max-num-batched-tokens 256"):
        ServerCalibrationConfig("http://h:1", max_num_batched_tokens=256)
    with pytest.raises(ValueError, match="200 new tokens .* does not fit one step of --max-num-batched-tokens 128"):
        ServerCalibrationConfig("http://h:1", prefill_q=(16, 128), max_num_batched_tokens=128)
    with pytest.raises(ValueError, match="check call needs >= 1 new token and >= 1 output"):
        ServerCalibrationConfig("http://h:1", check=((48, 128, 0),))
    with pytest.raises(ValueError, match="n1 < n2"):
        ServerCalibrationConfig("http://h:1", decode_n=(8, 8))


def test_prefix_lengths_must_be_whole_blocks():
    with pytest.raises(ValueError, match="multiple of --block-size 32"):
        CalibrationConfig(prefill_c=(0, 100))


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                    reason="vLLM is not installed (pip install -e '.[vllm]'); CI installs it")
def test_calibrated_profile_is_measured_and_cwsim_runs_with_it(tmp_path):
    from cwsim.runner import simulate
    from cwsim.config import SimConfig
    from cwsim.steptime import load_profile
    from replay.calibrate import calibrate
    from replay.tiny_model import build_tiny_model
    from tests.oracle_workloads import agent_sessions
    from traces.format import Trace

    model = build_tiny_model(tmp_path / "tiny-llama")
    cfg = CalibrationConfig(prefill_q=(32, 512), prefill_c=(0, 512), decode_b=(1, 8), decode_l=(64, 512),
                            decode_steps=3, repeats=1, kv_blocks=256, model=str(model))
    path = tmp_path / "measured.json"
    prof = calibrate(cfg, path)
    loaded = load_profile(path)
    assert loaded == prof and loaded.source.startswith("measured on ")
    # timings on a shared machine are noisy: the fit's terms are not checked, only that it is one
    assert sum(getattr(loaded, k) for k in TERMS) > 0 and loaded.kv_bytes_per_token == 2 * 2 * 2 * 32 * 2
    d = json.loads(path.read_text())
    assert len(d["_fit"]["points"]) == 4 + 4 * 3 and set(d["_fit"]["stderr"]) == set(TERMS)
    assert all(p["t"] > 0 for p in d["_fit"]["points"])
    res = simulate(Trace(agent_sessions(2, 3, 0), source="t"), SimConfig(profile=str(path), kv_blocks=64, agents=2))
    assert res.summary["profile"] == prof.name and res.summary["makespan_s"] > 0


def _step_log(tmp_path, profile: dict, seed: int = 2) -> tuple:
    """A simulated run's step log (one row a step) under ``profile``: the steps a live server's log holds."""
    from cwsim.config import SimConfig
    from cwsim.runner import simulate
    from tests.conftest import agent_trace

    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "truth.json"
    path.write_text(json.dumps(profile))
    out = tmp_path / "run"
    simulate(agent_trace(6, 6, seed=seed, system_tokens=600), SimConfig(profile=str(path), kv_blocks=700, agents=4,
                                                                     max_num_batched_tokens=512, decode_jumps=False),
             out, step_log=True)
    return path, out / "steps.csv"


def test_a_profile_fitted_on_a_step_log_recovers_the_terms_that_timed_it(tmp_path):
    """`cwreplay calibrate --step-log`: on steps timed by a known profile (a simulation's log, each step
    from its start to the next one's), the fit gives back that profile's five terms, takes the rest
    from the base, and has no frontend share (the load is in the timed steps)."""
    from cwsim.steptime import load_profile
    from replay.calibrate_steps import busy_steps, calibrate_from_steps

    truth = {**ROUND_PROFILE.to_json(), "step_overhead_s": 0.004, "prefill_token_s": 2e-5, "prefill_attn_pair_s": 3e-8,
             "decode_seq_s": 4e-4, "decode_ctx_token_s": 2e-7, "request_overhead_s": 0.002, "name": "truth"}
    base, log = _step_log(tmp_path, truth)
    points = busy_steps(log, trim=0.0)
    assert {p["kind"] for p in points} == {"decode", "prefill", "mixed"} and len(points) > 100
    prof = calibrate_from_steps(log, base, tmp_path / "fitted.json", trim=0.0)
    for k in TERMS:
        assert getattr(prof, k) == pytest.approx(truth[k], rel=1e-6), k
    assert prof.request_overhead_s == 0.002 and prof.frontend_step_share == 0.0 and prof.name == "truth-steps"
    fit_ = json.loads((tmp_path / "fitted.json").read_text())["_fit"]
    assert fit_["fitted_s"] == pytest.approx(fit_["measured_s"], rel=1e-9) and fit_["mape"]["all"] < 1e-6
    assert load_profile(tmp_path / "fitted.json").step_overhead_s == pytest.approx(0.004, rel=1e-6)
    # trimming drops the slowest steps only
    assert len(busy_steps(log, trim=0.1)) == pytest.approx(0.9 * len(points), abs=2)


def test_step_logs_pooled_and_a_request_overhead_measured_under_load(tmp_path):
    """Several step logs fit together (each trimmed on its own: here none), the request overhead taken as
    replays measured it (their summaries, weighted by calls) instead of the base profile's; the CLI does the
    same with --step-log twice and --request-overhead-from."""
    from typer.testing import CliRunner

    from cwsim.steptime import load_profile
    from replay.calibrate_steps import (busy_steps, calibrate_from_steps, measured_request_overhead,
                                        step_in_progress_wait)
    from replay.cli import app

    truth = {**ROUND_PROFILE.to_json(), "step_overhead_s": 0.004, "prefill_token_s": 2e-5, "prefill_attn_pair_s": 3e-8,
             "decode_seq_s": 4e-4, "decode_ctx_token_s": 2e-7, "request_overhead_s": 0.002, "name": "truth"}
    base, log_a = _step_log(tmp_path / "a", truth)
    _, log_b = _step_log(tmp_path / "b", truth, seed=5)
    n_a, n_b = len(busy_steps(log_a, trim=0.0)), len(busy_steps(log_b, trim=0.0))
    prof = calibrate_from_steps([log_a, log_b], base, tmp_path / "fitted.json", trim=0.0, request_overhead_s=0.011)
    for k in TERMS:
        assert getattr(prof, k) == pytest.approx(truth[k], rel=1e-6), k
    assert prof.request_overhead_s == 0.011 and "11.0 ms as measured under the replays' load" in prof.source
    fit_ = json.loads((tmp_path / "fitted.json").read_text())["_fit"]
    assert fit_["steps"] == n_a + n_b and fit_["step_log"] == [str(log_a), str(log_b)]
    assert fit_["request_overhead_s"] == 0.011
    with pytest.raises(ValueError, match="must be >= 0 s"):
        calibrate_from_steps(log_a, base, tmp_path / "x.json", request_overhead_s=-0.001)
    # the replays' own figures, less each call's wait for the step in progress when it was sent (its run's
    # step log, wall clock from t0_unix): run0's 3 calls 10 ms outside the engine, one sent 4 ms before a
    # step's output (4 ms of waiting), one 1 ms after it (between steps: none), one before any step; run1's
    # one call 20 ms, sent while nothing ran
    steps = ("start_s,end_s,steps,prefill_tokens,attn_pairs,decode_seqs,decode_ctx,running,waiting\n"
             "1000.100,1000.150,1,10,10,0,0,1,0\n1000.151,1000.200,1,0,0,1,10,1,0\n")
    runs, logs = [], []
    for i, (outside, sent) in enumerate(((0.010, (0.146, 0.201, 0.05)), (0.020, (0.5,)))):
        run = tmp_path / f"run{i}"
        run.mkdir()
        (run / "summary.json").write_text(json.dumps({"outside_engine_s": outside, "requests": len(sent)}))
        (run / "run.json").write_text(json.dumps({"attempts": [{"t0_unix": 1000.0}]}))
        (run / "requests.csv").write_text("sent_s\n" + "".join(f"{t}\n" for t in sent))
        (tmp_path / f"steps{i}.csv").write_text(steps)
        runs.append(run)
        logs.append(tmp_path / f"steps{i}.csv")
    assert step_in_progress_wait(runs[0], logs[0]) == pytest.approx(0.004 / 3)
    assert step_in_progress_wait(runs[1], logs[1]) == 0.0
    want = (3 * (0.010 - 0.004 / 3) + 0.020) / 4
    assert measured_request_overhead(runs, logs) == pytest.approx(want)
    with pytest.raises(ValueError, match=r"2 run\(s\) for 1 step log\(s\)"):
        measured_request_overhead(runs, logs[:1])
    # a wait longer than the time outside the engine: not that run's log
    (runs[1] / "requests.csv").write_text("sent_s\n0.11\n")
    with pytest.raises(ValueError, match=r"run1: its calls waited 40.0 ms .* more than the 20.0 ms .*own step log"):
        measured_request_overhead(runs[1:], logs[1:])
    (runs[1] / "requests.csv").write_text("sent_s\n0.5\n")
    # a resumed run: its send times count from two starts
    (runs[0] / "run.json").write_text(json.dumps({"attempts": [{"t0_unix": 900.0}, {"t0_unix": 1000.0}]}))
    with pytest.raises(ValueError, match=r"run0: a resumed run \(2 attempts\)"):
        step_in_progress_wait(runs[0], logs[0])
    (runs[0] / "run.json").write_text(json.dumps({"attempts": [{"t0_unix": 1000.0}]}))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text(json.dumps({"requests": 5}))
    with pytest.raises(ValueError, match=r"--request-overhead-from .*old: its summary.json has no outside_engine_s"):
        measured_request_overhead([tmp_path / "old"], logs[:1])
    with pytest.raises(ValueError, match=r"--request-overhead-from .*nowhere: not a finished cwreplay run"):
        measured_request_overhead([tmp_path / "nowhere"], logs[:1])
    # the CLI: --step-log and --request-overhead-from pair up in order (a count that differs is refused)
    res = CliRunner().invoke(app, ["calibrate", "--step-log", str(logs[0]), "--step-log", str(logs[1]),
                                   "--step-log", str(log_a), "--base-profile", str(base), "--trim", "0",
                                   "--request-overhead-from", str(runs[0]), "--request-overhead-from", str(runs[1]),
                                   "--out", str(tmp_path / "cli.json")])
    assert res.exit_code == 2 and "2 run(s) for 3 step log(s)" in res.output
    res = CliRunner().invoke(app, ["calibrate", "--step-log", str(logs[0]), "--step-log", str(log_a),
                                   "--base-profile", str(base), "--trim", "0", "--request-overhead-from",
                                   str(runs[0]), "--request-overhead-from", str(runs[1]),
                                   "--out", str(tmp_path / "cli.json")])
    assert res.exit_code == 0, res.output
    # (run1's call, sent at 1000.5 s, finds no step of log_a running: that simulated log's clock ends long
    # before; so its 20 ms count whole, as above)
    want = (3 * (0.010 - 0.004 / 3) + 0.020) / 4
    assert f"{1e3 * want:.2f} ms (measured under the replays' load)" in res.output
    assert load_profile(tmp_path / "cli.json").request_overhead_s == pytest.approx(want)
    res = CliRunner().invoke(app, ["calibrate", "--request-overhead-from", str(runs[0]), "--out", str(tmp_path / "n.json")])
    assert res.exit_code == 2 and "--request-overhead-from goes with --step-log" in res.output


def test_a_step_log_that_is_not_one_is_a_one_line_error(tmp_path):
    from replay.calibrate_steps import calibrate_from_steps

    base, log = _step_log(tmp_path, ROUND_PROFILE.to_json())
    (tmp_path / "bad.csv").write_text('a,b\n1,2,3,"\n')
    with pytest.raises(ValueError, match=r"--step-log .*bad.csv: cannot read it as a CSV"):
        calibrate_from_steps(tmp_path / "bad.csv", base, tmp_path / "x.json")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match=r"not a step log \(no column 'start_s'"):
        calibrate_from_steps(tmp_path / "other.csv", base, tmp_path / "x.json")
    with pytest.raises(ValueError, match="--base-profile nope.json: profile file nope.json does not exist"):
        calibrate_from_steps(log, "nope.json", tmp_path / "x.json")
    few = tmp_path / "few.csv"
    few.write_text("\n".join(log.read_text().splitlines()[:5]) + "\n")
    with pytest.raises(ValueError, match="too few to fit"):
        calibrate_from_steps(few, base, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_a_lone_calls_prediction_chunks_its_prefill_by_the_step_budget():
    """``predicted_call_s(..., budget)``: a prefill longer than the budget takes a step per chunk, each
    attending to the cached tokens and the chunks before it; within the budget it is one step."""
    from replay.calibrate_server import predicted_call_s

    prof = ROUND_PROFILE
    one = predicted_call_s(prof, 480, 512, 3)
    assert predicted_call_s(prof, 480, 512, 3, 512) == one == pytest.approx(
        prof.step_time(480, prefill_attn_pairs(480, 512), 0, 0) + prof.step_time(0, 0, 1, 993)
        + prof.step_time(0, 0, 1, 994))
    assert predicted_call_s(prof, 1100, 0, 1, 512) == pytest.approx(
        prof.step_time(512, prefill_attn_pairs(512, 0), 0, 0) + prof.step_time(512, prefill_attn_pairs(512, 512), 0, 0)
        + prof.step_time(76, prefill_attn_pairs(76, 1024), 0, 0))


def test_a_tiny_model_size_that_vllm_cannot_run_is_refused(tmp_path):
    from replay.tiny_model import build_tiny_model

    with pytest.raises(ValueError, match="hidden_size 96: must be a positive multiple of 64"):
        build_tiny_model(tmp_path / "m", hidden_size=96)
    with pytest.raises(ValueError, match="layers 0"):
        build_tiny_model(tmp_path / "m", layers=0)
    assert not (tmp_path / "m").exists()


@pytest.mark.vllm
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed (pip install -e '.[vllm]'); CI installs it")
def test_a_larger_tiny_model_is_built_to_its_size_and_a_folder_of_another_size_is_rebuilt(tmp_path):
    from replay.tiny_model import TINY_VOCAB_SIZE, build_tiny_model

    path = tmp_path / "model"
    assert build_tiny_model(path, hidden_size=256, layers=1) == path
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (256, 512, 1)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (8, 4, 32)
    assert cfg["vocab_size"] == TINY_VOCAB_SIZE
    assert json.loads((path / "cachewise-tiny-model.json").read_text())["size"] == {"hidden_size": 256, "layers": 1}
    weights = (path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(path, hidden_size=256, layers=1) == path  # complete: kept as it is
    assert (path / "model.safetensors").stat().st_mtime_ns == weights
    build_tiny_model(path)  # the default size at the same folder: rebuilt
    cfg = json.loads((path / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]) == (128, 2, 4)
    assert "size" not in json.loads((path / "cachewise-tiny-model.json").read_text())
