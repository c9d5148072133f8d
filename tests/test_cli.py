"""The `cwsim` command line, run as a user would (through typer's runner)."""

import json

from typer.testing import CliRunner

from cwsim.cli import app

runner = CliRunner()


def test_run_on_the_bundled_trace_writes_results(tmp_path):
    out = tmp_path / "out"
    res = runner.invoke(app, ["run", "--max-sessions", "3", "--kv-blocks", "20000", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    for key in ("policy", "trace", "sessions", "requests", "kv_blocks", "block_size", "evicted_blocks",
                "harmful_evictions", "prefix_hit_rate", "recomputed_prompt_tokens", "preemptions",
                "total_session_time_s", "mean_session_time_s", "p99_session_time_s", "makespan_s", "wall_s"):
        assert key in summary, key
    assert summary["sessions"] == 3 and summary["kv_blocks"] == 20000
    assert summary["trace"].endswith("miniswe-deepseek.jsonl.gz")
    lines = (out / "requests.csv").read_text().splitlines()
    assert len(lines) == 1 + summary["requests"]
    assert "prefix hit rate" in res.output


def test_malformed_trace_names_file_line_and_field(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"session_id":"s","turn":0,"prompt":[["a",10]],"output_tokens":5}\n'
                   '{"session_id":"s","turn":1,"prompt":[["a",0]],"output_tokens":5}\n')
    res = runner.invoke(app, ["run", "--trace", str(bad)])
    assert res.exit_code == 2
    assert f"{bad}:2: prompt[0][1]" in " ".join(res.output.split())


def test_missing_trace_and_unknown_policy_are_clear_errors(tmp_path):
    res = runner.invoke(app, ["run", "--trace", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "nope.jsonl" in res.output
    res = runner.invoke(app, ["run", "--policy", "nope", "--max-sessions", "1"])
    assert res.exit_code == 2 and "unknown policy 'nope'" in res.output


def test_policies_lists_every_baseline():
    res = runner.invoke(app, ["policies"])
    assert res.exit_code == 0
    for name in ("vllm", "sglang", "belady", "infinite"):
        assert name in res.output


def test_import_converts_a_real_trace(tmp_path, shared_traces):
    from traces.reader import load_trace

    out = tmp_path / "mc.jsonl.gz"
    res = runner.invoke(app, ["import", "--format", "mooncake", str(shared_traces / "mooncake"), "-o", str(out)])
    assert res.exit_code == 0, res.output
    trace = load_trace(out)
    assert trace.num_calls == 12031
    assert trace.header["converted_by"].startswith("traces.importers.mooncake")


def test_import_unknown_format_and_missing_source(tmp_path):
    res = runner.invoke(app, ["import", "--format", "nope", str(tmp_path), "-o", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "unknown format 'nope'" in res.output
    res = runner.invoke(app, ["import", "--format", "mooncake", str(tmp_path / "absent"), "-o", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "absent" in res.output


def test_analyze_writes_json_and_figures(tmp_path):
    from tests.conftest import agent_trace
    from traces.reader import write_trace

    src = tmp_path / "t.jsonl"
    write_trace(src, agent_trace(4, 5).calls())
    res = runner.invoke(app, ["analyze", str(src), "--out", str(tmp_path / "a"), "--kv-blocks", "500"])
    assert res.exit_code == 0, res.output
    analysis = json.loads((tmp_path / "a" / "analysis.json").read_text())
    assert analysis["calls"] == 20 and analysis["kv_working_set"]["pool_blocks"] == 500
    assert len(list((tmp_path / "a").glob("*.png"))) >= 7


def test_synth_writes_a_loadable_trace(tmp_path):
    from traces.reader import load_trace

    out = tmp_path / "syn.jsonl.gz"
    res = runner.invoke(app, ["synth", "--sessions", "5", "--seed", "2", "-o", str(out), "--check-sessions", "0"])
    assert res.exit_code == 0, res.output
    trace = load_trace(out)
    assert len(trace.sessions) == 5 and trace.header["synthetic"] is True


def test_synth_closeness_with_the_working_set(tmp_path):
    from tests.conftest import agent_trace
    from traces.reader import write_trace

    src = tmp_path / "t.jsonl"
    write_trace(src, agent_trace(n_sessions=3, turns=3).calls())
    res = runner.invoke(app, ["synth", "--like", str(src), "--sessions", "3", "-o", str(tmp_path / "s.jsonl"),
                              "--working-set"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "closeness (cwsim.analysis.analyze)" in res.output and "kv_working_set.peak_blocks" in res.output


def test_shrink_writes_a_smaller_trace_that_runs(tmp_path):
    from traces.reader import load_trace

    small = tmp_path / "small.jsonl.gz"
    res = runner.invoke(app, ["shrink", "--token-scale", "20", "--max-turns", "5", "--max-sessions", "3",
                              "--max-gap-s", "10", "-o", str(small)])
    assert res.exit_code == 0, res.output
    assert "wrote 15 calls (3 sessions; tokens / 20, first 3 sessions, first 5 turns, gaps <= 10 s)" in \
        " ".join(res.output.split())
    tr = load_trace(small)
    assert tr.num_calls == 15 and max(c.next_gap_s for c in tr.calls()) <= 10
    assert tr.header["shrunk"] == "tokens / 20, first 3 sessions, first 5 turns, gaps <= 10 s"
    res = runner.invoke(app, ["run", "--trace", str(small), "--kv-blocks", "200"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["shrink", "--token-scale", "0", "-o", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "--token-scale" in res.output


def test_version_and_help_read_cleanly():
    from importlib.metadata import version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"cwsim {version('cachewise')}"
    for cmd in ([], ["run"], ["import"], ["shrink"], ["analyze"], ["synth"], ["policies"], ["profiles"]):
        res = runner.invoke(app, [*cmd, "--help"], terminal_width=200)
        assert res.exit_code == 0 and "<bool>" not in res.output, cmd
    res = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "400"})
    from cwsim.steptime import load_profile

    default = load_profile("llama-3.1-8b-h100").default_kv_blocks(16, 0.9)
    assert f"({default:,} for llama-3.1-8b-h100 at 0.9" in " ".join(res.output.split())


def test_one_option_scheme_across_commands(tmp_path):
    """--out / -o / --output on every command that writes; --trace on run and analyze."""
    from tests.conftest import agent_trace
    from traces.reader import write_trace

    src = tmp_path / "t.jsonl"
    write_trace(src, agent_trace(2, 3).calls())
    for i, flag in enumerate(["--out", "-o", "--output"]):
        res = runner.invoke(app, ["run", "--trace", str(src), "--kv-blocks", "2000", flag, str(tmp_path / f"r{i}")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / f"r{i}" / "summary.json").is_file()
        res = runner.invoke(app, ["synth", "--like", str(src), "--sessions", "1", "--check-sessions", "0",
                                  flag, str(tmp_path / f"s{i}.jsonl")])
        assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["analyze", "--trace", str(src), "-o", str(tmp_path / "a"), "--kv-blocks", "500"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "analysis.json").is_file()
    res = runner.invoke(app, ["analyze", str(src), "--trace", str(tmp_path / "other.jsonl")])
    assert res.exit_code == 2 and "--trace: give the trace once" in res.output


def test_summary_table_has_units():
    res = runner.invoke(app, ["run", "--max-sessions", "2", "--kv-blocks", "3000"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for row in ("evicted", "harmful evictions"):
        line = next(l for l in res.output.splitlines() if f"│ {row} " in l)
        assert line.rstrip(" │").endswith("blocks"), line
    assert "% of prompt tokens" in res.output and "swap-ins" not in res.output  # no tier: nothing to exclude
