"""experiments/compare_policies.py --quick: one row per (pressure, policy), sensible values, resumable."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def load_module():
    spec = importlib.util.spec_from_file_location("compare_policies", REPO / "experiments" / "compare_policies.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cp = load_module()
    out = tmp_path_factory.mktemp("compare")
    assert cp.main(["--quick", "--out", str(out)]) == 0
    return cp, out


def test_one_row_per_pressure_and_policy(quick_run):
    cp, out = quick_run
    rows = read_rows(out / "results.csv")
    assert list(rows[0].keys()) == cp.COLUMNS
    keys = [(float(r["pressure"]), r["policy"]) for r in rows]
    expected = {(p, pol) for p in (1.0, 2.0) for pol in ("vllm", "cachewise", "belady", "infinite")}
    assert len(keys) == len(set(keys)) == len(expected)
    assert set(keys) == expected
    for r in rows:
        assert int(r["sessions"]) == 8
        assert int(r["requests"]) > 0
        assert 0.0 <= float(r["prefix_hit_rate"]) <= 1.0
        assert 0 <= int(r["harmful_evictions"]) <= int(r["evicted_blocks"])
        assert float(r["total_session_time_s"]) > 0
        assert float(r["p99_session_time_s"]) <= float(r["total_session_time_s"])


def test_sensible_values(quick_run):
    _, out = quick_run
    rows = {(float(r["pressure"]), r["policy"]): r for r in read_rows(out / "results.csv")}
    for p in (1.0, 2.0):
        assert int(rows[p, "infinite"]["evicted_blocks"]) == 0
        assert int(rows[p, "infinite"]["harmful_evictions"]) == 0
    # a bigger pool (lower pressure) evicts less
    assert int(rows[2.0, "vllm"]["kv_blocks"]) < int(rows[1.0, "vllm"]["kv_blocks"])
    assert int(rows[2.0, "vllm"]["evicted_blocks"]) > int(rows[1.0, "vllm"]["evicted_blocks"])
    # the never-evicting pool is the fastest
    for p in (1.0, 2.0):
        inf_t = float(rows[p, "infinite"]["total_session_time_s"])
        assert all(float(rows[p, pol]["total_session_time_s"]) >= inf_t - 1e-6 for pol in ("vllm", "cachewise"))


def test_ratios_and_figures(quick_run):
    cp, out = quick_run
    ratios = read_rows(out / "ratios.csv")
    assert {r["policy"] for r in ratios} == {"vllm", "cachewise", "belady", "infinite"}
    vllm = next(r for r in ratios if r["policy"] == "vllm")
    assert float(vllm["x_fewer_evictions"]) == pytest.approx(1.0)
    assert float(vllm["x_faster"]) == pytest.approx(1.0)
    for name in ("evicted_blocks", "harmful_evictions", "prefix_hit_rate", "total_session_time", "p99_session_time"):
        png = out / f"{name}.png"
        assert png.exists() and png.stat().st_size > 1000, png


def test_resume_adds_nothing(quick_run):
    cp, out = quick_run
    before = (out / "results.csv").read_text()
    assert cp.main(["--quick", "--out", str(out), "--resume"]) == 0
    assert (out / "results.csv").read_text() == before


def test_the_runs_are_sweep_points_and_give_the_same_rows_in_one_process(quick_run, tmp_path):
    """The quick run went through a process pool (every core): one sweep point folder per run and the
    sweep's table; the same runs in this process (--workers 1) give the same rows, wall time aside."""
    cp, out = quick_run
    import pandas as pd

    table = pd.read_parquet(out / "sweep" / "results.parquet")
    assert len(table) == 8 and set(table["status"]) == {"ok"}
    assert all((out / "sweep" / "points" / pid / "summary.json").is_file() for pid in table["point_id"])
    assert cp.main(["--quick", "--out", str(tmp_path), "--workers", "1", "--policies", "vllm,belady"]) == 0
    strip = lambda rows: {(r["pressure"], r["policy"]): {k: v for k, v in r.items() if k != "wall_s"}  # noqa: E731
                          for r in rows}
    one = strip(read_rows(tmp_path / "results.csv"))
    assert len(one) == 4 and all(strip(read_rows(out / "results.csv"))[k] == v for k, v in one.items())


def test_each_run_reports_its_gap_to_the_eviction_bound_of_its_own_schedule(quick_run):
    cp, out = quick_run
    rows = {(float(r["pressure"]), r["policy"]): r for r in read_rows(out / "results.csv")}
    for (p, pol), r in rows.items():
        if pol == "infinite":  # never evicts: no bound
            assert r["bound_evicted_blocks"] == "" and r["evictions_vs_bound"] == ""
            continue
        assert 0 <= int(r["bound_evicted_blocks"]) <= int(r["evicted_blocks"])
        assert 0 <= int(r["bound_remisses"]) <= int(r["stream_remisses"])
    r = rows[2.0, "vllm"]
    assert float(r["evictions_vs_bound"]) == pytest.approx(int(r["evicted_blocks"]) / int(r["bound_evicted_blocks"]),
                                                           abs=1e-4)
    ratios = {x["policy"]: x for x in read_rows(out / "ratios.csv")}
    assert float(ratios["belady"]["evictions_vs_bound"]) >= 1.0
    assert ratios["infinite"]["evictions_vs_bound"] == ""
    png = out / "evictions_vs_bound.png"
    assert png.exists() and png.stat().st_size > 1000
    line = " ".join(cp.paper_check(cp.ratios(cp.load_results(out))))
    assert "of the bound under its own schedule" in line


def test_results_written_before_the_bound_still_load_but_do_not_resume(quick_run, tmp_path):
    cp, out = quick_run
    rows = read_rows(out / "results.csv")
    old = [c for c in cp.COLUMNS if c not in cp.BOUND_COLUMNS]
    with (tmp_path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    df = cp.load_results(tmp_path)
    assert df["bound_evicted_blocks"].isna().all() and len(df) == len(rows)
    figs = cp.make_figures(df)
    assert "evictions_vs_bound" not in figs and "evicted_blocks" in figs
    with pytest.raises(ValueError, match="other columns"):
        cp.main(["--quick", "--out", str(tmp_path), "--resume", "--workers", "1"])


def test_a_predictor_trained_on_another_trace_gives_rows_of_their_own(quick_run, tmp_path):
    """``--predictor-trace``: the predicting policies learn from another trace (here the bundled one
    with tools 50x slower); the rows are named for both traces, and each is the run ``simulate``
    gives with ``SimConfig.predictor_trace``."""
    from cwsim.config import SimConfig
    from cwsim.runner import DEFAULT_TRACE, simulate
    from traces import load_trace, write_trace
    from traces.transform import scale_gaps

    cp, out = quick_run
    slow = tmp_path / "slow.jsonl.gz"
    write_trace(slow, (c for s in scale_gaps(load_trace(DEFAULT_TRACE).sessions, 50.0) for c in s.calls))
    res = tmp_path / "res"
    assert cp.main(["--quick", "--out", str(res), "--workers", "1", "--policies", "vllm,cachewise",
                    "--predictor-trace", str(slow)]) == 0
    rows = read_rows(res / "results.csv")
    assert {r["trace"] for r in rows} == {"miniswe-deepseek@pred=slow"} and len(rows) == 4
    own = {(r["pressure"], r["policy"]): r for r in read_rows(out / "results.csv")}
    for r in rows:
        cfg = SimConfig(policy=r["policy"], kv_blocks=int(r["kv_blocks"]), agents=8, max_sessions=8,
                        predictor_trace=str(slow))
        assert int(r["evicted_blocks"]) == simulate(DEFAULT_TRACE, cfg).summary["evicted_blocks"]
        assert r["kv_blocks"] == own[(r["pressure"], r["policy"])]["kv_blocks"]
    changed = [r for r in rows if r["policy"] == "cachewise" and float(r["pressure"]) == 2.0
               and r["evicted_blocks"] != own[(r["pressure"], "cachewise")]["evicted_blocks"]]
    assert changed, "learning 50x slower tools should change what cachewise keeps"
    # experiments/predictor_transfer.py puts both runs' ratios to vllm side by side
    spec = importlib.util.spec_from_file_location("predictor_transfer", REPO / "experiments" / "predictor_transfer.py")
    pt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pt)
    assert pt.main(["--own", str(out), "--cross", str(res)]) == 0
    both = read_rows(res / "predictor_transfer.csv")
    assert len(both) == 4 and {r["trace"] for r in both} == {"miniswe-deepseek"}
    for r in both:
        mine = [x for x in rows if x["pressure"] == r["pressure"] and x["policy"] == r["policy"]][0]
        vllm = [x for x in rows if x["pressure"] == r["pressure"] and x["policy"] == "vllm"][0]
        assert float(r["x_faster_cross"]) == pytest.approx(
            float(vllm["total_session_time_s"]) / float(mine["total_session_time_s"]))
    with pytest.raises(SystemExit):
        cp.main(["--quick", "--out", str(res), "--predictor-trace", str(tmp_path / "missing.jsonl")])


def test_the_whole_policy_study_is_one_command():
    """experiments/policy_study.py --dry-run: every step's commands, with the flags the results'
    READMEs name; an unknown step is refused."""
    spec = importlib.util.spec_from_file_location("policy_study", REPO / "experiments" / "policy_study.py")
    ps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ps)
    plan = ps.commands(Path("/o"), Path("/t"), 1)
    assert list(plan) == list(ps.STEPS)
    cross = plan["crosstrain"][0]
    assert cross[cross.index("--predictor-trace") + 1] == "/t/deepseek_chat_dev.jsonl.gz"
    assert "--resume" in cross and cross[cross.index("--out") + 1] == "/o/compare-crosstrain"
    assert plan["crosstrain"][1][-4:] == ["--own", "/o/compare-heldout", "--cross", "/o/compare-crosstrain"]
    assert plan["live"] == [[sys.executable, str(REPO / "experiments" / "live_ratios.py"), "--repeats", "8",
                             "--sim-seeds", "16", "--model-hidden", "1024", "--model-layers", "4", "--min-idle-s",
                             "auto", "--out", "/o/live-ratios"]]
    assert all(Path(c[0]).exists() for cmds in plan.values() for c in cmds)  # the Python and the cwsim script
    assert ps.main(["--dry-run", "--out", "/o"]) == 0
    with pytest.raises(SystemExit):
        ps.main(["--dry-run", "--only", "nonsense"])


def test_live_ratios_are_vllms_figure_over_the_policys_live_and_simulated():
    """experiments/live_ratios.py: the ratio to vllm (> 1: a gain) on each side, and sim / live - 1."""
    spec = importlib.util.spec_from_file_location("live_ratios", REPO / "experiments" / "live_ratios.py")
    lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr)
    base = dict(evicted_live=600, evicted_sim=500, session_time_live=300.0, session_time_sim=240.0)
    ws = dict(evicted_live=200, evicted_sim=250, session_time_live=150.0, session_time_sim=100.0)
    r = lr.ratios({"vllm": base, "working-set": ws})
    assert r["vllm"]["evicted_ratio_live"] == 1.0 and r["vllm"]["evicted_ratio_gap"] == 0.0
    w = r["working-set"]
    assert (w["evicted_ratio_live"], w["evicted_ratio_sim"]) == (3.0, 2.0)
    assert w["evicted_ratio_gap"] == pytest.approx(2.0 / 3.0 - 1.0)
    assert (w["session_time_ratio_live"], w["session_time_ratio_sim"]) == (2.0, 2.4)
    assert w["session_time_ratio_gap"] == pytest.approx(0.2)
    none = lr.ratios({"vllm": base, "p": dict(ws, evicted_live=0)})["p"]  # nothing evicted live: no ratio
    assert none["evicted_ratio_live"] is None and none["evicted_ratio_gap"] is None
    assert lr._mean([dict(a=1.0, b=None), dict(a=3.0, b=2.0)]) == {"a": 2.0, "b": None}


def test_live_ratios_min_idle_is_seconds_or_two_full_prefill_steps(tmp_path):
    """experiments/live_ratios.py --min-idle-s: a number of seconds, or auto: two full-budget prefill steps of
    the profile the simulated side uses."""
    from cwsim.steptime import load_profile

    spec = importlib.util.spec_from_file_location("live_ratios", REPO / "experiments" / "live_ratios.py")
    lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr)
    sched = dict(max_num_seqs=8, max_num_batched_tokens=512)
    prof = "llama-3.1-8b-h100"
    assert lr.min_idle("auto", prof, sched) == 2 * load_profile(prof).full_prefill_step_s(512)
    assert lr.min_idle("0.3", prof, sched) == 0.3
    for bad, why in [("soon", "seconds, or auto"), ("-1", "must be >= 0")]:
        with pytest.raises(SystemExit, match=f"--min-idle-s '{bad}': {why}"):
            lr.min_idle(bad, prof, sched)


def test_live_interval_brackets_the_live_ratio_of_means_and_is_seeded():
    """experiments/live_ratios.py: the bootstrap interval of vllm's mean over the policy's, each side's
    repeats resampled; it holds the ratio of the means, narrows to a point when the repeats agree, and the
    same runs give the same interval."""
    spec = importlib.util.spec_from_file_location("live_ratios", REPO / "experiments" / "live_ratios.py")
    lr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lr)
    vllm = [300.0, 280.0, 260.0, 320.0]
    ws = [150.0, 120.0, 160.0, 140.0]
    per_run = {r: {"vllm": {"session_time_live": v}, "ws": {"session_time_live": w}}
               for r, (v, w) in enumerate(zip(vllm, ws))}
    lo, hi = lr.live_interval(per_run, "ws", "session_time")
    assert lo < sum(vllm) / sum(ws) < hi
    assert 260 / 160 <= lo and hi <= 320 / 120  # no resample's mean passes its side's extremes
    assert lr.live_interval(per_run, "ws", "session_time") == (lo, hi)
    flat = {r: {"vllm": {"evicted_live": 600}, "ws": {"evicted_live": 200}} for r in range(3)}
    assert lr.live_interval(flat, "ws", "evicted") == (3.0, 3.0)
    none = {0: {"vllm": {"evicted_live": 600}, "ws": {"evicted_live": 0}}}
    assert lr.live_interval(none, "ws", "evicted") is None


def test_live_steps_counts_the_calls_a_run_held_back_and_what_they_recomputed():
    """experiments/live_steps.py: a call that waited over 100 ms to be first scheduled was held back; the
    prompt tokens it and the other calls found uncached are counted apart."""
    import pandas as pd

    spec = importlib.util.spec_from_file_location("live_steps", REPO / "experiments" / "live_steps.py")
    ls = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ls)
    reqs = pd.DataFrame({"arrival_s": [0.0, 1.0, 2.0, 3.0], "first_scheduled_s": [0.05, 1.5, 2.08, 5.0],
                         "prompt_tokens": [100, 200, 300, 400], "cached_tokens": [90, 0, 300, 100]})
    held = ls.held_calls(reqs)
    assert held == {"calls": 2, "wait_s": pytest.approx(2.5), "missed_tokens": 200 + 300,
                    "others_missed_tokens": 10 + 0}
