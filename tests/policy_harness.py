"""Helpers for the policy unit tests: a pool bound to a policy through the simulator's adapter
(``cwsim.policy_adapter.SimEnvironment``), sessions, and requests that arrive and finish as the
scheduler makes them (a view at arrival; the finish time set before the table is released, then
``on_finish``)."""

from __future__ import annotations

import numpy as np

from cwsim.block_pool import BlockPool
from cwsim.kv_cache_manager import KVCacheManager
from cwsim.policy_adapter import SimEnvironment
from cwsim.request import Request
from cwsim.workload import SessionState, SimCall
from traces.format import ToolCall


def bound_pool(policy, num_blocks: int, block_size: int = 4, **env_kw) -> tuple[BlockPool, SimEnvironment]:
    """A bare pool of ``num_blocks`` blocks whose eviction order is ``policy``'s (``env_kw``: the
    adapter's ``predictor``, ``cpu_tier``, ``future``, ``session_idle_s``)."""
    pool = BlockPool(num_blocks)
    env = SimEnvironment(policy, KVCacheManager(pool, block_size), **env_kw)
    assert env.pool is pool and policy.env is env
    return pool, env


def tool_session(index: int, sid: str, cats=(None,), prompt: int = 8) -> SessionState:
    """A session whose call k's response calls one tool of category ``cats[k]`` (None: no tool call)."""
    calls = [SimCall((), prompt, 1, 0.0, 0, (ToolCall("t", c, 0.0),) if c else ()) for c in cats]
    return SessionState(index, sid, calls, None)


def arrive(env: SimEnvironment, rid: int, sess, turn: int = 0, arrival: float = 0.0, prompt: int = 8,
           output: int = 1, hashes=()) -> Request:
    """A request of ``sess`` that arrives in the engine at ``arrival`` (it gets its view), as the
    ``rid``-th request the engine has seen arrive (its ``number``)."""
    r = Request(rid, sess, turn, prompt, output, list(hashes), arrival)
    env._requests = rid  # the adapter numbers requests in the order they arrive: this one is the rid-th
    env.on_arrival(r)
    assert r.view is not None and r.view.number == rid
    return r


def release(env: SimEnvironment, blocks: np.ndarray, req: Request | None, now: float, reason: str = "finish") -> None:
    """``req`` releases its block table ``blocks`` at ``now`` (tail first), as the scheduler does:
    the clock moves to ``now``; a finish sets the request's finish time first and tells the
    adapter after."""
    env.now = now
    finished = reason == "finish" and req is not None
    if finished:
        req.finish = now
    env.pool.free_block_table(np.asarray(blocks, dtype=np.int64), req, now, reason)
    if finished:
        env.on_finish(req, now)
