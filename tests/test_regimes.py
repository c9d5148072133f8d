"""experiments/regimes.py --quick: each policy's ratio to vllm over gap scale x agents x pressure."""

import math

import pandas as pd
import pytest

from cwsim import regimes


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("regimes")
    assert regimes.main(["--quick", "--out", str(out), "--workers", "1", "--plain"]) == 0
    return out


def test_one_row_per_regime_and_policy_with_every_call_fitting(quick):
    df = regimes.load_results(quick)
    assert list(df.columns) == regimes.COLUMNS
    assert len(df) == 2 * 2 * 1 * 1 * 3  # gap scales x agents x block sizes x pressures x policies
    assert set(df["policy"]) == {"vllm", "cachewise", "continuum"}
    assert set(df["gap_scale"]) == {1.0, 100.0} and set(df["agents"]) == {4, 8}
    assert (df["sessions"] == 8).all()
    # the pool is ceil(peak / pressure) + 1 unless the largest call needs more: then the pressure reached is lower
    for _, r in df.iterrows():
        assert r["kv_blocks"] >= math.ceil(r["peak_blocks"] / r["pressure"]) + 1
        assert r["effective_pressure"] == pytest.approx(r["peak_blocks"] / (r["kv_blocks"] - 1), abs=1e-4)
        assert r["effective_pressure"] <= r["pressure"] + 1e-9


def test_longer_tools_make_sessions_longer_and_ratios_are_to_vllm(quick):
    df = regimes.load_results(quick)
    v = df.loc[df["policy"] == "vllm"].set_index(["gap_scale", "agents"])
    for a in (4, 8):
        assert v.loc[(100.0, a), "total_session_time_s"] > 10 * v.loc[(1.0, a), "total_session_time_s"]
    rt = pd.read_csv(quick / "ratios.csv")
    assert (rt.loc[rt["policy"] == "vllm", ["x_faster", "x_fewer_evictions"]] == 1.0).all().all()
    row = rt.loc[(rt["policy"] == "cachewise") & (rt["gap_scale"] == 1.0) & (rt["agents"] == 8)].iloc[0]
    raw = df.set_index(["policy", "gap_scale", "agents"])
    assert row["x_faster"] == pytest.approx(raw.loc[("vllm", 1.0, 8), "total_session_time_s"]
                                            / raw.loc[("cachewise", 1.0, 8), "total_session_time_s"])
    for stem in ("regimes_x_faster", "regimes_x_fewer_evictions"):
        png = quick / f"{stem}.png"
        assert png.exists() and png.stat().st_size > 5000


def test_a_rerun_skips_the_finished_runs_and_gives_the_same_rows(quick, capsys):
    before = regimes.load_results(quick)
    assert regimes.main(["--quick", "--out", str(quick), "--workers", "1", "--plain"]) == 0
    after = regimes.load_results(quick)
    pd.testing.assert_frame_equal(before, after)


def test_bad_axes_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        regimes.main(["--quick", "--out", str(tmp_path), "--gap-scales", "-1"])
    assert e.value.code == 2
    assert "--gap-scales: -1.0 is out of range" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        regimes.main(["--quick", "--out", str(tmp_path), "--agents", "four"])
    assert "comma-separated list of numbers" in capsys.readouterr().err
