"""The compiled modules (``cwsim.native``): built, in use, and the same as their Python twins.

Each compiled class has a Python class that specifies it (``PyFreeBlockQueue``, ``PyPoolCore``). The
build must have compiled them (``setup.py``; CI compiles them): a missing build would make every
other test check the Python classes only. The Python twins must give the same results: they pass the
pool's property tests under ``CWSIM_PURE_PYTHON=1``, and whole simulations give the same figures and
the same per-request CSV bytes either way.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cwsim import native
from cwsim.block_pool import BlockPool, PoolCore, PyPoolCore
from cwsim.config import SimConfig
from cwsim.free_queue import FreeBlockQueue, PyFreeBlockQueue
from cwsim.kv_cache_manager import KVCacheManager, PyKVCacheManager
from cwsim.metrics import count_misses, py_count_misses
from cwsim.request import Request
from cwsim.runner import DEFAULT_TRACE, simulate
from traces.format import Trace
from traces.reader import load_trace

ROOT = Path(__file__).resolve().parents[1]
PURE = {**os.environ, native.PURE_PYTHON_ENV: "1"}

#: small runs under pressure that go through every path of the pool: LRU, a scoring policy (release
#: scores, re-scoring), a CPU tier (uncached releases), an unbounded pool (growth), the eviction bound
#: (the reference stream), block size 32 with the eviction log
CASES = {
    "vllm": dict(policy="vllm", kv_blocks=6000, agents=6),
    "cachewise": dict(policy="cachewise", kv_blocks=6000, agents=6),
    "continuum": dict(policy="continuum", kv_blocks=6000, agents=6),
    "tokencake-cpu": dict(policy="tokencake", kv_blocks=6000, agents=6, cpu_kv_blocks=8000),
    "infinite": dict(policy="infinite", agents=6),
    "bound": dict(policy="vllm", kv_blocks=6000, agents=6, eviction_bound=True),
    "bs32": dict(policy="vllm", kv_blocks=3000, agents=6, block_size=32),
}


def _digest(out: Path, case: str) -> dict:
    """One case's summary (less the wall time) and the digests of its CSV files."""
    trace = load_trace(DEFAULT_TRACE)
    small = Trace(trace.sessions[:12], trace.header, "small")
    d = out / case
    r = simulate(small, SimConfig(**CASES[case]), d, eviction_log=case == "bs32")
    files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.iterdir()) if f.suffix == ".csv"}
    return {"summary": {k: v for k, v in r.summary.items() if k not in ("wall_s", "trace")}, "files": files}


def test_the_compiled_modules_were_built_and_are_in_use():
    assert sorted(native.available()) == sorted(native.MODULES)
    assert FreeBlockQueue is not PyFreeBlockQueue and PoolCore is not PyPoolCore
    assert issubclass(BlockPool, PoolCore)
    assert native.in_use() == {py: name for name, py in native.MODULES.items()}


def test_each_compiled_module_holds_the_digest_of_the_sources_it_was_built_from():
    import importlib

    digest = native.source_digest()
    assert len(digest) == 64
    for name in native.MODULES:
        assert importlib.import_module(name).SOURCE_DIGEST == digest, name


def test_a_stale_build_is_not_used(monkeypatch, tmp_path):
    """Sources changed since the build (a pull without reinstalling): the Python twins run, with a warning."""
    monkeypatch.setattr(native, "_current_digest", lambda: "0" * 64)
    with pytest.warns(RuntimeWarning, match="run `pip install -e .` again to rebuild"):
        native._warn_stale.cache_clear()
        assert native.load("cwsim._block_pool") is None
    assert native.available() == []
    native._warn_stale.cache_clear()
    # an installed package (no sources beside the modules) is never stale
    assert native.source_digest(tmp_path) == ""
    monkeypatch.setattr(native, "_current_digest", lambda: "")
    assert native.load("cwsim._block_pool") is not None


def test_pure_python_env_runs_the_python_classes():
    out = subprocess.run([sys.executable, "-c", "from cwsim import native; print(sorted(native.in_use().items()))"],
                         env=PURE, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(sorted((py, py) for py in native.MODULES.values()))


@pytest.mark.parametrize("module", sorted(native.MODULES))
def test_a_compiled_module_imported_first_imports(module):
    """A compiled module does not import its Python twin at import time (which imports it back)."""
    code = f"import {module}; from cwsim import native; print(sorted(native.in_use().values()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(sorted(native.MODULES))


def test_the_python_twins_pass_the_pool_property_tests():
    tests = ["tests/test_block_pool_properties.py", "tests/test_block_pool_vllm.py", "tests/test_free_queue_native.py"]
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", *tests],
                         cwd=ROOT, env=PURE, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_simulation_is_the_same_compiled_or_not(case, tmp_path):
    compiled = _digest(tmp_path / "compiled", case)
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, 'tests'); "
            "from test_native import _digest; "
            f"print(json.dumps(_digest(Path({str(tmp_path / 'python')!r}), {case!r}), default=str))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=PURE, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    python = json.loads(run.stdout.strip().splitlines()[-1])
    assert json.loads(json.dumps(compiled, default=str)) == python
    assert compiled["summary"]["evicted_blocks"] > 0 or case == "infinite"


@settings(max_examples=200, deadline=None)
@given(flags=st.lists(st.booleans(), min_size=1, max_size=40),
       missed=st.lists(st.integers(0, 60), max_size=30, unique=True),
       cached=st.sets(st.integers(0, 60), max_size=30), as_range=st.booleans())
def test_count_misses_compiled_is_its_python_twin(flags, missed, cached, as_range):
    """The same (harmful, in_cache) and the same flags cleared, ids past the flags included."""
    if as_range:  # a call's own ids come as a range
        missed = range(min(missed, default=0), max(missed, default=-1) + 1)
    cached = {h: h + 1000 for h in cached}
    a = np.array(flags, dtype=np.uint8)
    b = a.copy()
    want = py_count_misses(a, cached, missed)
    assert count_misses(b, cached, missed) == want
    assert (a == b).all()
    assert want[0] == sum(1 for h in missed if h < len(flags) and flags[h])
    assert not a[[h for h in missed if h < len(a)]].any()


def test_a_non_array_is_refused_by_the_compiled_pool():
    """The compiled modules read arrays' data directly: anything but a C-contiguous int64 array is a
    TypeError, not a wrong read."""
    if not native.in_use()["cwsim.free_queue"].startswith("cwsim._"):
        pytest.fail("the compiled free queue is not in use")
    q = FreeBlockQueue(8, np.arange(1, 8))
    with pytest.raises(TypeError, match="int64"):
        q.remove_ids(np.arange(1, 3, dtype=np.int32))
    with pytest.raises(TypeError, match="int64"):
        q.remove_ids(np.arange(1, 7)[::2])
    assert q.num_free_blocks == 7


@settings(max_examples=200, deadline=None)
@given(tables=st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4)), min_size=1, max_size=5),
       picks=st.lists(st.integers(0, 4), max_size=20))
def test_hand_out_compiled_is_its_python_twin(tables, picks):
    """The same tables and counts, where a table has room (a store) and where it is full (it grows)."""
    def requests():
        reqs = []
        for i, (used, room) in enumerate(tables):
            r = Request(i, None, 0, 10, 10, [], 0.0)
            r.table = np.full(used + room, -1, dtype=np.int64)
            r.table[:used] = np.arange(100 * i, 100 * i + used)
            r.nblk = used
            reqs.append(r)
        return reqs
    order = [p % len(tables) for p in picks]
    blocks = np.arange(1000, 1000 + len(order), dtype=np.int64)
    a, b = requests(), requests()
    PyKVCacheManager(BlockPool(4), 16).hand_out([a[i] for i in order], blocks)
    KVCacheManager(BlockPool(4), 16).hand_out([b[i] for i in order], blocks)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.nblk == y.nblk == tables[i][0] + order.count(i)
        assert x.blocks.tolist() == y.blocks.tolist()
        assert x.blocks.tolist()[tables[i][0]:] == [1000 + j for j, o in enumerate(order) if o == i]


@settings(max_examples=150, deadline=None)
@given(reqs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 6)), min_size=1, max_size=4),
       picks=st.lists(st.integers(0, 3), max_size=12), dup=st.booleans())
def test_cache_next_blocks_compiled_is_its_python_twin(reqs, picks, dup):
    """The same blocks cached, listed or unlisted, in the same order (duplicates of a hash included),
    and the same counts, for requests that repeat."""
    order = [p % len(reqs) for p in picks]

    def run(manager):
        pool = BlockPool(64)
        kv = manager(pool, 4)
        made = []
        for i, (cached, unlisted_from) in enumerate(reqs):
            need = cached + order.count(i)
            r = Request(i, None, 0, 4 * need, 1, [7 * (i % 2 if dup else i) + j for j in range(need)], 0.0)
            r.table, r.nblk = pool.get_new_blocks(need).copy(), need
            kv.cache_blocks_of([(r, 4 * cached)])
            r.unlisted_from = unlisted_from
            made.append(r)
        kv.cache_next_blocks([made[i] for i in order])
        return ([r.num_cached_blocks for r in made], sorted(pool.cached.items()),
                pool.has_hash.tolist(), pool.unlisted.tolist())

    py, compiled = run(PyKVCacheManager), run(KVCacheManager)
    assert py == compiled
    assert py[0] == [c + order.count(i) for i, (c, _) in enumerate(reqs)]
