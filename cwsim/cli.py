"""`cwsim`: the command line, a thin layer over :func:`cwsim.runner.simulate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cwsim.config import SimConfig
from cwsim.policies import POLICIES
from cwsim.runner import DEFAULT_TRACE, simulate
from cwsim.scheduler import SimulationError
from cwsim.steptime import list_profiles, load_profile
from traces.reader import TraceFormatError, load_trace

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Simulate KV-cache policies for coding-agent sessions on a vLLM-like engine.")
console = Console(stderr=True, soft_wrap=True)  # error lines keep paths whole

_D = SimConfig()


@app.command()
def run(
    trace: Optional[Path] = typer.Option(None, "--trace", help="Trace file (.jsonl or .jsonl.gz, format v1). Default: the bundled mini-swe-agent trace."),
    policy: str = typer.Option(_D.policy, "--policy", help="Policy name (see `cwsim policies`)."),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="KV pool size in blocks, null block included (vLLM --num-gpu-blocks-override)."),
    kv_gib: Optional[float] = typer.Option(None, "--kv-gib", help="KV pool size in GiB (converted with the profile's bytes per token)."),
    block_size: int = typer.Option(_D.block_size, "--block-size", help="Tokens per KV block."),
    profile: str = typer.Option(_D.profile, "--profile", help="Step-time profile: a bundled name (see `cwsim profiles`) or a JSON file."),
    max_num_seqs: int = typer.Option(_D.max_num_seqs, "--max-num-seqs", help="Most requests running at once."),
    max_num_batched_tokens: int = typer.Option(_D.max_num_batched_tokens, "--max-num-batched-tokens", help="Token budget of one step (chunked prefill)."),
    gpu_memory_utilization: float = typer.Option(_D.gpu_memory_utilization, "--gpu-memory-utilization", help="Share of GPU memory for weights + KV when the pool size is derived from the profile."),
    arrivals: str = typer.Option(_D.arrivals, "--arrivals", help="Session starts: concurrent (fixed number of active agents), poisson, or trace (recorded)."),
    agents: int = typer.Option(_D.agents, "--agents", help="Concurrently active sessions, with --arrivals concurrent."),
    rate: float = typer.Option(_D.rate, "--rate", help="Sessions per second, with --arrivals poisson."),
    seed: int = typer.Option(_D.seed, "--seed", help="Random seed (Poisson arrivals)."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", help="Simulate only the first N sessions of the trace."),
    predictor_trace: Optional[Path] = typer.Option(None, "--predictor-trace", help="Trace the tool-call predictor learns from (default: the simulated trace)."),
    predictor_error: float = typer.Option(_D.predictor_error, "--predictor-error", help="Injected prediction error: idle predictions times exp(N(0, this))."),
    aging_s: float = typer.Option(_D.aging_s, "--aging-s", help="Prefix-aware scheduling: a request waiting longer than this goes first."),
    cpu_kv_blocks: Optional[int] = typer.Option(None, "--cpu-kv-blocks", help="CPU KV tier size in blocks (0: no tier). Default: the policy's (tokencake: the GPU pool size; others: none)."),
    cpu_kv_gib: Optional[float] = typer.Option(None, "--cpu-kv-gib", help="CPU KV tier size in GiB (converted with the profile's bytes per token; exclusive with --cpu-kv-blocks)."),
    pcie_gbps: float = typer.Option(_D.pcie_gbps, "--pcie-gbps", help="Effective PCIe bandwidth per direction to the CPU tier, GB/s."),
    offload_threshold_s: float = typer.Option(_D.offload_threshold_s, "--offload-threshold-s", help="Tokencake: offload during tool calls predicted to last longer than this (s)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for summary.json, requests.csv, sessions.csv (written as the run goes)."),
) -> None:
    """Simulate a trace under one policy and print a summary."""
    try:
        config = SimConfig(policy=policy, kv_blocks=kv_blocks, kv_gib=kv_gib, block_size=block_size, profile=profile,
                           max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                           gpu_memory_utilization=gpu_memory_utilization, arrivals=arrivals, agents=agents, rate=rate,
                           seed=seed, max_sessions=max_sessions,
                           predictor_trace=str(predictor_trace) if predictor_trace is not None else None,
                           predictor_error=predictor_error, aging_s=aging_s, cpu_kv_blocks=cpu_kv_blocks,
                           cpu_kv_gib=cpu_kv_gib, pcie_gbps=pcie_gbps, offload_threshold_s=offload_threshold_s)
        tr = load_trace(trace if trace is not None else DEFAULT_TRACE)
        n_calls = sum(len(s.calls) for s in tr.sessions[: max_sessions or None])
        with Progress(TextColumn("[bold]simulating[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("calls"),
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("sim", total=n_calls)
            result = simulate(tr, config, out, on_progress=lambda n: bar.advance(task, n))
    except (TraceFormatError, FileNotFoundError, ValueError, SimulationError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(code=2)
    _print_summary(result.summary)
    if out is not None:
        console.print(f"results in {out}/ (summary.json, requests.csv, sessions.csv)")


def _print_summary(s: dict) -> None:
    table = Table(title=f"cwsim: {s['policy']} on {Path(s['trace']).name}", show_header=False)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    rows = [
        ("sessions / requests", f"{s['sessions']} / {s['requests']}"),
        ("KV pool", f"{s['kv_blocks']} blocks x {s['block_size']} tokens" if s["kv_blocks"] else "unbounded"),
        ("profile", s["profile"]),
        ("evicted blocks", f"{s['evicted_blocks']:,}"),
        ("harmful evictions", f"{s['harmful_evictions']:,}"),
        ("prefix hit rate", f"{s['prefix_hit_rate']:.1%}"),
        ("recomputed prompt tokens", f"{s['recomputed_prompt_tokens']:,}"),
        ("preemptions", f"{s['preemptions']:,}"),
        *([("CPU tier", f"{s['cpu_kv_blocks']:,} blocks"),
           ("offloaded / prefetched / swapped-in blocks",
            f"{s['offloaded_blocks']:,} / {s['prefetched_blocks']:,} / {s['swap_in_hits']:,}")]
          if s.get("cpu_kv_blocks") else []),
        ("total session time", f"{s['total_session_time_s']:,.1f} s"),
        ("mean / p99 session time", f"{s['mean_session_time_s']:,.1f} / {s['p99_session_time_s']:,.1f} s"),
        ("makespan", f"{s['makespan_s']:,.1f} s"),
        ("wall time", f"{s['wall_s']:.2f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


@app.command("import")
def import_(
    src: list[Path] = typer.Argument(..., help="Files or folders to convert."),
    fmt: str = typer.Option(..., "--format", "-f", help="Source format: mini-swe-agent, swe-agent, tracelab, mooncake, lmcache-agent."),
    output: Path = typer.Option(..., "-o", "--output", help="Output trace (.jsonl or .jsonl.gz)."),
) -> None:
    """Convert a public trace format into trace format v1 (content-free)."""
    from traces.importers import run_import
    from traces.reader import write_trace

    total = sum(p.stat().st_size for s in src if s.exists() for p in ([s] if s.is_file() else s.rglob("*")) if p.is_file())
    try:
        with Progress(TextColumn("[bold]reading[/]"), BarColumn(), TimeElapsedColumn(), console=console, transient=True) as bar:
            task = bar.add_task("read", total=None)
            calls, report, header = run_import(fmt, src, progress=lambda n: bar.advance(task, n))
    except (ValueError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(code=2)
    Console().print(report.render())
    if not calls:
        console.print("[red]error:[/] nothing converted")
        raise typer.Exit(code=1)
    n = write_trace(output, calls, header)
    console.print(f"wrote {n} calls ({report.sessions} sessions) to {output}" + (f" from {total:,} bytes" if total else ""))


@app.command()
def analyze(
    trace: Optional[Path] = typer.Argument(None, help="Trace to analyse (default: the bundled trace)."),
    out: Path = typer.Option(Path("runs/analysis"), "--out", help="Folder for analysis.json and the PNG figures."),
    block_size: int = typer.Option(16, "--block-size", help="Tokens per KV block."),
    kv_blocks: Optional[int] = typer.Option(None, "--kv-blocks", help="Pool size to compare the working set with (default: the profile's)."),
    agents: int = typer.Option(16, "--agents", help="Concurrent agents for the timing of the working set."),
    profile: str = typer.Option(_D.profile, "--profile", help="Step-time profile for the timing of the working set."),
) -> None:
    """Workload analysis: prefix reuse, tool times, gaps, KV working set; writes analysis.json and figures."""
    from traces.analysis import analyze as run_analysis, write_analysis

    try:
        tr = load_trace(trace if trace is not None else DEFAULT_TRACE)
        with console.status("analysing (includes one infinite-cache simulation for timing)"):
            result = run_analysis(tr, block_size=block_size, pool_blocks=kv_blocks, agents=agents, profile=profile)
            paths = write_analysis(result, tr, out)
    except (TraceFormatError, FileNotFoundError, ValueError, SimulationError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(code=2)
    table = Table(title=f"workload: {Path(tr.source).name}", show_header=False)
    ws, ef = result["kv_working_set"], result["eviction_free_prefill"]
    for k, v in [
        ("sessions / calls", f"{result['sessions']} / {result['calls']}"),
        ("median calls per session", f"{result['calls_per_session']['median']:g}"),
        ("median prompt / output tokens", f"{result['prompt_tokens']['median']:,.0f} / {result['output_tokens']['median']:,.0f}"),
        ("median share of prompt = previous call", f"{result['prev_prefix_share']['median']:.1%}"),
        ("prefill an eviction-free cache avoids", f"{ef['avoidable_share']:.1%}"),
        ("median tool duration", f"{result['tool_duration_s']['all']['median']:.2f} s"),
        ("KV working set peak / pool", f"{ws['peak_blocks']:,} / {ws['pool_blocks']:,} blocks"),
    ]:
        table.add_row(k, v)
    Console().print(table)
    console.print(f"wrote {len(paths)} files to {out}/")


@app.command()
def synth(
    like: Path = typer.Option(DEFAULT_TRACE, "--like", help="Real trace to fit the workload model to."),
    sessions: int = typer.Option(100, "--sessions", min=1, help="Synthetic sessions to write."),
    seed: int = typer.Option(0, "--seed", help="Random seed (same seed, same trace)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output trace (.jsonl or .jsonl.gz)."),
    model_out: Optional[Path] = typer.Option(None, "--model-out", help="Also save the fitted model (JSON)."),
    check_sessions: int = typer.Option(1000, "--check-sessions", help="Closeness report on the first N synthetic sessions (0: none)."),
) -> None:
    """Fit a workload model to a real trace and sample new sessions like it; report how close they are."""
    from traces.reader import write_trace
    from traces.synth import closeness, fit, format_closeness, iter_sessions, synthetic_header, synthetic_trace

    try:
        real = load_trace(like)
    except (TraceFormatError, FileNotFoundError) as e:
        console.print(f"[red]error:[/] {e}")
        raise typer.Exit(code=2)
    model = fit(real)
    model.source = str(like)
    if model_out is not None:
        model.save(model_out)
    header = synthetic_header(model, sessions, seed, str(like))
    with Progress(TextColumn("[bold]sampling[/]"), BarColumn(), MofNCompleteColumn(), TextColumn("sessions"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("synth", total=sessions)

        def calls():
            for sess in iter_sessions(model, sessions, seed):
                yield from sess.calls
                bar.advance(task)

        n = write_trace(output, calls(), header)
    console.print(f"wrote {sessions} synthetic sessions, {n} calls to {output}")
    if check_sessions > 0:
        k = min(check_sessions, sessions)
        Console().print(format_closeness(closeness(real, synthetic_trace(model, k, seed))))


@app.command()
def policies() -> None:
    """List the policies with one-line descriptions."""
    table = Table("policy", "description")
    for spec in POLICIES.values():
        table.add_row(spec.name, spec.description)
    Console().print(table)


@app.command()
def profiles() -> None:
    """List the bundled step-time profiles."""
    table = Table("profile", "model", "gpu", "source")
    for name in list_profiles():
        p = load_profile(name)
        table.add_row(name, p.model, p.gpu, p.source.split(":")[0])
    Console().print(table)


@app.command()
def record(
    upstream: str = typer.Option(..., "--upstream", help="The LLM server to forward to, e.g. http://127.0.0.1:8000 or https://api.anthropic.com."),
    output: Path = typer.Option(..., "-o", "--output", help="Trace to write (.jsonl, format v1), one line per LLM call."),
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
