"""`cwreplay oracle` rejects bad input with one line naming the flag or file (no vLLM needed)."""

from typer.testing import CliRunner

from replay.cli import app


def _run(*args):
    return CliRunner().invoke(app, ["oracle", *args])


def test_missing_trace_names_the_flag(tmp_path):
    res = _run("--trace", str(tmp_path / "nope.jsonl"), "--kv-blocks", "10", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2
    assert f"--trace {tmp_path / 'nope.jsonl'}" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_bad_values_name_the_flag(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"session_id":"s","turn":0,"prompt":[["a",10]],"output_tokens":2}\n')
    res = _run("--trace", str(trace), "--kv-blocks", "1", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "--kv-blocks must be >= 2" in res.output
    res = _run("--trace", str(trace), "--kv-blocks", "10", "--max-num-seqs", "64", "--max-num-batched-tokens", "32",
               "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "--max-num-batched-tokens (32) must be >= --max-num-seqs (64)" in res.output
    res = _run("--trace", str(trace), "--kv-blocks", "10", "--arrivals", "poisson", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "--arrivals must be concurrent or trace" in res.output


def test_malformed_trace_names_file_and_line(tmp_path):
    trace = tmp_path / "bad.jsonl"
    trace.write_text('{"session_id":"s","turn":0,"prompt":[["a",10]]}\n')
    res = _run("--trace", str(trace), "--kv-blocks", "10", "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and f"{trace}:1" in res.output and "output_tokens" in res.output


def test_bad_policy_flags_name_the_flag(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"session_id":"s","turn":0,"prompt":[["a",10]],"output_tokens":2}\n')
    base = ("--trace", str(trace), "--kv-blocks", "10", "--out", str(tmp_path / "o"))
    res = _run(*base, "--policy", "belady")
    assert res.exit_code == 2 and "--policy belady: runs in the simulator only" in res.output
    res = _run(*base, "--policy", "nope")
    assert res.exit_code == 2 and "--policy: unknown policy 'nope'" in res.output
    res = _run(*base, "--policy", "cachewise-sched", "--setting", "q=1")
    assert res.exit_code == 2 and "takes the settings ['aging_s'], not ['q']" in res.output
    res = _run(*base, "--policy", "lfu", "--setting", "oops")
    assert res.exit_code == 2 and "--setting 'oops': expected NAME=VALUE" in res.output
    res = _run(*base, "--policy", "lfu", "--policy-import", "no_such_module_xyz")
    assert res.exit_code == 2 and "--policy-import no_such_module_xyz: No module named" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o").exists()
