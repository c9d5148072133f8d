"""`cwsim sweep` and :mod:`cwsim.sweep`: the grid, the same results through the process pool, Ray
and a plain ``simulate``, failing points, resume, interrupts and the command's errors."""

import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from cwsim.cli import app
from cwsim.config import SimConfig
from cwsim.runner import DEFAULT_TRACE, simulate
from cwsim.sweep import SweepError, SweepInterrupted, expand_grid, point_id, resolve_points, run_sweep
from tests.conftest import agent_trace, interrupt_cwsim
from traces.reader import write_trace

runner = CliRunner()


@pytest.fixture
def trace_file(tmp_path) -> Path:
    path = tmp_path / "small.jsonl"
    write_trace(path, agent_trace(3, 3).calls())  # largest call: under 450 blocks of 16 tokens
    return path


def small_spec(trace: Path, **over) -> dict:
    spec = {"trace": str(trace), "policy": ["vllm", "cachewise"], "kv_blocks": [450, 700], "agents": 2,
            "max_sessions": 3}
    spec.update(over)
    return spec


def figures(summary: dict) -> dict:
    """A summary without the wall time (the one figure that is not deterministic)."""
    return {k: v for k, v in summary.items() if k != "wall_s"}


# ------------------------------------------------------------------ the grid
def test_grid_is_the_product_in_key_order():
    pts = expand_grid({"policy": ["vllm", "sglang"], "agents": 4, "kv_blocks": [100, 200, 300]})
    assert len(pts) == 6
    assert pts[0] == {"policy": "vllm", "agents": 4, "kv_blocks": 100}
    assert [(p["policy"], p["kv_blocks"]) for p in pts] == [
        ("vllm", 100), ("vllm", 200), ("vllm", 300), ("sglang", 100), ("sglang", 200), ("sglang", 300)]


def test_point_ids_are_stable_and_distinct():
    a = expand_grid({"policy": ["vllm", "sglang"], "kv_blocks": [100, 200]})
    b = expand_grid({"kv-blocks": [200, 100], "policy": ["sglang", "vllm"]})  # other order, dashed key
    ids_a = {point_id(p) for p in a}
    assert len(ids_a) == 4 and ids_a == {point_id(p) for p in b}
    # pinned: the id is a function of the point alone (folders of earlier sweeps stay valid)
    assert point_id({"policy": "vllm", "kv_blocks": 100}) == point_id({"kv_blocks": 100, "policy": "vllm"})
    assert len(point_id({"policy": "vllm"})) == 12
    # 1 and 1.0 of a float option are one point
    assert expand_grid({"watermark": 0}) == expand_grid({"watermark": 0.0}) == [{"watermark": 0.0}]


@pytest.mark.parametrize("spec, message", [
    ({"kv_block": [1, 2]}, "kv_block: not a `cwsim run` option (did you mean kv_blocks?)"),
    ({"agents": []}, "agents: an empty list"),
    ({"agents": "four"}, "agents: must be an integer, got 'four'"),
    ({"decode_jumps": 1}, "decode_jumps: must be true/false, got 1"),
    ({"policy": None}, "policy: has no null value"),
])
def test_bad_keys_name_the_key_and_the_file(spec, message):
    with pytest.raises(SweepError) as e:
        expand_grid(spec, source="grid.toml")
    assert str(e.value).startswith(f"grid.toml: {message}")


def test_points_are_checked_before_anything_runs(tmp_path, trace_file):
    with pytest.raises(SweepError, match=r"^g\.toml: policy: unknown policy 'lru'; available: vllm"):
        resolve_points(small_spec(trace_file, policy=["vllm", "lru"]), "g.toml")
    with pytest.raises(SweepError, match=r"^g\.toml: kv_blocks: must be >= 2, got 1$"):
        resolve_points(small_spec(trace_file, kv_blocks=[450, 1]), "g.toml")
    with pytest.raises(SweepError, match=r"^g\.toml: trace: .*nope\.jsonl: no such file$"):
        resolve_points(small_spec(tmp_path / "nope.jsonl"), "g.toml")
    with pytest.raises(SweepError, match=r"^g\.toml: profile: unknown step-time profile .no-such-gpu."):
        resolve_points(small_spec(trace_file, profile="no-such-gpu"), "g.toml")


def test_relative_trace_is_taken_from_the_spec_folder(tmp_path, trace_file):
    (tmp_path / "grids").mkdir()
    grid = tmp_path / "grids" / "g.toml"
    grid.write_text('trace = "../small.jsonl"\npolicy = "vllm"\n')
    from cwsim.sweep import load_spec

    (p,) = resolve_points(load_spec(grid), grid)
    assert p.trace.resolve() == trace_file.resolve()
    (q,) = resolve_points({"policy": "vllm"})
    assert q.trace == DEFAULT_TRACE


# ------------------------------------------------------------------ the same results every way
def test_pool_and_ray_give_the_results_of_simulate(tmp_path, trace_file):
    try:
        import ray
    except ImportError:  # not a skip: the Ray path is part of the project (pip install -e '.[test,ray]')
        pytest.fail("Ray is not installed: install the [ray] extra (pip install -e '.[test,ray]')")
    spec = small_spec(trace_file)
    pool = run_sweep(spec, tmp_path / "pool", workers=2)
    assert not ray.is_initialized()
    by_ray = run_sweep(spec, tmp_path / "ray", workers=2, ray_address="local")
    assert not ray.is_initialized()  # the instance it started is stopped
    assert len(pool) == 4 and (pool["status"] == "ok").all()
    assert list(pool["point_id"]) == list(by_ray["point_id"])
    cols = [c for c in pool.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(pool[cols], by_ray[cols])
    pd.testing.assert_frame_equal(pool, pd.read_parquet(tmp_path / "pool" / "results.parquet"))
    assert pool["evicted_blocks"].nunique() > 1  # the grid's points differ
    for _, row in pool.iterrows():
        config = SimConfig(policy=row["policy"], kv_blocks=int(row["kv_blocks"]), agents=2, max_sessions=3)
        plain = simulate(trace_file, config, tmp_path / "plain" / row["point_id"])
        for how in ("pool", "ray"):
            folder = tmp_path / how / "points" / row["point_id"]
            assert figures(json.loads((folder / "summary.json").read_text())) == figures(plain.summary)
            for name in ("requests.csv", "sessions.csv"):
                assert (folder / name).read_bytes() == (plain.out_dir / name).read_bytes()
        assert row["evicted_blocks"] == plain.summary["evicted_blocks"]
        assert row["total_session_time_s"] == plain.summary["total_session_time_s"]
        assert row["kv_blocks_used"] == plain.summary["kv_blocks"]


def test_in_process_run_matches_the_pool(tmp_path, trace_file):
    spec = small_spec(trace_file, policy="vllm")
    one = run_sweep(spec, tmp_path / "one", workers=1)
    two = run_sweep(spec, tmp_path / "two", workers=2)
    cols = [c for c in one.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(one[cols], two[cols])


# ------------------------------------------------------------------ failures, resume, interrupts
def test_a_failing_point_is_recorded_and_the_others_finish(tmp_path, trace_file):
    seen = []
    df = run_sweep(small_spec(trace_file, kv_blocks=[20, 450]), tmp_path / "s", workers=2,
                   on_progress=lambda done, total, row: seen.append((done, total, row["status"])))
    assert list(df["status"]) == ["error", "ok", "error", "ok"]
    bad = df.loc[df["status"] == "error"]
    assert bad["error"].str.startswith("SimulationError: request of session").all()
    assert bad["evicted_blocks"].isna().all()
    assert (df.loc[df["status"] == "ok", "requests"] == 9).all()
    assert df.attrs["failed"] == 2 and df.attrs["ran"] == 4
    assert [s[:2] for s in seen] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert sorted(s[2] for s in seen) == ["error", "error", "ok", "ok"]
    for pid in bad["point_id"]:
        assert not (tmp_path / "s" / "points" / pid / "summary.json").exists()


def test_rerun_skips_finished_points_and_retries_failed_ones(tmp_path, trace_file):
    spec = small_spec(trace_file, kv_blocks=[20, 450])
    first = run_sweep(spec, tmp_path / "s", workers=1)
    ok = first.loc[first["status"] == "ok", "point_id"]
    stamps = {pid: (tmp_path / "s" / "points" / pid / "summary.json").stat().st_mtime_ns for pid in ok}
    # a point whose run stopped part way: redone
    victim = tmp_path / "s" / "points" / ok.iloc[0] / "summary.json"
    victim.write_text(json.dumps({**json.loads(victim.read_text()), "partial": True}))
    seen = []
    again = run_sweep(spec, tmp_path / "s", workers=1, on_progress=lambda done, total, row: seen.append(done))
    assert seen == [1, 2, 3, 4]
    assert again.attrs["skipped"] == 1 and again.attrs["ran"] == 3 and again.attrs["failed"] == 2
    assert (tmp_path / "s" / "points" / ok.iloc[1] / "summary.json").stat().st_mtime_ns == stamps[ok.iloc[1]]
    assert json.loads(victim.read_text())["partial"] is False
    cols = [c for c in first.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(first[cols], again[cols])


def test_interrupt_keeps_the_finished_points(tmp_path, trace_file):
    def stop_after_two(done, total, row):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(SweepInterrupted) as e:
        run_sweep(small_spec(trace_file), tmp_path / "s", workers=2, on_progress=stop_after_two)
    assert (e.value.done, e.value.total) == (2, 4)
    kept = pd.read_parquet(tmp_path / "s" / "results.parquet")
    assert len(kept) == 2 and (kept["status"] == "ok").all()
    finished = [p for p in (tmp_path / "s" / "points").iterdir() if (p / "summary.json").exists()]
    assert {p.name for p in finished} >= set(kept["point_id"])
    assert not list((tmp_path / "s").glob("*.tmp"))
    resumed = run_sweep(small_spec(trace_file), tmp_path / "s", workers=2)
    assert resumed.attrs["skipped"] >= 2 and len(resumed) == 4 and (resumed["status"] == "ok").all()


def _pool_workers() -> list[int]:
    """The process pool's workers: the children of this process's multiprocessing forkserver (only
    those: a server another test of this process started keeps its own children)."""
    def children(pid: int) -> list[int]:
        kids = []
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d.name))
            except OSError:  # gone meanwhile
                pass
        return kids

    servers = [c for c in children(os.getpid())
               if b"multiprocessing.forkserver" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(servers) == 1, servers
    return children(servers[0])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the pool's workers in /proc (Linux)")
def test_workers_killed_mid_sweep_fail_the_points_left_and_keep_the_finished(tmp_path, trace_file):
    """A worker killed (the OOM killer, a user's kill): the points finished stay ok, every other point
    is recorded as failed with the pool's error, and the sweep ends normally (no hang, no traceback)."""
    import signal as signals

    def kill_workers_after_the_first(done, total, row):
        if done == 1:
            workers = _pool_workers()
            assert len(workers) == 2
            for pid in workers:
                os.kill(pid, signals.SIGKILL)

    spec = small_spec(trace_file, seed=[0, 1, 2, 3])  # 16 points: more than the 4 in flight at once
    df = run_sweep(spec, tmp_path / "s", workers=2, on_progress=kill_workers_after_the_first)
    assert len(df) == 16 and df.attrs["ran"] == 16
    ok, failed = df.loc[df["status"] == "ok"], df.loc[df["status"] == "error"]
    assert len(ok) >= 1 and len(failed) >= 16 - 4  # at most the four in flight may have finished
    assert failed["error"].str.startswith("BrokenProcessPool: ").all()
    assert pd.read_parquet(tmp_path / "s" / "results.parquet")["status"].tolist() == df["status"].tolist()


def test_a_stop_while_the_last_table_is_written_still_writes_it(tmp_path, trace_file, monkeypatch):
    """Ctrl-C arriving in the final write of results.parquet (every point done): the table is written
    whole and the stop reported as such, not left at the last periodic flush."""
    import cwsim.sweep as sweep

    write = sweep._Table.write
    calls = []

    def interrupted_once(table):
        calls.append(table.done)
        if len(calls) == 1:  # the signal lands inside the first write, after its temporary file is made
            table.path.with_name(table.path.name + ".tmp").write_bytes(b"half")
            raise KeyboardInterrupt
        write(table)

    monkeypatch.setattr(sweep, "FLUSH_EVERY_S", float("inf"))  # no periodic flush: the first write is the final one
    monkeypatch.setattr(sweep._Table, "write", interrupted_once)
    with pytest.raises(SweepInterrupted) as e:
        run_sweep(small_spec(trace_file), tmp_path / "s", workers=1)
    assert (e.value.done, e.value.total) == (4, 4) and calls == [4, 4]
    kept = pd.read_parquet(tmp_path / "s" / "results.parquet")
    assert len(kept) == 4 and (kept["status"] == "ok").all()
    assert not list((tmp_path / "s").glob("*.tmp"))


# ------------------------------------------------------------------ the command
def cwsim(*args) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, " ".join(res.output.split())


def test_cli_sweep_and_resume(tmp_path, trace_file):
    grid = tmp_path / "g.toml"
    grid.write_text(f'trace = "{trace_file.name}"\npolicy = ["vllm", "sglang"]\nkv_blocks = 450\nmax_sessions = 2\n')
    code, out = cwsim("sweep", grid, "--out", tmp_path / "s", "--workers", "1")
    assert code == 0, out
    assert f"2 points: 2 run, 0 already done, 0 failed; results in {tmp_path / 's' / 'results.parquet'}" in out
    assert len(pd.read_parquet(tmp_path / "s" / "results.parquet")) == 2
    code, out = cwsim("sweep", grid, "--out", tmp_path / "s")
    assert code == 0 and "2 points: 0 run, 2 already done" in out


def test_cli_yaml_grid_with_a_failing_point(tmp_path, trace_file):
    grid = tmp_path / "g.yaml"
    grid.write_text(f"trace: {trace_file}\npolicy: vllm\nkv_blocks: [20, 450]\nmax_sessions: 2\n")
    code, out = cwsim("sweep", grid, "--out", tmp_path / "s", "--workers", "1")
    assert code == 1, out
    assert "2 points: 2 run, 0 already done, 1 failed" in out
    assert out.count("failed ") == 1 and "SimulationError: request of session" in out


@pytest.mark.parametrize("text, message", [
    ("kv_block = [100, 200]\n", "{grid}: kv_block: not a `cwsim run` option (did you mean kv_blocks?)"),
    ('policy = ["vllm", "lru"]\n', "{grid}: policy: unknown policy 'lru'; available: vllm"),
    ('trace = "missing.jsonl"\n', "{grid}: trace: {folder}/missing.jsonl: no such file"),
    ("agents = [1, \n", "{grid}: not valid TOML"),
])
def test_cli_errors_are_one_line(tmp_path, text, message):
    grid = tmp_path / "g.toml"
    grid.write_text(text)
    code, out = cwsim("sweep", grid, "--out", tmp_path / "s")
    assert code == 2, out
    assert out.count("error:") == 1
    assert out.startswith("error: " + message.format(grid=grid, folder=tmp_path)), out
    assert not (tmp_path / "s" / "results.parquet").exists()


def test_cli_missing_grid_file_and_bad_out(tmp_path):
    code, out = cwsim("sweep", tmp_path / "none.toml", "--out", tmp_path / "s")
    assert code == 2 and out == f"error: {tmp_path / 'none.toml'}: no such file"
    (tmp_path / "f").write_text("")
    grid = tmp_path / "g.toml"
    grid.write_text('policy = "vllm"\n')
    code, out = cwsim("sweep", grid, "--out", tmp_path / "f")
    assert code == 2 and out == f"error: --out: {tmp_path / 'f'}: is a file, not a folder"


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_interrupt_keeps_finished_points(tmp_path, sig, code):
    """A real process, stopped mid-sweep: one line, exit 130 / 143, the finished points kept."""
    N = 1000
    trace = tmp_path / "t.jsonl"
    # ~0.13 s a point here (2026-12-07): 1,000 points on two workers last about a minute, and the
    # first table is written after 2 s (FLUSH_EVERY_S), so the signal comes long before the end
    write_trace(trace, agent_trace(120, 12).calls())
    grid = tmp_path / "g.toml"
    grid.write_text(f'trace = "{trace}"\nkv_blocks = 1500\nagents = 3\nseed = {list(range(N))}\n'
                    'arrivals = "poisson"\n')
    out = tmp_path / "s"
    # results.parquet is first written once a point has finished and been recorded
    rc, stderr = interrupt_cwsim(["sweep", grid, "--out", out, "--workers", "2"], sig=sig,
                                 ready=lambda: (out / "results.parquet").exists())
    assert rc == code, stderr
    kept = pd.read_parquet(out / "results.parquet")
    assert 1 <= len(kept) < N and (kept["status"] == "ok").all()
    assert all((out / "points" / pid / "summary.json").is_file() for pid in kept["point_id"])
    assert stderr.strip().splitlines()[-1] == (f"error: interrupted; {len(kept)} of {N} points kept in "
                                               f"{out / 'results.parquet'}; rerun to resume")
    assert not (out / "results.parquet.tmp").exists()
