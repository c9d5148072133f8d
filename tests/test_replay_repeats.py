"""replay.repeats: several live runs against an ensemble of simulated seeds (issue 10's report)."""

from pathlib import Path

import pytest

from replay.repeats import FIGURES, compare_repeats, live_figures, simulated_ensemble

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "notebooks" / "data" / "replay-example"
PROFILE = ROOT / "experiments" / "results" / "live-policy-2026-12-02" / "cpu-profile.json"


def _fig(evicted, preempt, hit, total, times):
    return {"evicted_blocks": evicted, "preemptions": preempt, "prefix_hit_rate": hit, "total_session_time_s": total,
            "session_times": times}


def test_means_errors_and_the_session_mape_of_means_by_hand():
    live = [_fig(100, 2, 0.5, 10.0, {"a": 4.0, "b": 6.0}), _fig(110, 4, 0.3, 14.0, {"a": 6.0, "b": 8.0, "c": 1.0})]
    sim = [_fig(99, 3, 0.4, 11.0, {"a": 5.5, "b": 7.0}), _fig(111, 3, 0.4, 13.0, {"a": 5.5, "b": 5.0})]
    c = compare_repeats(live, sim)
    assert (c["live_runs"], c["sim_seeds"]) == (2, 2)
    e = c["evicted_blocks"]
    assert (e["live"], e["sim"], e["live_range"], e["sim_range"], e["error"]) == (105.0, 105.0, [100.0, 110.0],
                                                                                   [99.0, 111.0], 0.0)
    assert e["live_interval"] == [100.0, 110.0] and e["inside"]  # two runs: the resampled means span them
    p = c["preemptions"]
    assert (p["live"], p["sim"], p["error"]) == (3.0, 3.0, 0.0)
    assert c["total_session_time_s"]["error"] == pytest.approx(0.0)
    assert c["prefix_hit_rate"]["sim"] == pytest.approx(0.4) and c["prefix_hit_rate"]["inside"]
    # sessions every run and seed finished: a (real 5, sim 5.5: 10%) and b (real 7, sim 6: 1/7); c is not in all
    assert c["sessions_compared"] == 2
    assert c["session_means"] == {"a": {"real": 5.0, "sim": 5.5}, "b": {"real": 7.0, "sim": 6.0}}
    assert c["session_time_mape_of_means"] == pytest.approx((0.1 + 1 / 7) / 2)


def test_a_simulated_mean_outside_the_live_interval_is_said_so():
    live = [_fig(100 + k, 0, 0.5, 10.0, {"a": 1.0}) for k in range(6)]
    sim = [_fig(150, 0, 0.5, 10.0, {"a": 1.0})]
    c = compare_repeats(live, sim)
    assert not c["evicted_blocks"]["inside"] and c["evicted_blocks"]["error"] == pytest.approx(150 / 102.5 - 1)
    assert c["preemptions"]["error"] == 0.0 and c["preemptions"]["inside"]  # none on either side
    c = compare_repeats(live, [_fig(150, 1, 0.5, 10.0, {"a": 1.0})])
    assert c["preemptions"]["error"] is None and not c["preemptions"]["inside"]  # none live: no relative error


def test_no_runs_is_an_error():
    with pytest.raises(ValueError, match="0 live runs and 1 simulated seeds"):
        compare_repeats([], [_fig(1, 0, 0.5, 1.0, {})])


def test_the_ensemble_of_a_real_run_without_jitter_is_its_comparisons_simulation_and_seeds_move_it():
    """On the committed live run (vLLM on CPU, the tool-mix trace): seeds without step jitter all give the
    comparison's own simulated figures; with jitter, the same seed gives the same figures twice."""
    import json

    from tests.oracle_workloads import tool_mix_sessions
    from traces.format import Trace

    trace = Trace(tool_mix_sessions(8, 6, seed=12), source="tool-mix")
    compare = json.loads((EXAMPLE / "compare.json").read_text())
    kw = dict(trace=trace, max_num_seqs=8, max_num_batched_tokens=512)
    flat = simulated_ensemble(EXAMPLE, str(PROFILE), seeds=2, step_jitter=0.0, **kw)
    assert [r["evicted_blocks"] for r in flat] == [compare["evicted_blocks"]["sim"]] * 2
    assert [r["preemptions"] for r in flat] == [compare["preemptions"]["sim"]] * 2
    assert flat[0] == flat[1] and len(flat[0]["session_times"]) == 8
    seen = []
    noisy = simulated_ensemble(EXAMPLE, str(PROFILE), seeds=3, step_jitter=0.2, on_seed=seen.append, **kw)
    assert seen == [0, 1, 2]
    assert noisy == simulated_ensemble(EXAMPLE, str(PROFILE), seeds=3, step_jitter=0.2, **kw)
    assert len({r["total_session_time_s"] for r in noisy}) == 3
    live = live_figures(EXAMPLE)
    assert {k: live[k] for k in FIGURES} == {k: json.loads((EXAMPLE / "summary.json").read_text())[k] for k in FIGURES}
    c = compare_repeats([live], flat)
    assert c["evicted_blocks"]["error"] == pytest.approx(compare["evicted_blocks"]["error"])
    assert c["session_time_mape_of_means"] == pytest.approx(compare["session_time_mape"])


def test_a_partial_run_is_refused(tmp_path):
    (tmp_path / "summary.json").write_text('{"partial": true, "stopped_by": "server gone"}')
    with pytest.raises(ValueError, match="partial \\(server gone\\); finish it with --resume"):
        live_figures(tmp_path)


def test_the_committed_mini_swe_study_reports_again_without_a_server(tmp_path):
    """experiments/live_miniswe.py on a finished study (every run's compare.json and the profile there):
    no server, no model; the report sets the repeats' means against a fresh ensemble, and the live side
    is the committed runs' own figures."""
    import importlib.util
    import json
    import shutil

    study = ROOT / "experiments" / "results" / "live-miniswe-2026-12-07-costly"
    out = tmp_path / "study"
    shutil.copytree(study, out)
    (out / "report.json").unlink()
    spec = importlib.util.spec_from_file_location("live_miniswe", ROOT / "experiments" / "live_miniswe.py")
    lm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lm)
    assert lm.main(["--out", str(out), "--kv-blocks", "128", "384", "--repeats", "6", "--sim-seeds", "2",
                    "--model-hidden", "1024", "--model-layers", "4", "--baseline-profile", ""]) == 0
    report = json.loads((out / "report.json").read_text())
    committed = json.loads((study / "report.json").read_text())
    assert [r["run"] for r in report["rows"]] == [r["run"] for r in committed["rows"]]
    pools = report["repeats"]["pools"]
    assert set(pools) == {"128", "384"} and pools["128"]["sim_seeds"] == 2
    for blocks in ("128", "384"):
        for key in ("live", "live_range", "live_interval"):
            assert pools[blocks]["evicted_blocks"][key] == committed["repeats"]["pools"][blocks]["evicted_blocks"][key]
    assert pools["384"]["evicted_blocks"]["sim"] == 180 and pools["384"]["preemptions"]["error"] == 0.0
    assert abs(pools["128"]["evicted_blocks"]["error"]) < 0.02  # two seeds: still within the 2%
    assert pools["128"]["session_time_mape_of_means"] < 0.10
    assert (out / "report.png").stat().st_size > 0


def _example_runs(tmp_path, n):
    """``n`` copies of the committed live run (repeats of one configuration) and the tool-mix trace file."""
    import shutil

    from tests.oracle_workloads import tool_mix_sessions
    from traces.reader import write_trace

    trace = tmp_path / "tool-mix.jsonl"
    write_trace(trace, [c for s in tool_mix_sessions(8, 6, seed=12) for c in s.calls])
    runs = []
    for k in range(n):
        run = tmp_path / "runs" / f"r{k}"
        shutil.copytree(EXAMPLE, run)
        runs.append(run)
    return runs, trace


def test_cwreplay_compare_one_run_and_several_repeats(tmp_path):
    """`cwreplay compare RUN`: the comparison; `cwreplay compare RUN RUN`: each one, then their mean against
    an ensemble, written to repeats.json beside the first run."""
    import json

    from typer.testing import CliRunner

    from replay.cli import app

    runs, trace = _example_runs(tmp_path, 2)
    flags = ["--profile", str(PROFILE), "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--trace", str(trace)]
    res = CliRunner().invoke(app, ["compare", str(runs[0]), *flags])
    assert res.exit_code == 0, res.output
    assert "evicted blocks: real 186, sim 177 (-4.8%)" in res.output and "live runs" not in res.output
    assert not (runs[0].parent / "repeats.json").exists()
    res = CliRunner().invoke(app, ["compare", *map(str, runs), *flags, "--seeds", "3"])
    assert res.exit_code == 0, res.output
    assert res.output.count("evicted blocks: real 186, sim 177") == 2
    assert "2 live runs against 3 simulated seeds" in res.output
    report = json.loads((runs[0].parent / "repeats.json").read_text())
    assert report["runs"] == list(map(str, runs)) and report["sim_seeds"] == 3
    assert report["evicted_blocks"]["live"] == 186 and report["evicted_blocks"]["live_range"] == [186, 186]
    assert report["session_time_mape_per_run"]["range"][0] == report["session_time_mape_per_run"]["range"][1]
    out = tmp_path / "elsewhere.json"
    res = CliRunner().invoke(app, ["compare", *map(str, runs), *flags, "--seeds", "1", "--out", str(out)])
    assert res.exit_code == 0 and json.loads(out.read_text())["sim_seeds"] == 1


def test_repeats_of_different_configurations_are_refused_naming_the_field(tmp_path):
    import json

    from typer.testing import CliRunner

    from replay.cli import app

    runs, trace = _example_runs(tmp_path, 2)
    state = json.loads((runs[1] / "run.json").read_text())
    state["config"]["agents"] = 2
    state["config"]["server"] = "http://elsewhere:1"  # differs between repeats anyway: not a configuration field
    (runs[1] / "run.json").write_text(json.dumps(state))
    res = CliRunner().invoke(app, ["compare", *map(str, runs), "--profile", str(PROFILE), "--max-num-seqs", "8",
                                   "--max-num-batched-tokens", "512", "--trace", str(trace), "--seeds", "1"])
    assert res.exit_code == 2
    last = res.output.strip().splitlines()[-1]
    assert last == f"error: {runs[1]}: agents is 2 where {runs[0]} has 4: repeats must share one configuration"
    assert not (runs[0].parent / "repeats.json").exists()
