"""Shared test helpers: small synthetic agent traces and paths to real data."""

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cwsim.steptime import StepTimeProfile
from traces.format import Call, Session, ToolCall, Trace

REPO = Path(__file__).resolve().parents[1]
SHARED_TRACES = REPO.parent / "shared" / "data" / "traces"


def agent_trace(n_sessions: int = 8, turns: int = 12, seed: int = 0, system_tokens: int = 2000) -> Trace:
    """Agent-like sessions: a shared system prompt, then prompt k+1 = prompt k + answer + tool output."""
    rng = random.Random(seed)
    sessions = []
    for s in range(n_sessions):
        prompt = [("sys", system_tokens), (f"task{s}", rng.randint(200, 800))]
        calls = []
        for t in range(turns):
            out = rng.randint(20, 200)
            tool = ToolCall("bash", rng.choice(["grep", "read", "test"]), round(rng.uniform(0.1, 3.0), 3))
            calls.append(Call(f"s{s}", t, tuple(prompt), out, f"s{s}/a{t}", (tool,)))
            prompt = prompt + [(f"s{s}/a{t}", out), (f"s{s}/t{t}", rng.randint(50, 1500))]
        sessions.append(Session(f"s{s}", tuple(calls)))
    return Trace(sessions, source="synthetic")


@pytest.fixture
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"real traces not found at {SHARED_TRACES} (the shared data folder is absent on this clone)")
    return SHARED_TRACES


#: round step times, so timelines can be computed by hand
ROUND_PROFILE = StepTimeProfile(
    name="round", model="test", gpu="test",
    step_overhead_s=0.01, prefill_token_s=0.001, decode_seq_s=0.002,
    prefill_attn_pair_s=0.0, decode_ctx_token_s=0.0001,
    kv_bytes_per_token=1024, weights_bytes=0, gpu_mem_bytes=2**30,
)


@pytest.fixture
def round_profile(tmp_path) -> str:
    """Path of a profile file holding ROUND_PROFILE."""
    path = tmp_path / "round.json"
    path.write_text(json.dumps(ROUND_PROFILE.to_json()))
    return str(path)


def interrupt_cwsim(args: list[str], ready, sig) -> tuple[int, str]:
    """Run ``cwsim ARGS`` in a process, send it ``sig`` once ``ready()`` holds; (exit code, stderr).

    The process gets Python's own Ctrl-C handler, as from a terminal (a background child would
    inherit "ignore SIGINT")."""
    boot = "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); " \
           "from cwsim.cli import app; sys.argv[0] = 'cwsim'; app()"
    proc = subprocess.Popen([sys.executable, "-c", boot, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.05)
    assert proc.poll() is None, "the command ended before it could be interrupted"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert "Traceback" not in stderr
    return proc.returncode, stderr
