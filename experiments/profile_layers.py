"""Where a simulation's time goes, by layer: a sampling profile of ``simulate`` on the bundled trace.

What it measures
    ``cwsim.runner.simulate`` on the bundled trace (the default profile's pool, 16 concurrent
    agents, vLLM's policy: ``experiments/bench_sim.py``'s k=1 point), run ``--runs`` times in a
    child process that py-spy samples with its native frames (``--native``: C functions of the
    compiled modules, numpy and the interpreter show as frames). Each sample is put in one layer:

    - ``compiled: <module>``: a sample whose outermost frame outside Python code (under
      ``simulate``) is a compiled module's (``cwsim/_*.pyx``), put under the innermost compiled
      module in it: that module's own code with the C-API work it does (the Python dicts and
      ints it works on, numpy arrays it makes);
    - ``numpy``, ``gc``: a sample whose outermost such frame is numpy's, or the cyclic garbage
      collector's;
    - otherwise Python code, by the innermost Python frame's file: ``python: <file>``
      (``cwsim/scheduler.py``, ``cwsim/engine.py``, ``simpy/...``), except samples under the
      workload's preparation (``Workload.from_trace`` / ``_make``), which are ``python: workload
      prep`` whatever file they are in.

    Each layer's share of the samples, and its seconds a run: the share times the best CPU time
    of a run (``time.process_time``; the child prints it). The last line is the floor that the
    Python layers set: the calls per second a run would reach if every compiled module, numpy and
    the collector took no time at all.

Needs
    py-spy (the ``profile`` extra: ``pip install -e '.[profile]'``, py-spy 0.4.3). Started as the
    child's parent it needs no privileges. ``--raw FILE`` analyses a raw profile already recorded
    (``py-spy record --native -f raw``) instead.

How to run
    .venv/bin/python experiments/profile_layers.py                 # 30 runs sampled at 500 Hz
    .venv/bin/python experiments/profile_layers.py --runs 10 --rate 250
    .venv/bin/python experiments/profile_layers.py --raw prof.txt --cpu-per-run 0.66 --calls 4129

Recorded runs: ``experiments/results/profile-2026-12-07/``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

#: a frame as py-spy's raw format writes it: ``function (file:line)``, or a bare address / C function
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_SITE = re.compile(r"^.*/(?:site-packages|dist-packages)/")
_REPO = str(Path(__file__).resolve().parent.parent) + "/"


def _file(frame: str) -> str:
    """The frame's file, relative to the repository or to site-packages ('' for a bare address)."""
    m = _FRAME.match(frame)
    if m is None:
        return ""
    path = m["file"]
    if path.startswith(_REPO):
        return path[len(_REPO):]
    return _SITE.sub("", path)


def _func(frame: str) -> str:
    m = _FRAME.match(frame)
    return frame if m is None else m["func"]


def layer(frames: list[str]) -> str | None:
    """The layer of one sample (its frames outermost first), or None when it is not under ``simulate``."""
    top = next((i for i, f in enumerate(frames) if _func(f) == "simulate"), None)
    if top is None:
        return None
    below = frames[top + 1:]
    for f in below:
        path = _file(f)
        if path.endswith((".pyx", ".pxi")):  # the module: the innermost compiled frame's
            path = [p for p in map(_file, below) if p.endswith((".pyx", ".pxi"))][-1]
            return "compiled: " + path.rsplit("/", 1)[-1].split(".", 1)[0].lstrip("_")
        if path.startswith("numpy/"):
            return "numpy"
        if _func(f).startswith("gc_collect"):
            return "gc"
    if any(_func(f) in ("Workload.from_trace", "Workload._make", "Workload.session") for f in below):
        return "python: workload prep"
    py = [p for p in map(_file, below) if p.endswith(".py")]
    if not py:
        return "python: interpreter"  # (samples in the interpreter itself, above any Python frame)
    path = py[-1]
    return "python: simpy" if path.startswith("simpy/") else "python: " + path


def layers(lines) -> Counter:
    """Samples per layer, from py-spy's raw format (``frame;frame;... count`` a line)."""
    counts: Counter = Counter()
    for n_line, line in enumerate(lines, 1):
        line = line.rstrip("\n")
        if not line:
            continue
        stack, sep, n = line.rpartition(" ")
        if not sep or not n.isdigit():
            raise ValueError(f"line {n_line}: not py-spy's raw format ('frame;frame;... count'): {line[:80]!r}")
        key = layer(stack.split(";"))
        if key is not None:
            counts[key] += int(n)
    return counts


def report(counts: Counter, cpu_per_run: float, calls: int) -> str:
    total = sum(counts.values())
    if not total:
        raise ValueError("no sample lies under simulate: was the profile recorded from this script's child?")
    rows = [f"{'layer':<40} {'share':>7} {'s a run':>8}"]
    for key, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        rows.append(f"{key:<40} {100 * n / total:6.1f}% {cpu_per_run * n / total:8.3f}")
    python = sum(n for k, n in counts.items() if k.startswith("python"))
    py_s = cpu_per_run * python / total
    rows.append(f"{calls} calls in {cpu_per_run:.3f} s of CPU a run = {calls / cpu_per_run:,.0f} calls/s")
    rows.append(f"the Python layers alone: {100 * python / total:.1f}% = {py_s:.3f} s a run: at most "
                f"{calls / py_s:,.0f} calls/s with the compiled modules, numpy and the collector free")
    return "\n".join(rows)


def _child(runs: int) -> None:
    """Run the bundled trace ``runs`` times; print calls and the best CPU seconds of a run."""
    from cwsim.config import SimConfig
    from cwsim.runner import DEFAULT_TRACE, resolve_kv_blocks, simulate
    from cwsim.steptime import load_profile
    from traces import load_trace

    trace = load_trace(DEFAULT_TRACE)
    base = SimConfig(policy="vllm")
    cfg = SimConfig(policy="vllm", kv_blocks=resolve_kv_blocks(base, load_profile(base.profile)),
                    arrivals="concurrent", agents=16)
    best, calls = float("inf"), 0
    for _ in range(runs):
        t = time.process_time()
        calls = simulate(trace, cfg).summary["requests"]
        best = min(best, time.process_time() - t)
    print(f"CHILD {calls} {best!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="simulations sampled (default 30)")
    ap.add_argument("--rate", type=int, default=500, help="py-spy's samples per second (default 500)")
    ap.add_argument("--raw", type=Path, help="analyse this raw py-spy profile instead of recording one")
    ap.add_argument("--cpu-per-run", type=float, help="with --raw: the CPU seconds of a run")
    ap.add_argument("--calls", type=int, help="with --raw: the calls of a run")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        _child(a.runs)
        return
    if a.raw is not None:
        if a.cpu_per_run is None or a.calls is None:
            ap.error("--raw needs --cpu-per-run and --calls")
        try:
            with open(a.raw) as f:
                print(report(layers(f), a.cpu_per_run, a.calls))
        except (OSError, ValueError) as e:
            sys.exit(f"error: --raw {a.raw}: {e.strerror if isinstance(e, OSError) else e}")
        return
    # (the environment's own first: its bin folder is not on PATH unless it is activated)
    spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if spy is None:
        sys.exit("error: py-spy not found on PATH: pip install -e '.[profile]' (or pass --raw FILE)")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.txt"
        cmd = [spy, "record", "--native", "-r", str(a.rate), "-f", "raw", "-o", str(raw), "--",
               sys.executable, __file__, "--child", "--runs", str(a.runs)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        child = [ln for ln in out.stdout.splitlines() if ln.startswith("CHILD ")]
        if out.returncode or not child or not raw.exists():
            sys.exit(f"error: py-spy record failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
        _, calls, cpu = child[-1].split()
        print(f"py-spy {a.rate} Hz, {a.runs} runs of the bundled trace")
        with open(raw) as f:
            print(report(layers(f), float(cpu), int(calls)))


if __name__ == "__main__":
    main()
