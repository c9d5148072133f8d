"""experiments/profile_layers.py: py-spy's raw samples of ``simulate`` split into layers."""

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("profile_layers", REPO / "experiments" / "profile_layers.py")
profile_layers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_layers)

R = f"{REPO}/"  # frames name files by absolute path
SITE = "/x/.venv/lib/python3.11/site-packages/"
TOP = f"<module> ({R}loop.py:9);simulate ({R}cwsim/runner.py:120);Environment.run ({SITE}simpy/core.py:214)"


def test_each_sample_goes_to_its_layer():
    raw = [
        # Python code: by its innermost Python frame's file
        f"{TOP};Engine.run ({R}cwsim/engine.py:150);Scheduler.schedule ({R}cwsim/scheduler.py:300) 7",
        f"{TOP};Engine.run ({R}cwsim/engine.py:150) 3",
        f"{TOP};Environment.step ({SITE}simpy/core.py:182) 2",
        # a compiled module, with what it calls: numpy and the dicts' C code too; the innermost module counts
        f"{TOP};allocate_slots ({R}cwsim/_kv_cache_manager.pyx:60);get_new_blocks ({R}cwsim/_block_pool.pyx:280);"
        f"PyArray_NewFromDescr_int ({SITE}numpy/_core/_multiarray_umath.so) 5",
        f"{TOP};allocate_slots ({R}cwsim/_kv_cache_manager.pyx:60);malloc (libc.so.6) 1",
        # numpy and the collector from Python code
        f"{TOP};Scheduler._admit ({R}cwsim/scheduler.py:530);array_empty ({SITE}numpy/_core/_multiarray_umath.so) 4",
        f"{TOP};Scheduler._admit ({R}cwsim/scheduler.py:530);gc_collect_main (libpython3.11.so.1.0) 2",
        # the workload's preparation, whatever file runs
        f"{TOP};Workload.from_trace ({R}cwsim/workload.py:100);common_prefix_len ({R}traces/sequences.py:20) 6",
        # not under simulate: left out
        f"<module> ({R}loop.py:5);load_trace ({R}traces/io.py:10) 50",
        "",
    ]
    got = profile_layers.layers(line + "\n" for line in raw)
    assert got == {
        "python: cwsim/scheduler.py": 7,
        "python: cwsim/engine.py": 3,
        "python: simpy": 2,
        "compiled: block_pool": 5,
        "compiled: kv_cache_manager": 1,
        "numpy": 4,
        "gc": 2,
        "python: workload prep": 6,
    }


def test_report_gives_seconds_and_the_python_floor():
    counts = {"python: cwsim/scheduler.py": 30, "python: simpy": 20, "compiled: block_pool": 40, "numpy": 10}
    text = profile_layers.report(counts, cpu_per_run=0.5, calls=1000)
    lines = text.splitlines()
    assert lines[1].split() == ["compiled:", "block_pool", "40.0%", "0.200"]  # largest first
    assert "1000 calls in 0.500 s of CPU a run = 2,000 calls/s" in text
    # Python layers: 50% of 0.5 s = 0.25 s a run, so 4,000 calls/s at most
    assert lines[-1].startswith("the Python layers alone: 50.0% = 0.250 s a run: at most 4,000 calls/s")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"line 2: not py-spy's raw format"):
        profile_layers.layers([f"{TOP} 1\n", "no count here\n"])
    with pytest.raises(ValueError, match="no sample lies under simulate"):
        profile_layers.report({}, 1.0, 10)
