"""Workload analysis with the simulated KV working set (what ``cwsim analyze`` runs).

:mod:`traces.analysis` computes every statistic of a trace but runs no
simulation; its ``kv_working_set`` needs the times at which calls arrive and
sessions end. ``analyze`` here supplies them: it simulates the whole trace
once with the never-evicting ``infinite`` policy and hands the run's
``requests.csv`` / ``sessions.csv`` tables to ``traces.analysis.analyze``
(layout of the result: that module's docstring).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd

from cwsim.config import SimConfig
from cwsim.runner import resolve_kv_blocks, simulate
from cwsim.steptime import load_profile
from traces import analysis
from traces.format import Trace

__all__ = ["analyze", "default_pool_blocks", "working_set_inputs"]

#: the simulator's defaults, which this module's block size, agents and profile default to
_DEFAULTS = SimConfig()


def default_pool_blocks(profile: str = _DEFAULTS.profile, block_size: int = _DEFAULTS.block_size) -> int:
    """The KV pool the simulator gives ``profile`` by default (null block included)."""
    return resolve_kv_blocks(SimConfig(profile=profile, block_size=block_size), load_profile(profile))


def working_set_inputs(trace: Trace, *, block_size: int = _DEFAULTS.block_size, pool_blocks: int | None = None,
                       agents: int = _DEFAULTS.agents,
                       profile: str = _DEFAULTS.profile) -> analysis.WorkingSetInputs:
    """The times of one ``infinite``-policy simulation of ``trace``, as ``kv_working_set``'s inputs.

    ``agents`` concurrent sessions, ``profile``'s step times, ``block_size``
    tokens per block; ``pool_blocks`` defaults to the profile's default KV
    pool (:func:`default_pool_blocks`). The run's results folder is temporary.
    """
    if pool_blocks is None:
        pool_blocks = default_pool_blocks(profile, block_size)
    config = SimConfig(policy="infinite", agents=agents, block_size=block_size, profile=profile)
    with tempfile.TemporaryDirectory(prefix="cw-analysis-") as tmp:
        simulate(trace, config, out_dir=tmp)
        requests = pd.read_csv(Path(tmp) / "requests.csv", dtype={"session_id": str})
        sessions = pd.read_csv(Path(tmp) / "sessions.csv", dtype={"session_id": str})
    return analysis.WorkingSetInputs(requests=requests, sessions=sessions, block_size=block_size,
                                     pool_blocks=pool_blocks)


def analyze(trace: Trace, *, block_size: int = _DEFAULTS.block_size, pool_blocks: int | None = None,
            agents: int = _DEFAULTS.agents, profile: str = _DEFAULTS.profile, working_set: bool = True) -> dict:
    """``traces.analysis.analyze(trace)`` with ``kv_working_set`` from a simulation.

    The simulation is :func:`working_set_inputs`'s (same arguments);
    ``working_set=False`` skips it (``kv_working_set`` is ``None``). A trace
    without sessions raises ``ValueError`` before anything is simulated.
    """
    inputs = None
    if working_set and trace.sessions:  # an empty trace: traces.analysis.analyze raises
        inputs = working_set_inputs(trace, block_size=block_size, pool_blocks=pool_blocks, agents=agents,
                                    profile=profile)
    return analysis.analyze(trace, working_set_inputs=inputs)
