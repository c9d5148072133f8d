"""`cwreplay`: a trace on a real vLLM engine, and the simulator held to it.

A thin layer over :mod:`replay.oracle` and :mod:`replay.compare`. The live
server replay (``cwreplay serve`` / ``cwreplay run``) is built by a later issue.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from traces.reader import TraceFormatError, load_trace

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Run traces on a real vLLM engine and compare the simulator with it.")
console = Console(stderr=True, soft_wrap=True, markup=False, highlight=False)


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
    compare_sim: bool = typer.Option(False, "--compare", help="Also run the trace in cwsim (unit-step profile) and print a per-call diff and the first divergence."),
    out: Path = typer.Option(..., "--out", help="Output folder: requests.csv, sessions.csv, evictions.csv, outputs.jsonl, summary.json (with --compare: oracle/, sim/, compare.json)."),
) -> None:
    """Run a trace on vLLM's own engine, in process, stepped by hand (time = engine steps)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from replay.oracle import OracleConfig, OracleError, run_oracle, step_trace

    try:
        oc = OracleConfig(kv_blocks=kv_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=max_num_batched_tokens, arrivals=arrivals, agents=agents,
                          max_sessions=max_sessions, steps_per_s=steps_per_s,
                          scheduler_reserve_full_isl=scheduler_reserve_full_isl, watermark=watermark,
                          long_prefill_token_threshold=long_prefill_token_threshold, engine=engine,
                          async_scheduling=async_scheduling, model=str(model) if model is not None else None)
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
    except FileNotFoundError as e:
        console.print(f"error: --trace {trace}: {e.strerror or 'no such file'}")
        raise typer.Exit(code=2)
    except (TraceFormatError, ValueError, OracleError) as e:
        console.print(f"error: {e}")
        raise typer.Exit(code=2)
    s = res.summary
    print(json.dumps({k: s[k] for k in ("sessions", "requests", "steps", "evicted_blocks", "preemptions",
                                        "prefix_hit_rate", "makespan_s")}, indent=1))
    console.print(f"results in {out}/ (summary.json, requests.csv, sessions.csv, evictions.csv, outputs.jsonl)")
