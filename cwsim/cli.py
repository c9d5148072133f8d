"""`cwsim`: the command line, a thin layer over :func:`cwsim.runner.simulate` and the ``traces`` library.

Every command that writes takes ``--out`` / ``-o`` (``--output`` too); commands that read a
trace take ``--trace``. Bad input ends in one ``error: ...`` line naming the flag, file, line
or field, exit code 2, no traceback. Ctrl-C and SIGTERM end with one line too (exit 130 / 143).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager
from importlib.metadata import version as _pkg_version
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperCommand, TyperGroup

from cwsim.config import SimConfig
from cwsim.policies import POLICIES, get_policy
from cwsim.runner import DEFAULT_TRACE, RESULT_FILES, SimulationInterrupted, simulate
from cwsim.scheduler import SimulationError
from cwsim.steptime import list_profiles, load_profile
from traces.files import OutputPathError, check_file, check_folder
from traces.reader import TraceFormatError, load_trace
from traces.stream import index_trace, num_calls


class _NoBoolHelp:
    """``--help`` (a flag) is listed without a ``<bool>`` type."""

    def get_help_option(self, ctx):
        opt = super().get_help_option(ctx)
        if opt is not None:
            opt.metavar = ""
        return opt


class _Command(_NoBoolHelp, TyperCommand):
    pass


class _Group(_NoBoolHelp, TyperGroup):
    pass


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True,
                  help="Simulate KV-cache policies for coding-agent sessions on a vLLM-like engine.")
command = lambda *a, **kw: app.command(*a, cls=_Command, **kw)  # noqa: E731
console = Console(stderr=True, soft_wrap=True)  # error lines keep paths whole

_D = SimConfig()
_DEFAULT_KV_BLOCKS = load_profile(_D.profile).default_kv_blocks(_D.block_size, _D.gpu_memory_utilization)
_KV_BLOCKS_DEFAULT = (f"Default: what the profile's GPU has left after the weights at --gpu-memory-utilization "
                      f"({_DEFAULT_KV_BLOCKS:,} for {_D.profile} at {_D.gpu_memory_utilization} and --block-size "
                      f"{_D.block_size}).")


def _version(value: bool) -> None:
    if value:
        print(f"cwsim {_pkg_version('cachewise')}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", metavar="", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Simulate KV-cache policies for coding-agent sessions on a vLLM-like engine."""


# ------------------------------------------------------------------------------ shared pieces
def _out_option(default, help: str):
    return typer.Option(default, "--out", "-o", "--output", help=help)


def _trace_option(help: str):
    return typer.Option(None, "--trace", help=help)


def fail(message: str, code: int = 2):
    """Print ``error: message`` (no markup: brackets stay) and exit with ``code``."""
    console.print(f"error: {message}", style="red", markup=False, highlight=False)
    raise typer.Exit(code=code)


def _message(e: Exception, out_flag: str | None) -> str:
    if isinstance(e, FileNotFoundError) and e.filename is not None:
        return f"{e.filename}: no such file or folder"
    if isinstance(e, OutputPathError) and out_flag is not None:
        return f"{out_flag}: {e}"
    return str(e)


class _Stop:
    """What a command reports when it is interrupted."""

    def __init__(self) -> None:
        self.signal = signal.SIGINT
        self.note = "nothing written"


@contextmanager
def _guarded(out_flag: str | None = None):
    """Bad input: one error line, exit 2. Ctrl-C / SIGTERM: one line, exit 130 / 143."""
    stop = _Stop()

    def on_term(signum, frame):
        stop.signal = signal.SIGTERM
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    except (TraceFormatError, FileNotFoundError, ValueError, SimulationError) as e:
        fail(_message(e, out_flag))
    except SimulationInterrupted as e:
        where = f"partial results in {e.out_dir}" if e.out_dir is not None else "no --out: nothing written"
        fail(f"interrupted after {e.calls_done} calls; {where}", 128 + stop.signal)
    except KeyboardInterrupt:
        fail(f"interrupted; {stop.note}", 128 + stop.signal)
    finally:
        signal.signal(signal.SIGTERM, old)


def _check_out_file(path: Path) -> None:
    try:
        check_file(path)
    except OutputPathError as e:
        fail(f"--out: {e}")


def _bar(label: str, unit: str | None = None) -> Progress:
    cols = [TextColumn(f"[bold]{label}[/]"), BarColumn()]
    if unit is not None:
        cols += [MofNCompleteColumn(), TextColumn(unit)]
    return Progress(*cols, TimeElapsedColumn(), console=console, transient=True)


@contextmanager
def _reading(label: str):
    """A progress bar over a trace file's bytes while it is read: yields the readers' ``progress``."""
    with Progress(TextColumn(f"[bold]{label}[/]"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(label, total=None)
        yield lambda done, size: bar.update(task, completed=done, total=size)


def _load(path: Path | None) -> "Trace":  # noqa: F821
    """Load a trace with a progress bar (bytes of the file) while it loads."""
    with _reading("loading") as progress:
        return load_trace(path if path is not None else DEFAULT_TRACE, progress=progress)


def _load_table(path: Path | None) -> "TraceTable":  # noqa: F821
    """Read a trace into compact columns (``traces.columnar``) with a progress bar over the file's bytes."""
    from traces.columnar import load_table

    with _reading("reading") as progress, _bar("columns", "sessions") as bar:
        task = bar.add_task("columns", total=None)
        return load_table(path if path is not None else DEFAULT_TRACE, progress=progress,
                          columns_progress=lambda done, total: bar.update(task, completed=done, total=total))


def _index(path: Path | None):
    """Read a trace for a run with a progress bar: indexed (``traces.stream``, the run streams its
    sessions) when its sessions' lines lie together, else loaded whole."""
    path = path if path is not None else DEFAULT_TRACE
    with _reading("reading") as progress:
        return index_trace(path, progress=progress) or load_trace(path, progress=progress)


def _num(v, spec: str, suffix: str = "") -> str:
    """``format(v, spec) + suffix``, or ``n/a`` where the figure is undefined (``None``)."""
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


# ------------------------------------------------------------------------------ run
@command()
def run(
    trace: Optional[Path] = _trace_option("Trace file (.jsonl or .jsonl.gz, format v1 or v2). Default: the bundled mini-swe-agent trace."),
    policy: str = typer.Option(_D.policy, "--policy", help="Policy name (see `cwsim policies`)."),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="KV pool size in blocks, null block included "
                                            f"(vLLM --num-gpu-blocks-override). {_KV_BLOCKS_DEFAULT}"),
    kv_gib: Optional[float] = typer.Option(None, "--kv-gib", help="KV pool size in GiB (converted with the profile's bytes per token)."),
    block_size: int = typer.Option(_D.block_size, "--block-size", help="Tokens per KV block."),
    profile: str = typer.Option(_D.profile, "--profile", help="Step-time profile: a bundled name (see `cwsim profiles`) or a JSON file."),
    max_num_seqs: int = typer.Option(_D.max_num_seqs, "--max-num-seqs", help="Most requests running at once."),
    max_num_batched_tokens: int = typer.Option(_D.max_num_batched_tokens, "--max-num-batched-tokens", help="Token budget of one step (chunked prefill)."),
    scheduler_reserve_full_isl: bool = typer.Option(_D.scheduler_reserve_full_isl, "--scheduler-reserve-full-isl/--no-scheduler-reserve-full-isl", metavar="", help="vLLM's full-sequence admission check: admit a request only when its whole prompt fits."),
    watermark: float = typer.Option(_D.watermark, "--watermark", help="vLLM's watermark: share of the pool's blocks kept free when admitting."),
    long_prefill_token_threshold: int = typer.Option(_D.long_prefill_token_threshold, "--long-prefill-token-threshold", help="vLLM's cap on one prefill chunk when several requests are eligible (0: none)."),
    async_scheduling: bool = typer.Option(_D.async_scheduling, "--async-scheduling/--no-async-scheduling", metavar="", help="vLLM's async scheduling (a step scheduled while the one before it runs; vLLM's default on GPUs). Default off: the plain scheduler, as vLLM runs on CPUs and with --no-async-scheduling."),
    gpu_memory_utilization: float = typer.Option(_D.gpu_memory_utilization, "--gpu-memory-utilization", help="Share of GPU memory for weights + KV when the pool size is derived from the profile."),
    arrivals: str = typer.Option(_D.arrivals, "--arrivals", help="Session starts: concurrent (fixed number of active agents), poisson, or trace (recorded)."),
    agents: int = typer.Option(_D.agents, "--agents", help="Concurrently active sessions, with --arrivals concurrent."),
    rate: float = typer.Option(_D.rate, "--rate", help="Sessions per second, with --arrivals poisson."),
    seed: int = typer.Option(_D.seed, "--seed", help="Random seed (Poisson arrivals, predictor error)."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", help="Simulate only the first N sessions of the trace."),
    predictor_trace: Optional[Path] = typer.Option(None, "--predictor-trace", help="Trace the tool-call predictor learns from (default: the simulated trace); only for policies with a predictor."),
    predictor_error: float = typer.Option(_D.predictor_error, "--predictor-error", help="Injected prediction error: idle predictions times exp(N(0, this))."),
    step_jitter: float = typer.Option(_D.step_jitter, "--step-jitter", help="Timing noise: every step's time times a lognormal factor of mean 1 whose log has this standard deviation, from --seed (0: none; steps are then taken one by one). Rerun with several seeds to see how far a result moves with it."),
    gap_scale: float = typer.Option(_D.gap_scale, "--gap-scale", help="Every gap between an answer and the session's next call (tool and client time) times this: tools 10x or 100x slower (the predictor learns the scaled gaps too)."),
    aging_s: float = typer.Option(_D.aging_s, "--aging-s", help="Prefix-aware scheduling: a request waiting longer than this goes first."),
    cpu_kv_blocks: Optional[int] = typer.Option(None, "--cpu-kv-blocks", help="CPU KV tier size in blocks (0: no tier), for a policy that offloads (tokencake). Default: the policy's (tokencake: the GPU pool size)."),
    cpu_kv_gib: Optional[float] = typer.Option(None, "--cpu-kv-gib", help="CPU KV tier size in GiB (converted with the profile's bytes per token; exclusive with --cpu-kv-blocks)."),
    pcie_gbps: float = typer.Option(_D.pcie_gbps, "--pcie-gbps", help="Effective PCIe bandwidth per direction to the CPU tier, GB/s."),
    offload_threshold_s: float = typer.Option(_D.offload_threshold_s, "--offload-threshold-s", help="Tokencake: offload during tool calls predicted to last longer than this (s)."),
    min_idle_s: float = typer.Option(_D.min_idle_s, "--min-idle-s", help="working-set: a session stays resident at least this long after its call ends (s; 0: the policy's learnt horizon alone). Where a step can outlast that horizon (tool times scaled down, a slow engine): about two full-budget prefill steps."),
    eviction_bound: bool = typer.Option(_D.eviction_bound, "--eviction-bound/--no-eviction-bound", metavar="", help="Also compute the fewest evictions any eviction order could have under this run's schedule (Belady's MIN on the blocks it referenced; docs/policies.md). Adds about 1 s per million block references and releases (11 s on the bundled trace at 12,000 blocks)."),
    out: Optional[Path] = _out_option(None, "Folder for summary.json, requests.csv, sessions.csv (CSVs written as the run goes, "
                                            "summary.json last; an earlier run's are removed first)."),
    step_log: bool = typer.Option(False, "--step-log", metavar="", help="Also write OUT/steps.csv: every engine iteration's start, end, steps (a decode jump runs several), prefill tokens, attention pairs, decoding sequences and context, running and waiting requests (to set beside a live server's: cwreplay serve --step-log)."),
) -> None:
    """Simulate a trace under one policy and print a summary."""
    with _guarded("--out") as stop:
        config = SimConfig(policy=policy, kv_blocks=kv_blocks, kv_gib=kv_gib, block_size=block_size, profile=profile,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           scheduler_reserve_full_isl=scheduler_reserve_full_isl, watermark=watermark,
                           long_prefill_token_threshold=long_prefill_token_threshold, async_scheduling=async_scheduling,
                           gpu_memory_utilization=gpu_memory_utilization, arrivals=arrivals, agents=agents, rate=rate,
                           seed=seed, max_sessions=max_sessions,
                           predictor_trace=str(predictor_trace) if predictor_trace is not None else None,
                           predictor_error=predictor_error, gap_scale=gap_scale, step_jitter=step_jitter, aging_s=aging_s,
                           cpu_kv_blocks=cpu_kv_blocks,
                           cpu_kv_gib=cpu_kv_gib, pcie_gbps=pcie_gbps, offload_threshold_s=offload_threshold_s,
                           min_idle_s=min_idle_s, eviction_bound=eviction_bound)
        _check_policy_flags(config)
        if step_log and out is None:
            fail("--step-log: writes OUT/steps.csv, so it needs --out")
        if out is not None:
            check_folder(out)
        tr = _index(trace)
        n_calls = num_calls(tr, max_sessions)
        with _bar("simulating", "calls") as bar:
            task = bar.add_task("sim", total=n_calls)
            result = simulate(tr, config, out, on_progress=lambda n: bar.advance(task, n), step_log=step_log)
    _print_summary(result.summary)
    if out is not None:
        console.print(f"results in {out}/ ({', '.join(f for f in RESULT_FILES if (out / f).is_file())})", markup=False)


def _check_policy_flags(config: SimConfig) -> None:
    """Flags the chosen policy would ignore are errors, not silently accepted."""
    spec = get_policy(config.policy)
    tier = "--cpu-kv-blocks" if config.cpu_kv_blocks else "--cpu-kv-gib" if config.cpu_kv_gib else None
    if tier is not None and not spec.offloads:
        users = ", ".join(s.name for s in POLICIES.values() if s.offloads)
        fail(f"{tier}: policy {spec.name!r} never offloads, so a CPU tier stays empty (policies that offload: {users})")
    for name in sorted({p for s in POLICIES.values() for p in s.params} & set(SimConfig.__dataclass_fields__)):
        # a policy setting the configuration holds (--aging-s, --offload-threshold-s, --min-idle-s, ...)
        if getattr(config, name) != getattr(_D, name) and name not in spec.params:
            users = ", ".join(s.name for s in POLICIES.values() if name in s.params)
            fail(f"--{name.replace('_', '-')}: policy {spec.name!r} does not take {name} (policies that do: {users})")
    if config.predictor_trace is not None:
        if not spec.needs_predictor:
            users = ", ".join(s.name for s in POLICIES.values() if s.needs_predictor)
            fail(f"--predictor-trace: policy {spec.name!r} uses no tool-call predictor (policies that do: {users})")
        if not Path(config.predictor_trace).is_file():
            fail(f"--predictor-trace: {config.predictor_trace}: no such file")


def _print_summary(s: dict) -> None:
    table = Table(title=escape(f"cwsim: {s['policy']} on {Path(s['trace']).name}"), show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    tier = bool(s.get("cpu_kv_blocks"))
    rows = [
        ("sessions / requests", f"{s['sessions']:,} / {s['requests']:,}"),
        ("KV pool", f"{s['kv_blocks']:,} blocks x {s['block_size']} tokens" if s["kv_blocks"] else "unbounded"),
        ("profile", s["profile"]),
        ("evicted", f"{s['evicted_blocks']:,} blocks"),
        ("harmful evictions", f"{s['harmful_evictions']:,} blocks"),
        *([("eviction bound, this schedule", f"{s['bound_evicted_blocks']:,} blocks ("
            + "evicted = " + _num(s["evictions_vs_bound"], ".2f", "x this)"))] if "bound_evicted_blocks" in s else []),
        ("prefix hit rate" + (" (GPU; swap-ins excluded)" if tier else ""),
         f"{s['prefix_hit_rate']:.1%} of prompt tokens"),
        ("recomputed prompt tokens", f"{s['recomputed_prompt_tokens']:,} tokens"),
        ("preemptions", f"{s['preemptions']:,} requests"),
        *([("CPU tier", f"{s['cpu_kv_blocks']:,} blocks"),
           ("offloaded / prefetched / swapped in", f"{s['offloaded_blocks']:,} / {s['prefetched_blocks']:,} / "
                                                   f"{s['swap_in_hits']:,} blocks"),
           ("swapped-in tokens (not in hit rate)", f"{s['swapped_in_tokens']:,} tokens")]
          if tier else []),
        ("total session time", f"{s['total_session_time_s']:,.1f} s"),
        ("mean / p99 session time", f"{s['mean_session_time_s']:,.1f} / {s['p99_session_time_s']:,.1f} s"),
        ("makespan", f"{s['makespan_s']:,.1f} s"),
        ("wall time", f"{s['wall_s']:.2f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


# ------------------------------------------------------------------------------ sweep
@command()
def sweep(
    config: Path = typer.Argument(..., metavar="CONFIG", help="Grid file (.toml, .yaml): `cwsim run` options and trace, each one value or a list."),
    out: Path = _out_option(..., "Folder for results.parquet and points/<id>/ (a rerun skips the finished points)."),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes (default: every core); with --ray-address local, the CPUs of the Ray instance."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Run the points as Ray tasks: local (start Ray here), auto or an address (join a cluster)."),
) -> None:
    """Simulate every point of a grid of configurations; one row per point in results.parquet."""
    from cwsim.sweep import RESULTS_FILE, SweepInterrupted, run_sweep

    with _guarded("--out") as stop:
        check_folder(out)
        with _bar("sweeping", "points") as bar:
            task = bar.add_task("sweep", total=None)
            try:
                df = run_sweep(config, out, workers=workers, ray_address=ray_address,
                               on_progress=lambda done, total, row: bar.update(task, completed=done, total=total))
            except SweepInterrupted as e:
                stop.note = f"{e.done} of {e.total} points kept in {out / RESULTS_FILE}; rerun to resume"
                raise
        stop.note = f"all {len(df)} points were written to {out / RESULTS_FILE}"  # a stop while reporting
        failed = df.loc[df["status"] != "ok"]
        console.print(f"{len(df)} points: {df.attrs['ran']} run, {df.attrs['skipped']} already done, "
                      f"{len(failed)} failed; results in {out / RESULTS_FILE}", markup=False)
        for _, r in failed.iterrows():
            console.print(f"failed {r['point_id']}: {r['error']}", markup=False, style="red")
    if len(failed):
        raise typer.Exit(code=1)


# ------------------------------------------------------------------------------ traces
@command("import")
def import_(
    src: list[Path] = typer.Argument(..., help="Files or folders to convert (folders are searched with their subfolders)."),
    fmt: str = typer.Option(..., "--format", "-f", help="Source format: mini-swe-agent, swe-agent, tracelab, mooncake, lmcache-agent."),
    output: Path = _out_option(..., "Output trace (.jsonl or .jsonl.gz); its folder is made if needed."),
) -> None:
    """Convert a public trace format into trace format v2 (content-free, compact lines)."""
    from traces.importers import run_import
    from traces.reader import write_trace

    _check_out_file(output)
    with _guarded("--out"):
        total = sum(p.stat().st_size for s in src if s.exists()
                    for p in ([s] if s.is_file() else s.rglob("*")) if p.is_file())
        with _bar("reading") as bar:
            task = bar.add_task("read", total=None)
            calls, report, header = run_import(fmt, src, progress=lambda n: bar.advance(task, n))
        Console().print(report.render(), markup=False, highlight=False)
        if not calls:
            fail(f"nothing converted: {_why_nothing(fmt, src, report)}")
        n = write_trace(output, calls, header)
    console.print(f"wrote {n} calls ({report.sessions} sessions) to {output}"
                  + (f" from {total:,} bytes" if total else ""), markup=False)


@command()
def shrink(
    trace: Optional[Path] = _trace_option("Trace to shrink (default: the bundled trace)."),
    output: Path = _out_option(..., "Output trace (.jsonl or .jsonl.gz); its folder is made if needed."),
    token_scale: int = typer.Option(1, "--token-scale", min=1, help="Divide every segment's token count by this (at least 1 token each)."),
    max_turns: Optional[int] = typer.Option(None, "--max-turns", min=1, help="Keep each session's first N calls."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", min=1, help="Keep the first N sessions."),
    max_gap_s: Optional[float] = typer.Option(None, "--max-gap-s", min=0.0, help="Cut longer gaps to this (s)."),
) -> None:
    """A smaller trace of the same shape: fewer sessions, turns and tokens (a CPU-size replay, `cwreplay run`)."""
    from traces.reader import write_trace
    from traces.transform import shrink as shrink_trace

    _check_out_file(output)
    with _guarded("--out"):
        small = shrink_trace(_load(trace), token_scale=token_scale, max_turns=max_turns, max_sessions=max_sessions,
                             max_gap_s=max_gap_s)
        n = write_trace(output, small.calls(), small.header or None)
    console.print(f"wrote {n} calls ({len(small.sessions)} sessions; {small.header.get('shrunk', small.source)}) "
                  f"to {output}", markup=False)


def _why_nothing(fmt: str, src: list[Path], report) -> str:
    from traces.importers import IMPORTERS

    where = ", ".join(map(str, src))
    if report.files_read == 0:
        return (f"no {fmt} files found in {where} (subfolders searched; expected: "
                f"{IMPORTERS[fmt].description})")
    if report.rejected:
        where_, reason = report.rejected[0]
        return f"{len(report.rejected)} rejected, none converted (first: {where_}: {reason})"
    return f"the {report.files_read} file(s) read hold no LLM calls"


@command()
def analyze(
    trace_arg: Optional[Path] = typer.Argument(None, metavar="TRACE", help="Trace to analyse (or --trace; default: the bundled trace)."),
    trace: Optional[Path] = _trace_option("Trace to analyse (same as the TRACE argument)."),
    out: Path = _out_option(Path("runs/analysis"), "Folder for analysis.json and the PNG figures."),
    block_size: int = typer.Option(16, "--block-size", min=1, help="Tokens per KV block."),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", min=2,
                                            help=f"Pool size to compare the working set with. {_KV_BLOCKS_DEFAULT}"),
    agents: int = typer.Option(16, "--agents", min=1, help="Concurrent agents for the timing of the working set."),
    profile: str = typer.Option(_D.profile, "--profile", help="Step-time profile for the timing of the working set."),
) -> None:
    """Workload analysis: prefix reuse, tool times, gaps, KV working set; writes analysis.json and figures."""
    from cwsim.analysis import analyze as run_analysis
    from traces.analysis import write_analysis

    if trace_arg is not None and trace is not None and trace_arg != trace:
        fail(f"--trace: give the trace once (got {trace_arg} and --trace {trace})")
    trace = trace if trace is not None else trace_arg
    with _guarded("--out"):
        check_folder(out)
        tr = _load_table(trace)
        with console.status("analysing (includes one infinite-cache simulation for timing)"):
            result = run_analysis(tr, block_size=block_size, pool_blocks=kv_blocks, agents=agents, profile=profile)
            paths = write_analysis(result, tr, out)
    table = Table(title=escape(f"workload: {Path(tr.source).name}"), show_header=False)
    ws, ef = result["kv_working_set"], result["eviction_free_prefill"]
    for k, v in [
        ("sessions / calls", f"{result['sessions']:,} / {result['calls']:,}"),
        ("median calls per session", _num(result["calls_per_session"]["median"], "g")),
        ("median prompt / output tokens", f"{_num(result['prompt_tokens']['median'], ',.0f')} / "
                                          f"{_num(result['output_tokens']['median'], ',.0f')}"),
        ("median share of prompt = previous call",
         _num(result["prev_prefix_share"]["median"], ".1%") + ("" if result["prev_prefix_share"]["median"] is not None
                                                               else " (no session has a second call)")),
        ("prefill an eviction-free cache avoids", _num(ef["avoidable_share"], ".1%")),
        ("median tool duration", _num(result["tool_duration_s"]["all"]["median"], ".2f", " s")
         if result["tool_duration_s"]["all"]["median"] is not None else "n/a (no tool calls)"),
        ("KV working set peak / pool", f"{ws['peak_blocks']:,} / {ws['pool_blocks']:,} blocks"),
    ]:
        table.add_row(k, v)
    Console().print(table)
    console.print(f"wrote {len(paths)} files to {out}/", markup=False)


@command()
def synth(
    like: Path = typer.Option(DEFAULT_TRACE, "--like", help="Real trace to fit the workload model to."),
    sessions: int = typer.Option(100, "--sessions", min=1, help="Synthetic sessions to write."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same trace)."),
    output: Path = _out_option(..., "Output trace (.jsonl or .jsonl.gz); its folder is made if needed."),
    model_out: Optional[Path] = typer.Option(None, "--model-out", help="Also save the fitted model (JSON)."),
    check_sessions: int = typer.Option(1000, "--check-sessions", min=0, help="Closeness report on the first N synthetic sessions (0: none)."),
    working_set: bool = typer.Option(False, "--working-set", metavar="", help="Closeness of the KV working set too (simulates both traces; slow)."),
) -> None:
    """Fit a workload model to a real trace and sample new sessions like it; report how close they are."""
    from cwsim.analysis import analyze as analyze_simulated
    from traces.reader import write_trace
    from traces.synth import closeness, fit, format_closeness, iter_sessions, synthetic_header, synthetic_trace

    _check_out_file(output)
    if model_out is not None:
        try:
            check_file(model_out)
        except OutputPathError as e:
            fail(f"--model-out: {e}")
    with _guarded("--out"):
        real = _load_table(like)
        model = fit(real)
        model.source = str(like)
        if model_out is not None:
            model.save(model_out)
        header = synthetic_header(model, sessions, seed, str(like))
        with _bar("sampling", "sessions") as bar:
            task = bar.add_task("synth", total=sessions)

            def calls():
                for sess in iter_sessions(model, sessions, seed):
                    yield from sess.calls
                    bar.advance(task)

            n = write_trace(output, calls(), header)
        console.print(f"wrote {sessions} synthetic sessions, {n} calls to {output}", markup=False)
        if check_sessions > 0:
            k = min(check_sessions, sessions)
            report = closeness(real, synthetic_trace(model, k, seed),
                               analyze=analyze_simulated if working_set else None)  # None: without the working set
            Console().print(format_closeness(report), markup=False)


# ------------------------------------------------------------------------------ listings
@command()
def policies() -> None:
    """List the policies with one-line descriptions."""
    table = Table("policy", "runs in", "description")
    for spec in POLICIES.values():
        table.add_row(spec.name, "cwsim, vLLM" if spec.runs_in_vllm else "cwsim", spec.description)
    Console().print(table)


@command()
def profiles() -> None:
    """List the bundled step-time profiles."""
    table = Table("profile", "model", "gpu", "source")
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(*map(escape, (name, p.model, p.gpu, p.source.split(":")[0])))
    Console().print(table)


@app.command()
def record(
    upstream: str = typer.Option(..., "--upstream", help="The LLM server to forward to, e.g. http://127.0.0.1:8000 or https://api.anthropic.com."),
    output: Path = _out_option(..., "Trace to write (.jsonl), one full line per LLM call."),
    listen: str = typer.Option("127.0.0.1:8790", "--listen", help="HOST:PORT to serve on (loopback unless you say otherwise)."),
    hints: bool = typer.Option(False, "--hints", help="Add session id, turn and previous tool to the forwarded requests (vllm_xargs, X-Session-ID)."),
    append: bool = typer.Option(False, "--append", help="Add to an existing recording instead of refusing to touch it."),
    salt_file: Optional[Path] = typer.Option(None, "--salt-file", help="Keep the segment-id salt here (created if missing) so that recordings share ids; default: a fresh secret salt."),
    timeout_s: float = typer.Option(600.0, "--timeout-s", help="Upstream read timeout (s) per response or stream chunk."),
) -> None:
    """Record content-free traces of your own agent: a proxy for the OpenAI and Anthropic APIs (docs/record.md)."""
    from recorder import RecordingError, record as run_recording

    try:
        rec = run_recording(upstream, output, listen, hints, append, timeout_s, salt_file,
                            on_ready=lambda url: console.print(f"recording to {output}: point the agent at {url} (Ctrl-C to stop)"))
    except RecordingError as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(code=2)
    extra = f", {rec.recovered} recovered from an interrupted recording" if rec.recovered else ""
    console.print(f"wrote {rec.calls} calls ({rec.sessions} sessions, {rec.failed} failed calls{extra}) to {output}")
