"""The library entry point: simulate a trace under a configuration.

``simulate`` is what ``cwsim run`` calls and what notebooks call directly.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

import simpy

from cwsim.block_pool import BlockPool
from cwsim.config import ConfigError, SimConfig
from cwsim.cpu_tier import CpuTier
from cwsim.engine import Engine, start_sessions
from cwsim.eviction_bound import ReferenceStream, bound_summary
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.metrics import Metrics
from cwsim.policies import get_policy
from cwsim.policy_adapter import SimEnvironment, TraceFuture
from cwsim.predict import ToolCallPredictor
from cwsim.scheduler import Scheduler, SimulationError
from cwsim.steptime import load_profile
from cwsim.workload import Arrivals, Workload
from traces.columnar import TraceTable
from traces.files import atomic_write_text, ensure_folder
from traces.format import Trace
from traces.reader import TraceFormatError, load_trace
from traces.transform import scale_gaps
from traces.stream import TraceIndex, index_trace, iter_sessions

#: the repository (the installed packages' parent folder)
REPO = Path(__file__).resolve().parent.parent
DEFAULT_TRACE = REPO / "traces" / "data" / "miniswe-deepseek.jsonl.gz"


#: the files a run writes into its results folder (an earlier run's are removed first)
RESULT_FILES = ("summary.json", "requests.csv", "sessions.csv", "evictions.csv", "steps.csv")


@dataclass
class SimResult:
    summary: dict
    out_dir: Path | None


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM turned into KeyboardInterrupt) during a run: the results folder (if any)
    holds the CSV rows of ``calls_done`` finished calls and a ``summary.json`` marked partial."""

    def __init__(self, calls_done: int, out_dir: Path | None):
        super().__init__(calls_done, out_dir)
        self.calls_done = calls_done
        self.out_dir = out_dir


def resolve_kv_blocks(config: SimConfig, profile) -> int:
    if config.kv_blocks is not None:
        return config.kv_blocks
    if config.kv_gib is not None:
        n = profile.kv_blocks_for_bytes(config.kv_gib * 2**30, config.block_size)
        if n < 2:
            raise ConfigError("kv_gib", f"{config.kv_gib:g} GiB holds {n} blocks of {config.block_size} tokens "
                                        f"under profile {profile.name!r}; the pool needs >= 2")
        return n
    n = profile.default_kv_blocks(config.block_size, config.gpu_memory_utilization)
    if n < 2:
        raise ConfigError("gpu_memory_utilization", f"{config.gpu_memory_utilization:g} leaves {n} KV blocks after "
                                                    f"the weights of profile {profile.name!r}; raise it or give --kv-blocks")
    return n


def resolve_cpu_kv_blocks(config: SimConfig, profile, spec, kv_blocks: int) -> int:
    """CPU tier size in blocks: ``cpu_kv_blocks``, else ``cpu_kv_gib`` converted, else the policy's default."""
    if config.cpu_kv_blocks is not None:
        return config.cpu_kv_blocks
    if config.cpu_kv_gib is not None:
        return profile.kv_blocks_for_bytes(config.cpu_kv_gib * 2**30, config.block_size)
    return int(spec.default_cpu_tier * (kv_blocks - 1))


def check_fits(workload: Workload, kv_blocks: int, block_size: int) -> None:
    """``SimulationError`` naming the call if the largest call can never fit the pool, even alone.

    A call of prompt ``P`` and output ``O`` tokens holds KV for ``P + O - 1`` tokens at its last
    step (the last token generated is not fed back), in blocks of ``block_size``; block 0 is the
    null block. The scheduler would find out only when it got there.
    """
    sid, turn, tokens = workload.largest_call()
    need = -(-tokens // block_size)
    if need > kv_blocks - 1:
        raise SimulationError(f"request of session {sid!r} turn {turn} needs {need} blocks ({tokens} tokens "
                              f"of prompt + output) but the pool has {kv_blocks - 1} usable blocks: "
                              "raise --kv-blocks / --kv-gib")


def prepare_results_dir(out_dir: str | Path) -> Path:
    """Make the results folder and remove an earlier run's result files from it."""
    out = ensure_folder(out_dir)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    return out


def simulate(trace: Trace | TraceTable | TraceIndex | str | Path | None, config: SimConfig = SimConfig(),
             out_dir: str | Path | None = None, on_progress=None, eviction_log: bool = False,
             on_load=None, step_log: bool = False) -> SimResult:
    """Run one simulation; write ``summary.json``, ``requests.csv`` and ``sessions.csv`` to ``out_dir`` if given.

    ``trace``: a file (default: the bundled trace), a ``Trace``, a ``traces.columnar.TraceTable`` (its
    sessions are built as the run reaches them) or a ``traces.stream.TraceIndex``.
    A file is indexed and its sessions streamed (memory follows the sessions in flight; see
    ``traces.stream``), or loaded whole when its sessions' lines interleave; ``on_load(bytes_read,
    file_size)`` follows that reading.

    ``on_progress(n_calls)`` is called as each session ends. Everything that can be checked is
    checked before the first step (``ConfigError``, ``TraceFormatError``, ``FileNotFoundError``).
    The CSVs are written as sessions end; an earlier run's result files in ``out_dir`` are
    removed first, and ``summary.json`` is written last, atomically. When the run stops early
    (``SimulationError``, or Ctrl-C: ``SimulationInterrupted``) ``summary.json`` still comes,
    with ``"partial": true`` and what stopped it in ``"stopped_by"``; a finished run's has
    ``"partial": false``. ``eviction_log``: also
    write ``evictions.csv`` (engine step, time and content hash of every evicted
    block, in order; the hash is :func:`cwsim.hashing.block_hashes`'s, which
    ``replay.compare`` maps to vLLM's). ``step_log``: also write ``steps.csv`` (each engine
    iteration: its start and end, how many steps it ran (more than 1: a decode jump), the first
    step's prefill tokens, attention pairs, decoding sequences and their context, and the
    running and waiting requests once it was scheduled), to set beside a live server's
    (``cwreplay serve --step-log``).
    """
    wall0 = time.perf_counter()
    if trace is None:
        trace = DEFAULT_TRACE
    if isinstance(trace, (Trace, TraceTable, TraceIndex)):
        source = trace
    else:  # a file: streamed (two reads) when its sessions' lines lie together, else loaded whole
        source = index_trace(trace, progress=on_load) or load_trace(trace, progress=on_load)
    spec = get_policy(config.policy)
    profile = load_profile(config.profile)
    arrivals = Arrivals(config.arrivals, config.agents, config.rate)
    if isinstance(source, TraceIndex):
        workload = Workload.from_index(source, config.max_sessions, config.gap_scale)
    elif isinstance(source, TraceTable):
        workload = Workload.from_table(source, config.max_sessions, config.gap_scale)
    else:
        workload = Workload.from_trace(source, config.max_sessions, config.gap_scale)
    kv_blocks = resolve_kv_blocks(config, profile)
    if config.async_scheduling and spec.cls.overrides("admit"):
        raise ConfigError("async_scheduling", f"is not modelled with policy {spec.name!r}, which holds calls back "
                          "(Policy.admit): run it with the plain scheduler")
    arrivals.check(workload)
    if not spec.unbounded:
        check_fits(workload, kv_blocks, config.block_size)
    predictor = None
    if spec.needs_predictor:
        if config.predictor_trace is not None:
            train = load_trace(config.predictor_trace)
        elif isinstance(source, TraceIndex):
            train = iter_sessions(source)  # (one more read of the file)
        else:
            train = source
        if config.gap_scale != 1:  # the regime the predictor learns is the one it runs in
            train = scale_gaps(train.sessions if isinstance(train, (Trace, TraceTable)) else train, config.gap_scale)
        predictor = ToolCallPredictor.fit(train, error=config.predictor_error, seed=config.seed)
    cpu_blocks = resolve_cpu_kv_blocks(config, profile, spec, kv_blocks)
    out = prepare_results_dir(out_dir) if out_dir is not None else None
    metrics = Metrics(config.block_size, out, on_progress)
    # the policy's settings that the configuration holds (aging_s, offload_threshold_s, min_idle_s, ...)
    policy = spec.make(**{k: getattr(config, k) for k in spec.params if k in SimConfig.__dataclass_fields__})
    on_evict = metrics.on_evict
    evictions: list[tuple[int, float, list[int]]] = []
    if eviction_log:
        def on_evict(ids, _metrics=metrics.on_evict):  # noqa: E306 - only when asked: off the default hot path
            _metrics(ids)
            evictions.append((engine.steps, env.now, [int(h) for h in ids]))
    pool = BlockPool(kv_blocks, growable=spec.unbounded, on_evict=on_evict)
    if config.eviction_bound and not spec.unbounded:  # (an unbounded pool never evicts: no bound to give)
        pool.references = ReferenceStream()
    metrics.pool = pool
    kv = KVCacheManager(pool, config.block_size)
    tier = None
    if cpu_blocks > 0:
        tier = CpuTier(cpu_blocks, pool, profile.kv_bytes_per_block(config.block_size), config.pcie_gbps,
                       on_evict=metrics.on_evict)
        metrics.cpu_tier = tier
    ctx = SimEnvironment(policy, kv, predictor=predictor, cpu_tier=tier, future=TraceFuture(workload))
    scheduler = Scheduler(kv, ctx, metrics, max_num_seqs=config.max_num_seqs,
                          max_num_batched_tokens=config.max_num_batched_tokens, cpu_tier=tier,
                          reserve_full_isl=config.scheduler_reserve_full_isl, watermark=config.watermark,
                          long_prefill_token_threshold=config.long_prefill_token_threshold,
                          async_scheduling=config.async_scheduling)
    ctx.attach(scheduler)
    env = simpy.Environment()
    engine = Engine(env, scheduler, profile, config.block_size, ctx, config.decode_jumps,
                    step_jitter=config.step_jitter, seed=config.seed)
    engine.forget_private = not eviction_log  # (its log maps every evicted id back to its hash)
    engine.unlist_own = engine.forget_private and tier is None and pool.references is None and not pool.growable
    steps: list[tuple] = []
    if step_log:
        def on_step(start, end, n, plan, running, waiting):  # noqa: E306 - only when asked
            steps.append((start, end, n, plan.prefill_tokens, plan.attn_pairs, plan.decode_seqs, plan.decode_ctx,
                          running, waiting))
        engine.on_step = on_step
    start_sessions(env, engine, workload, arrivals, config.seed, metrics)
    env.process(engine.run())

    def summary(**stopped) -> dict:
        return {
            "policy": config.policy,
            "trace": source.source,
            "partial": bool(stopped),
            **stopped,
            **metrics.summary(),
            "kv_blocks": kv_blocks if not spec.unbounded else None,
            "kv_blocks_peak_in_use": pool.peak_in_use,
            "cpu_kv_blocks": cpu_blocks,
            "block_size": config.block_size,
            "profile": profile.name,
            "steps": engine.steps,
            "decode_jumps": engine.jumps,
            "config": config.to_dict(),
            "wall_s": time.perf_counter() - wall0,
        }

    def stop(why: str) -> None:
        metrics.close()
        if out is not None:
            write_summary(out, summary(stopped_by=why, sessions_in_trace=workload.num_sessions))

    try:
        env.run()
        if metrics.sessions_done != workload.num_sessions:
            raise SimulationError(f"only {metrics.sessions_done} of {workload.num_sessions} sessions finished")
    except SimulationError as e:
        stop(f"error: {e}")
        raise
    except (TraceFormatError, OSError) as e:  # a streamed trace file that changed or went away mid-run
        stop(f"error: {e}")
        raise
    except KeyboardInterrupt:
        stop("interrupt")
        raise SimulationInterrupted(metrics.requests, out) from None
    finally:
        metrics.close()
    result = summary()
    if pool.references is not None:
        result.update(bound_summary(pool.references, kv_blocks, result["evicted_blocks"]))
        result["wall_s"] = time.perf_counter() - wall0
    if out is not None:
        if eviction_log:
            _write_evictions(out / "evictions.csv", evictions, engine.block_ids)
        if step_log:
            with open(out / "steps.csv", "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(STEP_FIELDS)
                w.writerows(steps)
        write_summary(out, result)
    return SimResult(result, out)


#: the columns of ``steps.csv`` (``simulate(step_log=True)``; a live server's step log has the same ones)
STEP_FIELDS = ["start_s", "end_s", "steps", "prefill_tokens", "attn_pairs", "decode_seqs", "decode_ctx", "running",
               "waiting"]


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def _write_evictions(path: Path, evictions, block_ids) -> None:
    content = [0] * block_ids.n  # dense id -> content hash (the run forgot none: forget_private is off)
    for h, i in block_ids.items():
        content[i] = h
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "time_s", "block_hash"])
        for step, now, ids in evictions:
            for i in ids:
                w.writerow([step, now, content[i]])
