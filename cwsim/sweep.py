"""Parameter sweeps: a grid of simulations, run in a process pool or as Ray tasks, gathered in one table.

A sweep spec is a flat mapping (a TOML or YAML file, or a dict): each key a :class:`SimConfig`
field (the ``cwsim run`` option without the dashes: ``kv_blocks``; ``kv-blocks`` is read the
same) or ``trace``; each value one value or a list of values. The grid is the product of the
lists, in the spec's key order (the last key varies fastest). A point's id is a short hash of its
canonical JSON (keys sorted), so it does not change with the key order or the position in the
grid; it names the point's folder.

:func:`run_sweep` runs every point with :func:`cwsim.runner.simulate` into
``OUT/points/<id>/`` (``point.json``, ``summary.json``, ``requests.csv``, ``sessions.csv``) and
gathers ``OUT/results.parquet``: one row per point, with every config field, the trace, and
every ``summary.json`` figure; a failed point has ``status == "error"`` and its ``error``. The
table is rewritten atomically as points finish, so an interrupted sweep keeps what finished; a
rerun skips the points whose folder holds a finished (non-partial) ``summary.json``.

Traces are loaded once, in the calling process, and shipped once to each worker process (the
pool's initializer) or once to the Ray object store (``ray.put``), not once per point.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import itertools
import json
import multiprocessing
import os
import queue
import signal
import tempfile
import time
import tomllib
from concurrent.futures import BrokenExecutor, Future, ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import pandas as pd

from cwsim.config import ConfigError, SimConfig
from cwsim.policies import get_policy
from cwsim.runner import DEFAULT_TRACE, RESULT_FILES, simulate
from cwsim.steptime import load_profile
from cwsim.workload import Arrivals
from traces.files import atomic_write_text, ensure_folder
from traces.format import Trace
from traces.columnar import TraceTable, load_table

__all__ = ["SweepError", "SweepInterrupted", "SweepPoint", "expand_grid", "load_spec", "point_id", "run_points",
           "run_sweep", "RESULTS_FILE"]

RESULTS_FILE = "results.parquet"
#: the keys a spec may hold
KEYS = [f.name for f in fields(SimConfig)] + ["trace"]
#: summary.json figures that repeat a config column with the same value (left out of the row)
_SAME_AS_CONFIG = {"policy", "block_size", "trace"}
#: summary.json figures named like a config field but holding what the run used or counted
#: (any other such clash gets the prefix ``summary_``)
_RENAMED = {"kv_blocks": "kv_blocks_used", "cpu_kv_blocks": "cpu_kv_blocks_used", "profile": "profile_name",
            "decode_jumps": "decode_jumps_taken"}
#: seconds between rewrites of results.parquet while points finish (it is always written at the end)
FLUSH_EVERY_S = 2.0
_NO_RAY = "--ray-address: Ray is not installed (pip install 'cachewise[ray]')"


class SweepError(ValueError):
    """A bad sweep spec: ``str(e)`` is one line naming the file (when there is one) and the key."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep: ``results.parquet`` holds the ``done`` points that finished (of ``total``)."""

    def __init__(self, done: int, total: int, out_dir: Path):
        super().__init__(done, total, out_dir)
        self.done, self.total, self.out_dir = done, total, out_dir


@dataclass(frozen=True)
class SweepPoint:
    """One point of the grid: ``values`` as the spec gave them, the config and trace they resolve to."""

    id: str
    values: dict
    config: SimConfig
    trace: Path


# ------------------------------------------------------------------------------ the grid
def load_spec(path: str | Path) -> dict:
    """A sweep spec file (``.toml``; ``.yaml`` / ``.yml``) as a dict; ``SweepError`` if it cannot be read."""
    p = Path(path)
    if not p.is_file():
        raise SweepError(f"{p}: no such file" if not p.exists() else f"{p}: is a folder, not a sweep file")
    text = p.read_text()
    if p.suffix == ".toml":
        try:
            spec = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SweepError(f"{p}: not valid TOML: {e}") from None
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            spec = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SweepError(f"{p}: not valid YAML: {' '.join(str(e).split())}") from None
    else:
        raise SweepError(f"{p}: a sweep file is .toml, .yaml or .yml")
    if not isinstance(spec, dict):
        raise SweepError(f"{p}: a sweep file maps option names to values, got {type(spec).__name__}")
    return spec


def point_id(values: dict) -> str:
    """12 hex digits of the SHA-256 of the point's canonical JSON (keys sorted)."""
    text = json.dumps(values, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def expand_grid(spec: dict, source: str | Path | None = None) -> list[dict]:
    """The points of ``spec`` (each a dict of key -> one value), in grid order; ``SweepError`` for a
    key that is not an option or a value of the wrong type (naming ``source``, the spec's file)."""
    where = f"{source}: " if source is not None else ""
    axes: list[tuple[str, list]] = []
    for raw, value in spec.items():
        key = str(raw).replace("-", "_")
        if key not in KEYS:
            near = difflib.get_close_matches(key, KEYS, n=1)
            hint = f" (did you mean {near[0]}?)" if near else " (keys: `cwsim run` options and trace)"
            raise SweepError(f"{where}{raw}: not a `cwsim run` option{hint}")
        if any(k == key for k, _ in axes):
            raise SweepError(f"{where}{raw}: given twice")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise SweepError(f"{where}{raw}: an empty list (give at least one value)")
        for v in values:
            problem = _type_problem(key, v)
            if problem:
                raise SweepError(f"{where}{raw}: {problem}")
        if _annotation(key).startswith("float"):  # 1 and 1.0 are one value (and one point id)
            values = [float(v) if isinstance(v, int) else v for v in values]
        axes.append((key, values))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]


def _annotation(key: str) -> str:
    return "str" if key == "trace" else str(SimConfig.__dataclass_fields__[key].type)


def _type_problem(key: str, v) -> str | None:
    """Why ``v`` cannot be the value of ``key`` (from the field's annotation), or None."""
    kinds = {k.strip() for k in _annotation(key).split("|")}
    if v is None:
        return None if "None" in kinds else "has no null value"
    ok = {"bool": isinstance(v, bool), "int": isinstance(v, int) and not isinstance(v, bool),
          "float": isinstance(v, (int, float)) and not isinstance(v, bool), "str": isinstance(v, str)}
    if any(ok.get(k, False) for k in kinds):
        return None
    want = " or ".join(sorted({"bool": "true/false", "int": "an integer", "float": "a number",
                               "str": "a string"}[k] for k in kinds if k != "None"))
    return f"must be {want}, got {v!r}"


def resolve_points(spec: dict, source: str | Path | None = None) -> list[SweepPoint]:
    """The grid as :class:`SweepPoint`\\ s, every point checked before anything runs: ``SweepError``
    (one line: the file, the key, the problem) for a bad value, an unknown policy or profile, a
    missing trace. Relative paths (``trace``, ``predictor_trace``, a ``profile`` file) are taken
    from the spec file's folder (the working folder for a dict)."""
    where = f"{source}: " if source is not None else ""
    base = Path(source).resolve().parent if source is not None else Path.cwd()
    points, seen = [], set()
    checked_profiles: set[str] = set()
    for values in expand_grid(spec, source):
        args = {k: v for k, v in values.items() if k != "trace"}
        for k in ("predictor_trace", "profile"):
            if isinstance(args.get(k), str) and (k == "predictor_trace" or _is_path(args[k])):
                args[k] = str(_under(base, args[k]))
        try:
            config = SimConfig(**args)
            get_policy(config.policy)
            Arrivals(config.arrivals, config.agents, config.rate)
        except ConfigError as e:
            raise SweepError(f"{where}{e.field}: {e.problem}") from None
        except ValueError as e:  # unknown policy
            raise SweepError(f"{where}policy: {e}") from None
        if config.profile not in checked_profiles:
            try:
                load_profile(config.profile)
            except ValueError as e:
                raise SweepError(f"{where}profile: {e}") from None
            checked_profiles.add(config.profile)
        if config.predictor_trace is not None and not Path(config.predictor_trace).is_file():
            raise SweepError(f"{where}predictor_trace: {config.predictor_trace}: no such file")
        trace = _under(base, values["trace"]) if "trace" in values else DEFAULT_TRACE
        if not trace.is_file():
            raise SweepError(f"{where}trace: {trace}: " + ("is a folder, not a trace file" if trace.is_dir()
                                                           else "no such file"))
        pid = point_id(values)
        if pid in seen:
            raise SweepError(f"{where}the grid holds the same point twice: {json.dumps(values, sort_keys=True)}")
        seen.add(pid)
        points.append(SweepPoint(pid, values, config, trace))
    return points


def _is_path(s: str) -> bool:
    return s.endswith(".json") or "/" in s or "\\" in s


def _under(base: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


# ------------------------------------------------------------------------------ one point
def _run_point(trace: Trace | TraceTable, config: SimConfig, out: Path) -> dict:
    """Simulate one point into ``out``; ``{"summary": ...}`` or ``{"error": "Type: message"}``."""
    try:
        return {"summary": simulate(trace, config, out).summary}
    except Exception as e:  # noqa: BLE001 -- a failing point is recorded; the sweep goes on
        return {"error": f"{type(e).__name__}: {e}"}


#: the traces of this worker process (set once by the pool's initializer)
_WORKER_TRACES: dict[str, Trace | TraceTable] = {}


def _init_worker(traces: dict[str, Trace | TraceTable]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _WORKER_TRACES.update(traces)


def _pool_point(trace_key: str, config: SimConfig, out: str) -> dict:
    return _run_point(_WORKER_TRACES[trace_key], config, Path(out))


def _ray_point(trace: Trace | TraceTable, config: SimConfig) -> dict:
    """A Ray task: simulate in a scratch folder on the worker and return the result files' bytes
    (the driver writes them: a cluster's nodes need not share a file system)."""
    with tempfile.TemporaryDirectory(prefix="cwsim-point-") as tmp:
        result = _run_point(trace, config, Path(tmp))
        result["files"] = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.name in RESULT_FILES}
    return result


# ------------------------------------------------------------------------------ the sweep
def run_sweep(spec_or_path: dict | str | Path, out_dir: str | Path, workers: int | None = None,
              ray_address: str | None = None,
              on_progress: Callable[[int, int, dict], None] | None = None) -> pd.DataFrame:
    """Run every point of the grid; return the table written to ``out_dir/results.parquet``.

    ``workers``: processes of the local pool (default: every core; 1 runs the points in this
    process), or, with ``ray_address="local"``, the CPUs of the Ray instance started here.
    ``ray_address``: None for the local pool; ``"local"`` starts Ray on this machine (and stops
    it after); an address (``host:port``, ``ray://...``) or ``"auto"`` joins a running cluster
    (``ray.init(address=...)``); a Ray already initialised in this process is used as it is.
    ``on_progress(done, total, row)`` after each point (skipped ones first). A point that fails
    is recorded (``status`` ``"error"``, ``error``) and the others go on. Ctrl-C raises
    :class:`SweepInterrupted` once the table of the finished points is written.
    The returned frame's ``attrs`` hold ``ran``, ``skipped`` and ``failed`` counts.
    """
    source = Path(spec_or_path) if isinstance(spec_or_path, (str, Path)) else None
    spec = load_spec(source) if source is not None else spec_or_path
    return run_points(resolve_points(spec, source), out_dir, workers, ray_address, on_progress)


def run_points(points: list[SweepPoint], out_dir: str | Path, workers: int | None = None,
               ray_address: str | None = None, on_progress: Callable[[int, int, dict], None] | None = None,
               traces: dict[str, Trace | TraceTable] | None = None) -> pd.DataFrame:
    """:func:`run_sweep` of points made elsewhere (any list, not only a grid's product: ``cwsim.compare``
    derives each point's pool from its trace). ``traces``: those already loaded (by path), to not
    load them again."""
    if workers is not None and workers < 1:
        raise SweepError(f"--workers must be >= 1, got {workers}")
    if workers is not None and ray_address not in (None, "local"):
        raise SweepError(f"--workers: a Ray cluster's size is its own (--ray-address {ray_address}); "
                         "--workers sizes the local pool or a --ray-address local instance")
    if ray_address is not None and importlib.util.find_spec("ray") is None:
        raise SweepError(_NO_RAY)
    out = ensure_folder(out_dir)
    table = _Table(out / RESULTS_FILE, points)
    todo = []
    for p in points:
        folder = out / "points" / p.id
        summary = _finished_summary(folder)
        if summary is not None:
            table.add(p, {"summary": summary}, skipped=True)
        else:
            ensure_folder(folder)
            atomic_write_text(folder / "point.json", json.dumps(
                {"id": p.id, "values": p.values, "trace": str(p.trace), "config": p.config.to_dict()}, indent=2) + "\n")
            todo.append(p)
    if on_progress is not None:
        for done, row in enumerate(table.rows.values(), start=1):
            on_progress(done, len(points), row)
    known = traces or {}
    traces = {str(t): known.get(str(t)) or load_table(t) for t in dict.fromkeys(p.trace for p in todo)}

    def finished(p: SweepPoint, result: dict) -> None:
        row = table.add(p, result)
        if on_progress is not None:
            on_progress(table.done, len(points), row)

    try:
        if not todo:
            pass
        elif ray_address is not None:
            _run_ray(todo, traces, out, ray_address, workers, finished)
        elif (workers or os.cpu_count() or 1) == 1 or len(todo) == 1:
            for p in todo:
                finished(p, _run_point(traces[str(p.trace)], p.config, out / "points" / p.id))
        else:
            _run_pool(todo, traces, out, min(workers or os.cpu_count() or 1, len(todo)), finished)
        table.write()  # inside: a stop while the last table is written writes it again below
    except KeyboardInterrupt:
        table.write()
        raise SweepInterrupted(table.done, len(points), out) from None
    return table.frame()


def _finished_summary(folder: Path) -> dict | None:
    """The folder's ``summary.json`` if it is a finished run's, else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get("partial") is False else None


def _run_pool(todo: list[SweepPoint], traces: dict[str, Trace | TraceTable], out: Path, workers: int, finished) -> None:
    # forkserver: no fork of a process that runs threads (a progress bar's); the server imports
    # the simulator once and each worker starts as a fork of it
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["cwsim.sweep"])
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker, initargs=(traces,))
    # Points go in a window of 2 per worker, and each finished one comes back through a queue that
    # its future's callback fills. The main thread never waits in concurrent.futures.wait(): that
    # takes every pending future's lock in turn, and a Ctrl-C landing while it does leaves some
    # held, so the pool's shutdown below waited for them forever (seen with 1,000 points).
    finished_q: queue.SimpleQueue[tuple[SweepPoint, Future]] = queue.SimpleQueue()
    waiting = iter(todo)

    def submit(p: SweepPoint) -> None:
        try:
            future = pool.submit(_pool_point, str(p.trace), p.config, str(out / "points" / p.id))
        except BrokenExecutor as e:  # a worker died (killed, out of memory): the pool runs no more points
            future = Future()
            future.set_exception(e)
        future.add_done_callback(lambda f: finished_q.put((p, f)))

    try:
        for p in itertools.islice(waiting, 2 * workers):
            submit(p)
        for _ in todo:  # each point submitted comes back once: one a turn, and the next one goes in
            p, f = finished_q.get()
            exc = f.exception()
            finished(p, {"error": f"{type(exc).__name__}: {exc}"} if exc else f.result())
            nxt = next(waiting, None)
            if nxt is not None:
                submit(nxt)
    except BaseException:
        procs = list((pool._processes or {}).values())
        for proc in procs:  # the points under way are dropped
            proc.terminate()
        for proc in procs:
            proc.join()
        # a clean shutdown: the pool's queues and their semaphores are released before the
        # process exits (no "leaked semaphore" warning after the last line)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()


def _run_ray(todo: list[SweepPoint], traces: dict[str, Trace | TraceTable], out: Path, address: str, workers: int | None,
             finished) -> None:
    import ray
    started = False
    if not ray.is_initialized():
        import logging

        kw = dict(num_cpus=workers) if address == "local" else dict(address=address)
        try:
            ray.init(**kw, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
        except ConnectionError as e:
            raise SweepError(f"--ray-address {address}: {' '.join(str(e).split())}") from None
        started = True
    try:
        task = ray.remote(_ray_point)
        refs = {str(t): ray.put(tr) for t, tr in traces.items()}
        pending = {task.remote(refs[str(p.trace)], p.config): p for p in todo}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    p = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as e:  # noqa: BLE001 -- a worker lost: the point failed
                        result = {"error": f"{type(e).__name__}: {' '.join(str(e).split())}"}
                    _write_files(out / "points" / p.id, result.pop("files", {}))
                    finished(p, result)
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    finally:
        if started:
            ray.shutdown()


def _write_files(folder: Path, files: dict[str, bytes]) -> None:
    """A Ray point's result files, ``summary.json`` last (atomically: it marks the point finished)."""
    for name in RESULT_FILES:
        (folder / name).unlink(missing_ok=True)
    for name, data in sorted(files.items(), key=lambda kv: kv[0] == "summary.json"):
        tmp = folder / (name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, folder / name)


class _Table:
    """The rows of ``results.parquet``, in grid order, rewritten atomically as points finish."""

    def __init__(self, path: Path, points: list[SweepPoint]):
        self.path = path
        self.order = {p.id: i for i, p in enumerate(points)}
        self.rows: dict[str, dict] = {}
        self.ran = self.skipped = self.failed = 0
        self.last_write = time.monotonic()

    @property
    def done(self) -> int:
        return len(self.rows)

    def add(self, p: SweepPoint, result: dict, skipped: bool = False) -> dict:
        row = {"point_id": p.id, "status": "error" if "error" in result else "ok", "error": result.get("error"),
               **p.config.to_dict(), "trace": str(p.trace)}
        for k, v in (result.get("summary") or {}).items():
            if k == "config" or k in _SAME_AS_CONFIG:
                continue
            row[_RENAMED.get(k, f"summary_{k}") if k in row else k] = v
        self.rows[p.id] = row
        self.skipped += skipped
        self.ran += not skipped
        self.failed += "error" in result
        if time.monotonic() - self.last_write >= FLUSH_EVERY_S:
            self.write()
        return row

    def frame(self) -> pd.DataFrame:
        rows = sorted(self.rows.values(), key=lambda r: self.order[r["point_id"]])
        df = pd.DataFrame(rows, dtype=object)
        for col in df.columns:
            df[col] = df[col].astype(_dtype(col, df[col]))
        df.attrs.update(ran=self.ran, skipped=self.skipped, failed=self.failed)
        return df

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.frame().to_parquet(tmp, index=False)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.last_write = time.monotonic()


def _dtype(col: str, values: pd.Series) -> str:
    """A column's type: a config field's from its annotation, a figure's from its values (nullable)."""
    if col in SimConfig.__dataclass_fields__:
        kinds = {k.strip() for k in _annotation(col).split("|")} - {"None"}
    else:
        kinds = {"bool" if isinstance(v, bool) else "int" if isinstance(v, int) else
                 "float" if isinstance(v, float) else "str" if isinstance(v, str) else "other"
                 for v in values if v is not None}
    if not kinds:
        return "object"
    if kinds == {"bool"}:
        return "boolean"
    if kinds == {"int"}:
        return "Int64"
    if kinds and kinds <= {"int", "float"}:
        return "float64"
    if kinds <= {"str"}:
        return "string"
    return "object"
