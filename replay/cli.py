"""`cwreplay`: a trace on a real vLLM engine, and the simulator held to it.

A thin layer over :mod:`replay.oracle`, :mod:`replay.compare`,
:mod:`replay.server` (``cwreplay serve``) and :mod:`replay.live`
(``cwreplay run``). Bad input and faults end with one line and exit code 2;
Ctrl-C / SIGTERM with one line and 130 / 143.
"""

from __future__ import annotations

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from traces.reader import TraceFormatError, load_trace

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run traces on a real vLLM engine and compare the simulator with it.")
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


@contextmanager
def _bad_input(trace: Path, *errors: type[Exception]):
    """A missing trace, a malformed one, a bad flag (or ``errors``): one line, exit 2."""
    try:
        yield
    except FileNotFoundError as e:
        console.print(f"error: --trace {trace}: {e.strerror or 'no such file'}")
        raise typer.Exit(code=2)
    except (TraceFormatError, ValueError, *errors) as e:
        console.print(f"error: {e}")
        raise typer.Exit(code=2)


@app.callback()
def main() -> None:
    """Run traces on a real vLLM engine and compare the simulator with it."""


@app.command()
def oracle(
    trace: Path = typer.Option(..., "--trace", help="Trace file (format v1)."),
    kv_blocks: int = typer.Option(..., "--kv-blocks", help="KV pool size in blocks, null block included (vLLM --num-gpu-blocks-override)."),
    block_size: int = typer.Option(32, "--block-size", help="Tokens per KV block (vLLM's CPU backend needs a multiple of 32)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="Most requests running at once."),
    max_num_batched_tokens: int = typer.Option(2048, "--max-num-batched-tokens", help="Token budget of one step."),
    arrivals: str = typer.Option("concurrent", "--arrivals", help="Session starts: concurrent (--agents at once) or trace (recorded)."),
    agents: int = typer.Option(4, "--agents", help="Concurrently active sessions, with --arrivals concurrent."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", help="Run only the first N sessions of the trace."),
    steps_per_s: float = typer.Option(1.0, "--steps-per-s", help="Engine steps per trace second: a gap of g s waits ceil(g * this) steps."),
    scheduler_reserve_full_isl: Optional[bool] = typer.Option(None, "--scheduler-reserve-full-isl/--no-scheduler-reserve-full-isl", show_default=False, help="vLLM's full-sequence admission check (default: vLLM's, on)."),
    watermark: Optional[float] = typer.Option(None, "--watermark", help="vLLM's admission watermark (share of blocks; default: vLLM's, 0)."),
    long_prefill_token_threshold: Optional[int] = typer.Option(None, "--long-prefill-token-threshold", help="vLLM's prefill chunk cap when several requests are eligible (default: vLLM's, 0)."),
    engine: str = typer.Option("model", "--engine", help="model: the real engine computes every step; emulated: vLLM's engine core, scheduler and KV cache manager with emulated model outputs (fast; needed for --async-scheduling)."),
    async_scheduling: bool = typer.Option(False, "--async-scheduling/--no-async-scheduling", metavar="", help="vLLM's AsyncScheduler and batch queue (two batches in flight), as GPU engines run by default; needs --engine emulated."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the tiny random-weight Llama, built locally)."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Run this project policy inside vLLM (the plugin; `cwsim policies` lists them; --compare simulates the same policy). Default: vLLM's own scheduler."),
    setting: list[str] = typer.Option([], "--setting", help="A policy setting NAME=VALUE (e.g. aging_s=30); repeatable."),
    policy_import: list[str] = typer.Option([], "--policy-import", help="A module to import first (it registers your own policy); repeatable."),
    compare_sim: bool = typer.Option(False, "--compare", help="Also run the trace in cwsim (unit-step profile) and print a per-call diff and the first divergence."),
    out: Path = typer.Option(..., "--out", help="Output folder: requests.csv, sessions.csv, evictions.csv, outputs.jsonl, summary.json (with --compare: oracle/, sim/, compare.json)."),
) -> None:
    """Run a trace on vLLM's own engine, in process, stepped by hand (time = engine steps)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from replay.oracle import OracleConfig, OracleError, run_oracle, step_trace

    with _bad_input(trace, OracleError):
        from replay.vllm_plugin.config import import_policy_modules

        import_policy_modules(policy_import)
        oc = OracleConfig(kv_blocks=kv_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, arrivals=arrivals, agents=agents,
                          max_sessions=max_sessions, steps_per_s=steps_per_s,
                          scheduler_reserve_full_isl=scheduler_reserve_full_isl, watermark=watermark,
                          long_prefill_token_threshold=long_prefill_token_threshold, engine=engine,
                          async_scheduling=async_scheduling, model=str(model) if model is not None else None,
                          policy=policy, policy_settings=parse_settings(setting))
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"--max-num-batched-tokens ({max_num_batched_tokens}) must be >= --max-num-seqs "
                             f"({max_num_seqs}), as vLLM requires")
        tr = load_trace(trace)
        if compare_sim:
            from replay.compare import compare, format_report

            c = compare(tr, oc, out)
            print(format_report(c))
            console.print(f"results in {out}/ (oracle/, sim/, compare.json)")
            if not c.exact:
                raise typer.Exit(code=1)
            return
        res = run_oracle(step_trace(tr, steps_per_s), oc, out)
    s = res.summary
    print(json.dumps({k: s[k] for k in ("sessions", "requests", "steps", "evicted_blocks", "preemptions",
                                        "prefix_hit_rate", "makespan_s")}, indent=1))
    console.print(f"results in {out}/ (summary.json, requests.csv, sessions.csv, evictions.csv, outputs.jsonl)")


class _Signals:
    """SIGTERM handled as Ctrl-C while a command runs; ``code`` the exit code to end with (130 / 143)."""

    def __enter__(self):
        self.code = 130
        self._old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def _on_term(self, signum, frame):
        self.code = 143
        raise KeyboardInterrupt

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


@app.command()
def serve(
    kv_blocks: int = typer.Option(..., "--kv-blocks", help="KV pool size in blocks, null block included (vLLM --num-gpu-blocks-override)."),
    block_size: int = typer.Option(32, "--block-size", help="Tokens per KV block (vLLM's CPU backend needs a multiple of 32)."),
    port: int = typer.Option(0, "--port", help="HTTP port on 127.0.0.1 (0: a free one)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the tiny random-weight Llama, built in --dir)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="Most requests running at once."),
    max_num_batched_tokens: int = typer.Option(2048, "--max-num-batched-tokens", help="Token budget of one step."),
    run_dir: Path = typer.Option(..., "--dir", help="Run folder: server.log, server.json, the KV event sockets, temp and cache folders."),
    policy: Optional[str] = typer.Option(None, "--policy", help="Run this project policy inside vLLM (the plugin; `cwsim policies` lists them). Default: vLLM's own scheduler."),
    setting: list[str] = typer.Option([], "--setting", help="A policy setting NAME=VALUE (e.g. aging_s=30); repeatable."),
    policy_import: list[str] = typer.Option([], "--policy-import", help="A module to import first (it registers your own policy); repeatable."),
    predictor_trace: Optional[Path] = typer.Option(None, "--predictor-trace", help="Trace the policy's tool-call predictor is fitted on (policies that use one)."),
    step_log: Optional[Path] = typer.Option(None, "--step-log", help="A CSV file the scheduler writes each step to (when it was scheduled and ran, prefill tokens, decoding sequences, ...: the columns of cwsim run --step-log). Installs the plugin, with vLLM's own policy unless --policy."),
) -> None:
    """Start a local vLLM server for replay and keep it in the foreground (Ctrl-C / SIGTERM stop it)."""
    from replay.server import ServerConfig, ServerError, start_server

    server = None
    with _Signals():
        try:
            cfg = ServerConfig(kv_blocks=kv_blocks, block_size=block_size, port=port, max_num_seqs=max_num_seqs,
                               max_num_batched_tokens=max_num_batched_tokens,
                               model=str(model) if model is not None else None, policy=policy,
                               policy_settings=parse_settings(setting), policy_imports=tuple(policy_import),
                               predictor_trace=str(predictor_trace) if predictor_trace is not None else None,
                               step_log=str(step_log) if step_log is not None else None)
            console.print(f"starting vLLM (log: {run_dir / 'server.log'}) ...")
            server = start_server(cfg, run_dir)
            print(f"url: {server.url}")
            print(f"events: {server.events}")
            print(f"events replay: {server.events_replay}")
            print(f"run with: cwreplay run --server {server.url} --events {server.events} --events-replay "
                  f"{server.events_replay} --vocab-size {server.vocab_size} --trace TRACE --out DIR", flush=True)
            code = server.process.wait()
            console.print(f"error: vLLM server exited with code {code} (log: {run_dir / 'server.log'})")
            raise typer.Exit(code=2)
        except (ValueError, ServerError) as e:
            console.print(f"error: {e}")
            raise typer.Exit(code=2)
        except KeyboardInterrupt:
            if server is not None:
                server.stop()
            console.print("stopped the vLLM server and its engine processes")
        finally:
            if server is not None and server.alive():
                server.stop()


def parse_settings(items: list[str]) -> tuple[tuple[str, object], ...]:
    """``--setting NAME=VALUE`` pairs; a value is a number when it reads as one."""
    out = []
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--setting {item!r}: expected NAME=VALUE")
        try:
            v: object = int(value)
        except ValueError:
            try:
                v = float(value)
            except ValueError:
                v = value
        out.append((name.strip(), v))
    return tuple(out)


@app.command("run")
def run_cmd(
    trace: Path = typer.Option(..., "--trace", help="Trace file (format v1)."),
    server: str = typer.Option(..., "--server", help="The vLLM server's URL (cwreplay serve prints it)."),
    events: Optional[str] = typer.Option(None, "--events", help="Its KV event endpoint (ZMQ PUB; cwreplay serve prints it). Without it no evictions are counted."),
    events_replay: Optional[str] = typer.Option(None, "--events-replay", help="Its KV event replay endpoint (fills lost batches; without it a lost batch is an error)."),
    out: Path = typer.Option(..., "--out", help="Output folder: requests.csv, sessions.csv, evictions.csv, outputs.jsonl, run.json, summary.json."),
    time_scale: float = typer.Option(1.0, "--time-scale", help="Multiply the trace's gaps (and recorded starts) by this."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", help="Replay only the first N sessions of the trace."),
    agents: int = typer.Option(4, "--agents", help="Concurrently active sessions, with --arrivals concurrent."),
    arrivals: str = typer.Option("concurrent", "--arrivals", help="Session starts: concurrent (--agents at once) or trace (recorded)."),
    max_in_flight: int = typer.Option(64, "--max-in-flight", help="Most requests open at once."),
    vocab_size: Optional[int] = typer.Option(None, "--vocab-size", help="The served model's vocabulary size (default: the tiny model's)."),
    stream: bool = typer.Option(False, "--stream", help="Stream answers and time the first token in the client (dearer; default: the server's per-request times)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out: keep its finished sessions, run the rest."),
    policy: str = typer.Option("vllm", "--policy", help="The policy the server runs (cwreplay serve --policy): recorded in summary.json and simulated by cwreplay compare."),
    predictor_trace: Optional[Path] = typer.Option(None, "--predictor-trace", help="The trace the server's predictor was fitted on (cwreplay serve --predictor-trace): recorded, and used by cwreplay compare."),
    setting: list[str] = typer.Option([], "--setting", help="A policy setting the server runs with (cwreplay serve --setting NAME=VALUE; repeatable): recorded, and given to the simulated policy by cwreplay compare."),
    warmup: bool = typer.Option(True, "--warmup/--no-warmup", help="Before the clock starts, send the first calls' shapes (fresh tokens) and empty the prefix cache again (POST /reset_prefix_cache: vLLM's dev mode, VLLM_SERVER_DEV_MODE=1, which cwreplay serve sets), so that a fresh server's one-off costs stay out of the timings."),
) -> None:
    """Replay a trace against a live vLLM server, closed loop, recording its KV events and metrics."""
    from cwsim.cli import _bar
    from replay.closed_loop import ArrivalError, ClosedLoop
    from replay.live import LiveConfig, ReplayError, ReplayInterrupted, run_live

    with _Signals() as sig, _bad_input(trace, ArrivalError):
        cfg = LiveConfig(server=server.rstrip("/"), events=events, events_replay=events_replay, time_scale=time_scale,
                         max_sessions=max_sessions, arrivals=arrivals, agents=agents, max_in_flight=max_in_flight,
                         stream=stream, policy=policy, warmup=warmup, policy_settings=parse_settings(setting),
                         predictor_trace=str(predictor_trace) if predictor_trace is not None else None)
        tr = load_trace(trace)
        ClosedLoop(tr.sessions[: max_sessions or None], arrivals, agents, time_scale)  # arrival errors before a call
        total = sum(len(s.calls) for s in tr.sessions[: max_sessions or None])
        try:
            with _bar("replay", "calls") as bar:
                task = bar.add_task("replay", total=total)
                res = run_live(tr, cfg, out, resume=resume, vocab_size=vocab_size,
                               on_progress=lambda n: bar.advance(task, n))
        except ReplayError as e:
            console.print(f"error: {e}; finished sessions kept in {out}/ (continue with --resume)")
            raise typer.Exit(code=2)
        except ReplayInterrupted as e:
            console.print(f"interrupted: {e.sessions_done} finished session(s) written to {out}/ "
                          "(summary.json marked partial; continue with --resume)")
            raise typer.Exit(code=sig.code)
    s = res.summary
    print(json.dumps({k: s[k] for k in ("sessions", "requests", "evicted_blocks", "preemptions", "prefix_hit_rate",
                                        "mean_session_time_s", "makespan_s", "event_gaps_recovered")}, indent=1))
    console.print(f"results in {out}/ (summary.json, requests.csv, sessions.csv, evictions.csv, outputs.jsonl)")


@app.command()
def calibrate(
    out: Path = typer.Option(..., "--out", help="Profile file to write (JSON; cwsim run --profile FILE loads it)."),
    server: Optional[str] = typer.Option(None, "--server", help="Time whole requests on this running server (cwreplay serve; nothing else may use it meanwhile) instead of the in-process engine's steps: the profile then has request_overhead_s, the latency a replay's call pays outside the engine."),
    max_num_batched_tokens: int = typer.Option(2048, "--max-num-batched-tokens", help="With --server: the server's --max-num-batched-tokens (a prefill point must fit one step)."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the tiny random-weight Llama, built locally; with --server: the folder the server names)."),
    name: Optional[str] = typer.Option(None, "--name", help="Profile name (default: measured-<model folder>)."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timings per design point, the median kept (default 3; with --server 7)."),
    quick: bool = typer.Option(False, "--quick", help="A small design (fewer, shorter batches): a rough profile in a fraction of the time."),
    frontend: bool = typer.Option(True, "--frontend/--no-frontend", help="With --server: also time decode steps while cached prompts arrive and fit the profile's frontend_step_share (the share of a step that competes with the frontend's work for a core; about 0.9 on a 2-core CPU machine)."),
    frontend_prompt: int = typer.Option(2000, "--frontend-prompt", help="With --server --frontend: the side client's cached prompt, in tokens (it and a decode batch must fit the pool)."),
    step_log: Optional[List[Path]] = typer.Option(None, "--step-log", help="Fit the step terms on a live server's own steps under load instead (its log: cwreplay serve --step-log; repeat the flag to pool several runs' steps, e.g. one policy that recomputes and one that hits), the rest from --base-profile; no engine is started."),
    base_profile: Optional[str] = typer.Option(None, "--base-profile", help="With --step-log: the profile the other fields come from (request_overhead_s, KV sizes: the server's calibration)."),
    trim: float = typer.Option(0.02, "--trim", help="With --step-log: the share of slowest busy steps left out of the fit."),
    overhead_from: Optional[List[Path]] = typer.Option(None, "--request-overhead-from", help="With --step-log: take request_overhead_s as measured under load by these finished replays instead of from --base-profile (cwreplay run folders, one for each --step-log, in the same order: each run's client latency outside vLLM's queue and steps, less its wait for the step in progress that the step log shows; weighted by calls); repeatable."),
) -> None:
    """Fit the step-time profile from timed engine steps over a designed set of batches (in process, or through a server's API), or from a live server's step log."""
    if overhead_from and not step_log:
        console.print("error: --request-overhead-from goes with --step-log (a fit on a live server's steps)")
        raise typer.Exit(code=2)
    if step_log:
        _calibrate_from_steps(step_log, base_profile, out, name, trim, server, overhead_from or [])
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from replay.calibrate import TERMS, CalibrationConfig, calibrate as run_calibration
    from replay.live import ReplayError
    from replay.oracle import OracleError
    from traces.files import OutputPathError

    show = lambda p: console.print(  # noqa: E731
        f"  {p['kind']} point " + " ".join(f"{k}={p[k]}" for k in ("q", "c", "b", "L") if k in p)
        + f": {1000 * p['t']:.2f} ms")
    try:
        if server is not None:
            from replay.calibrate_server import DEFAULT_CHECK, SERVER_TERMS, ServerCalibrationConfig, calibrate_server

            terms = SERVER_TERMS
            kw = {} if repeats is None else {"repeats": repeats}
            if quick:  # about 10 s
                kw.update(prefill_q=tuple(q for q in (16, 128, 480) if q <= max_num_batched_tokens) or (16,),
                          prefill_c=(0, 512), decode_b=(1, 8), decode_l=(64, 448), repeats=repeats or 3)
            kw["check"] = tuple(ch for ch in DEFAULT_CHECK if ch[0] <= max_num_batched_tokens)
            cfg = ServerCalibrationConfig(server, max_num_batched_tokens=max_num_batched_tokens, frontend=frontend,
                                          frontend_prompt=frontend_prompt,
                                          model=str(model) if model is not None else None, **kw)
            profile = calibrate_server(cfg, out, name=name, on_point=show)
        else:
            terms = TERMS
            cfg = CalibrationConfig(repeats=repeats or 3, model=str(model) if model is not None else None)
            if quick:
                cfg = CalibrationConfig(prefill_q=(32, 256, 1024), prefill_c=(0, 512), decode_b=(1, 8),
                                        decode_l=(64, 512), decode_steps=4, repeats=repeats or 3, kv_blocks=512,
                                        model=cfg.model)
            profile = run_calibration(cfg, out, name=name, on_point=show)
    except OutputPathError as e:
        console.print(f"error: --out {e}")
        raise typer.Exit(code=2)
    except (ValueError, OracleError, ReplayError) as e:
        console.print(f"error: {e}")
        raise typer.Exit(code=2)
    fit = json.loads(out.read_text())["_fit"]
    for k in terms:
        print(f"{k:22s} {getattr(profile, k):.4g}  (+- {fit['stderr'][k]:.2g})")
    print("MAPE: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in fit["mape"].items()))
    if fit.get("frontend"):
        fe = fit["frontend"]
        print(f"frontend_step_share    {fe['share']:.3g}  (decode step of {fe['batch']}: quiet "
              + " / ".join(f"{t:.2f}" for t in fe["quiet_ms"]) + " ms, loaded " + " / ".join(f"{t:.2f}" for t in fe["loaded_ms"])
              + f" ms; ratio {fe['ratio']:.2f})")
        if not fe.get("consistent", True):
            console.print("warning: the frontend probe's rounds disagree (the machine was not steady): "
                          "frontend_step_share is uncertain; calibrate again on a quiet machine")
    for ch in fit.get("check", []):
        print(f"held-out call {ch['q']} new on {ch['c']} cached, {ch['n']} out: measured {1000 * ch['t']:.1f} ms, "
              f"predicted {1000 * ch['predicted']:.1f} ms ({100 * ch['error']:+.1f}%)")
    console.print(f"profile written to {out} ({profile.source})")


def _calibrate_from_steps(step_log: List[Path], base: Optional[str], out: Path, name: Optional[str], trim: float,
                          server: Optional[str], overhead_from: List[Path]) -> None:
    from replay.calibrate import TERMS
    from replay.calibrate_steps import calibrate_from_steps, measured_request_overhead
    from traces.files import OutputPathError

    if server is not None:
        console.print("error: --step-log fits on a log already written: it takes no --server")
        raise typer.Exit(code=2)
    if base is None:
        console.print("error: --step-log needs --base-profile (the server's calibration: request_overhead_s, KV sizes)")
        raise typer.Exit(code=2)
    try:
        overhead = measured_request_overhead(overhead_from, step_log) if overhead_from else None
        profile = calibrate_from_steps(step_log, base, out, name=name, trim=trim, request_overhead_s=overhead)
    except OutputPathError as e:
        console.print(f"error: --out {e}")
        raise typer.Exit(code=2)
    except ValueError as e:
        console.print(f"error: {e}")
        raise typer.Exit(code=2)
    fit = json.loads(out.read_text())["_fit"]
    for k in TERMS:
        print(f"{k:22s} {getattr(profile, k):.4g}  (+- {fit['stderr'][k]:.2g})")
    print(f"{fit['steps']} busy steps ({', '.join(f'{n} {k}' for k, n in fit['kinds'].items())}): fitted "
          f"{fit['fitted_s']:.2f} s against {fit['measured_s']:.2f} s measured; MAPE {100 * fit['mape']['all']:.1f}%")
    print(f"request_overhead_s     {1e3 * profile.request_overhead_s:.2f} ms"
          + (" (measured under the replays' load)" if fit.get("request_overhead_s") is not None else " (the base profile's)"))
    console.print(f"profile written to {out}", markup=False)


@app.command("compare")
def compare_cmd(
    run_dirs: List[Path] = typer.Argument(..., help="A finished `cwreplay run` folder; several: repeats of one configuration."),
    profile: str = typer.Option(..., "--profile", help="Step-time profile for cwsim (a `cwreplay calibrate` file, or a bundled name)."),
    max_num_seqs: int = typer.Option(16, "--max-num-seqs", help="The server's --max-num-seqs."),
    max_num_batched_tokens: int = typer.Option(2048, "--max-num-batched-tokens", help="The server's --max-num-batched-tokens."),
    trace: Optional[Path] = typer.Option(None, "--trace", help="The trace file, if it has moved since the run."),
    predictor_trace: Optional[Path] = typer.Option(None, "--predictor-trace", help="The trace the server's predictor was fitted on (default: the run's --predictor-trace)."),
    seeds: int = typer.Option(16, "--seeds", min=1, help="With several runs: seeds of the simulated ensemble."),
    step_jitter: float = typer.Option(0.05, "--step-jitter", min=0.0, max=1.0, help="With several runs: the ensemble's step-time noise (cwsim run --step-jitter)."),
    out: Optional[Path] = typer.Option(None, "--out", help="With several runs: the report's file (default: repeats.json beside the first run)."),
) -> None:
    """Run a live replay's trace in cwsim (same pool, arrivals, time scale, policy) and print real vs simulated.

    With several runs of one configuration (each on a fresh server), each is compared, and then their mean
    against the mean of an ensemble of simulated seeds (``replay.repeats``): under pool pressure one run,
    live or simulated, is one sample."""
    from replay.live_compare import CompareError, compare_live
    from replay.repeats import check_repeats

    if len(run_dirs) > 1:
        with _bad_input(trace, CompareError):
            check_repeats(run_dirs)  # before any simulation
    for run_dir in run_dirs:
        with _bad_input(trace, CompareError):
            c = compare_live(run_dir, profile, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, trace=trace,
                             predictor_trace=predictor_trace)
        if len(run_dirs) > 1:
            print(f"{run_dir}:")
        _print_comparison(c)
        console.print(f"written: {run_dir}/compare.json, {run_dir}/compare_sessions.png, {run_dir}/sim/")
    if len(run_dirs) == 1:
        return
    from replay.repeats import format_repeats, repeats_report
    from traces.files import atomic_write_text

    path = out if out is not None else run_dirs[0].parent / "repeats.json"
    with _bad_input(trace, CompareError):
        report = repeats_report(run_dirs, profile, seeds=seeds, step_jitter=step_jitter, max_num_seqs=max_num_seqs,
                                max_num_batched_tokens=max_num_batched_tokens, trace=trace,
                                predictor_trace=predictor_trace)
    print("\n".join(format_repeats(report)))
    atomic_write_text(path, json.dumps(report, indent=2) + "\n")
    console.print(f"written: {path}")


def _print_comparison(c: dict) -> None:
    pct = lambda x: "n/a" if x is None else f"{100 * x:+.1f}%"  # noqa: E731
    share = lambda x: "n/a" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    print(f"evicted blocks: real {c['evicted_blocks']['real']}, sim {c['evicted_blocks']['sim']} "
          f"({pct(c['evicted_blocks']['error'])}); first differing eviction: {c['first_differing_eviction']}; "
          f"in common: {share(c['evicted_in_common'])}")
    print(f"preemptions: real {c['preemptions']['real']}, sim {c['preemptions']['sim']}")
    print(f"prefix hit rate: real {c['prefix_hit_rate']['real']:.4f}, sim {c['prefix_hit_rate']['sim']:.4f}")
    print(f"per-call latency MAPE {share(c['call_latency_mape'])}, per-session time MAPE {share(c['session_time_mape'])} "
          f"({share(c['session_busy_time_mape'])} less the trace's gaps)")
