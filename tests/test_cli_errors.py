"""Bad and unusual input, as a new user meets it: one ``error:`` line naming the flag, file, line or
field, exit code 2, no traceback, and nothing stale or half-written left looking like a result.
The bad inputs are fixtures in ``tests/data/bad/``."""

import json
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cwsim.cli import app
from cwsim.config import SimConfig
from cwsim.runner import SimulationInterrupted, simulate
from cwsim.scheduler import SimulationError
from tests.conftest import agent_trace, interrupt_cwsim
from traces.reader import write_trace

DATA = Path(__file__).parent / "data"
BAD = DATA / "bad"
runner = CliRunner()


def cwsim(*args) -> tuple[int, str]:
    res = runner.invoke(app, [str(a) for a in args])
    out = " ".join(res.output.split())  # rich may wrap long lines
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    return res.exit_code, out


def one_error(out: str) -> str:
    """The error line (the output holds exactly one)."""
    assert out.count("error:") == 1, out
    return out[out.index("error:"):]


@pytest.fixture
def small_trace(tmp_path) -> Path:
    path = tmp_path / "small.jsonl"
    write_trace(path, agent_trace(3, 3).calls())
    return path


# ------------------------------------------------------------------ crashes on valid, unusual input
def test_analyze_single_call_sessions(tmp_path):
    code, out = cwsim("analyze", BAD / "single_call_sessions.jsonl", "-o", tmp_path / "a")
    assert code == 0, out
    assert "n/a (no session has a second call)" in out and "n/a (no tool calls)" in out
    assert (tmp_path / "a" / "analysis.json").is_file()


def test_trace_that_is_a_folder(tmp_path):
    code, out = cwsim("run", "--trace", tmp_path, "--out", tmp_path / "r")
    assert code == 2
    assert one_error(out) == f"error: {tmp_path}:0: file: is a folder, not a trace file (.jsonl or .jsonl.gz)"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("cmd", ["run", "analyze"])
def test_out_naming_a_file_or_a_path_under_a_file(tmp_path, small_trace, cmd):
    f = tmp_path / "taken"
    f.write_text("mine\n")
    code, out = cwsim(cmd, "--trace", small_trace, "--out", f)
    assert code == 2 and one_error(out) == f"error: --out: {f}: is a file, not a folder"
    code, out = cwsim(cmd, "--trace", small_trace, "--out", f / "sub")
    assert code == 2 and one_error(out) == f"error: --out: {f / 'sub'}: cannot make this folder: {f} is a file"
    assert f.read_text() == "mine\n"


def test_import_and_synth_make_the_output_folder(tmp_path, small_trace):
    out = tmp_path / "new" / "deeper" / "syn.jsonl"
    code, text = cwsim("synth", "--like", small_trace, "--sessions", "2", "--check-sessions", "0", "-o", out)
    assert code == 0, text
    assert out.is_file()
    lm = tmp_path / "other" / "lm.jsonl"
    code, text = cwsim("import", "--format", "lmcache-agent", DATA / "lmcache-nested", "--out", lm)
    assert code == 0, text
    assert lm.is_file()


def test_output_file_that_is_a_folder(tmp_path, small_trace):
    code, out = cwsim("synth", "--like", small_trace, "--sessions", "2", "-o", tmp_path)
    assert code == 2 and one_error(out) == f"error: --out: {tmp_path}: is a folder; give a file name"
    assert list(tmp_path.iterdir()) == [small_trace]


# ------------------------------------------------------------------ unbounded memory
@pytest.mark.parametrize("name, field, what", [
    ("prompt_1e30_tokens.jsonl", "prompt", "a prompt of 1,000,000,000,000,000,000,000,000,000,000 tokens"),
    ("output_1e15_tokens.jsonl", "output_tokens", "an output of 1,000,000,000,000,000 tokens"),
])
@pytest.mark.parametrize("cmd", ["run", "analyze"])
def test_token_counts_past_the_ceiling(tmp_path, name, field, what, cmd):
    t0 = time.perf_counter()
    code, out = cwsim(cmd, "--trace", BAD / name, "--out", tmp_path / "r")
    assert time.perf_counter() - t0 < 60  # (no hashing for ever; the figure is not a benchmark)
    assert code == 2
    assert one_error(out) == (f"error: {BAD / name}:1: {field}: {what} exceeds the limit of "
                              "10,000,000 tokens per call")
    assert not (tmp_path / "r").exists()


def test_largest_request_is_checked_before_the_first_step(tmp_path):
    code, out = cwsim("run", "--trace", BAD / "prompt_9m_tokens.jsonl", "--kv-blocks", "20000", "--out", tmp_path / "r")
    assert code == 2
    assert one_error(out) == ("error: request of session 's' turn 1 needs 562532 blocks (9000504 tokens of prompt + "
                              "output) but the pool has 19999 usable blocks: raise --kv-blocks / --kv-gib")
    assert not (tmp_path / "r").exists()  # nothing written: no header-only CSVs


# ------------------------------------------------------------------ results that lie
def test_a_run_clears_an_earlier_runs_results(tmp_path, small_trace):
    out = tmp_path / "r"
    out.mkdir()
    for name in ("summary.json", "requests.csv", "sessions.csv"):
        (out / name).write_text("stale\n")
    (out / "notes.txt").write_text("mine\n")
    code, text = cwsim("run", "--trace", small_trace, "--kv-blocks", "2000", "--out", out)
    assert code == 0, text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is False and summary["sessions"] == 3
    assert len((out / "requests.csv").read_text().splitlines()) == 1 + 9
    assert (out / "notes.txt").read_text() == "mine\n"
    assert not list(out.glob("*.tmp"))


def test_a_bad_flag_leaves_an_earlier_run_untouched(tmp_path, small_trace):
    out = tmp_path / "r"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}\n')
    code, text = cwsim("run", "--trace", small_trace, "--kv-blocks", "1", "--out", out)
    assert code == 2 and one_error(text) == "error: --kv-blocks must be >= 2, got 1"
    assert (out / "summary.json").read_text() == '{"earlier": true}\n' and len(list(out.iterdir())) == 1


@pytest.mark.parametrize("exc, stopped_by", [(KeyboardInterrupt, "interrupt"), (SimulationError, "error: boom")])
def test_a_run_that_stops_early_writes_a_partial_summary(tmp_path, exc, stopped_by):
    out = tmp_path / "r"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}\n')
    done = []

    def progress(n):
        done.append(n)
        if len(done) == 2:
            raise exc("boom")

    with pytest.raises(SimulationInterrupted if exc is KeyboardInterrupt else SimulationError) as info:
        simulate(agent_trace(6, 3), SimConfig(kv_blocks=2000, agents=1), out, on_progress=progress)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True and summary["stopped_by"] == stopped_by
    assert summary["sessions"] == 2 and summary["sessions_in_trace"] == 6 and summary["requests"] == 6
    assert len((out / "sessions.csv").read_text().splitlines()) == 1 + 2
    if exc is KeyboardInterrupt:
        assert info.value.calls_done == 6 and info.value.out_dir == out


@pytest.fixture(scope="module")
def long_trace(tmp_path_factory) -> Path:
    """Long enough to interrupt: 1,000 synthetic sessions like the bundled trace (2026-12-07: the third
    session ends 1.6 s into an 11 s run; 300 sessions ran in 3 s in all, too near for a loaded machine)."""
    from cwsim.runner import DEFAULT_TRACE
    from traces.reader import load_trace
    from traces.synth import fit, iter_sessions

    path = tmp_path_factory.mktemp("long") / "long.jsonl.gz"
    write_trace(path, (c for s in iter_sessions(fit(load_trace(DEFAULT_TRACE)), 1000, 0) for c in s.calls))
    return path


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_reports_and_marks_partial_results(tmp_path, long_trace, sig, code):
    out = tmp_path / "r"
    out.mkdir()
    (out / "summary.json").write_text('{"earlier": true}\n')
    sessions = out / "sessions.csv"
    rc, stderr = interrupt_cwsim(["run", "--trace", long_trace, "--out", out], sig=sig,
                                 ready=lambda: sessions.exists() and len(sessions.read_text().splitlines()) >= 3)
    assert rc == code, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partial"] is True and summary["stopped_by"] == "interrupt"
    assert stderr.strip().splitlines()[-1] == f"error: interrupted after {summary['requests']} calls; partial results in {out}"
    assert len((out / "requests.csv").read_text().splitlines()) >= 1 + summary["requests"]


# ------------------------------------------------------------------ errors too late or too vague
def test_trace_arrivals_without_timestamps_write_nothing(tmp_path):
    code, out = cwsim("run", "--trace", BAD / "single_call_sessions.jsonl", "--arrivals", "trace", "--out", tmp_path / "r")
    assert code == 2
    assert one_error(out) == ("error: --arrivals trace needs recorded timestamps, but 3 session(s) have none "
                              "(first: 'a'); use --arrivals concurrent or poisson")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, message", [
    (["--kv-blocks", "1"], "--kv-blocks must be >= 2, got 1"),
    (["--kv-blocks", "100", "--kv-gib", "2"], "--kv-gib cannot be given together with --kv-blocks (give one, not both)"),
    (["--kv-gib", "0.00001"], "--kv-gib 1e-05 GiB holds 0 blocks of 16 tokens under --profile 'llama-3.1-8b-h100'; "
                              "the pool needs >= 2"),
    (["--gpu-memory-utilization", "0.1"], "--gpu-memory-utilization 0.1 leaves 0 KV blocks after the weights of "
                                          "--profile 'llama-3.1-8b-h100'; raise it or give --kv-blocks"),
    (["--agents", "0"], "--agents must be >= 1, got 0"),
    (["--arrivals", "sometimes"], "--arrivals must be concurrent, poisson or trace, not 'sometimes'"),
    (["--policy", "vllm", "--cpu-kv-blocks", "100"],
     "--cpu-kv-blocks: policy 'vllm' never offloads, so a CPU tier stays empty (policies that offload: tokencake)"),
    (["--policy", "sglang", "--predictor-trace", "x.jsonl"],
     "--predictor-trace: policy 'sglang' uses no tool-call predictor (policies that do: cachewise, cachewise-evict, "
     "continuum, pbkv, tokencake, working-set, working-set-evict)"),
    (["--policy", "cachewise", "--predictor-trace", "absent.jsonl"], "--predictor-trace: absent.jsonl: no such file"),
])
def test_run_flag_errors_name_the_flag(tmp_path, small_trace, args, message):
    code, out = cwsim("run", "--trace", small_trace, *args, "--out", tmp_path / "r")
    assert code == 2 and one_error(out) == f"error: {message}"
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, flag", [
    (["analyze", "--kv-blocks", "0"], "--kv-blocks"),
    (["synth", "--check-sessions", "-1", "-o", "x.jsonl"], "--check-sessions"),
])
def test_out_of_range_values_are_rejected(args, flag):
    code, out = cwsim(*args)
    assert code == 2 and f"Invalid value for '{flag}'" in out


def test_lmcache_import_searches_subfolders_and_says_why_nothing_converted(tmp_path):
    out = tmp_path / "lm.jsonl"
    code, text = cwsim("import", "--format", "lmcache-agent", DATA / "lmcache-nested", "-o", out)
    assert code == 0 and "wrote 2 calls (1 sessions)" in text
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    code, text = cwsim("import", "--format", "lmcache-agent", empty, "-o", tmp_path / "none.jsonl")
    assert code == 2
    assert one_error(text) == (f"error: nothing converted: no lmcache-agent files found in {empty} (subfolders "
                               "searched; expected: LMCache agent-trace proxy logs)")
    assert not (tmp_path / "none.jsonl").exists()
    bad = empty / "sub" / "x.jsonl"
    bad.write_text("not json\n")
    code, text = cwsim("import", "--format", "lmcache-agent", empty, "-o", tmp_path / "none.jsonl")
    assert code == 2 and one_error(text).startswith(f"error: nothing converted: 1 rejected, none converted (first: {bad}:1:")


def test_brackets_in_messages_and_paths_survive(tmp_path):
    path = BAD / "bracket[s].jsonl"
    code, out = cwsim("run", "--trace", path)
    assert code == 2
    assert one_error(out) == (f'error: {path}:1: prompt[1]: expected a [segment_id, n_tokens] pair, '
                              f'got string "[oops]"')


def test_the_step_log_needs_a_results_folder(tmp_path):
    """`cwsim run --step-log` writes OUT/steps.csv: without --out it is one error naming both flags; with
    it the log is there and listed."""
    code, out = cwsim("run", "--max-sessions", "1", "--kv-blocks", "20000", "--step-log")
    assert code == 2 and "--step-log" in one_error(out) and "--out" in one_error(out)
    code, out = cwsim("run", "--max-sessions", "1", "--kv-blocks", "20000", "--step-log", "--out", tmp_path / "r")
    assert code == 0 and "steps.csv" in out and "evictions.csv" not in out
    rows = (tmp_path / "r" / "steps.csv").read_text().splitlines()
    steps = json.loads((tmp_path / "r" / "summary.json").read_text())["steps"]
    assert sum(int(r.split(",")[2]) for r in rows[1:]) == steps
