"""The workloads the simulator is held to against vLLM (tests/test_oracle.py).

Each is a small trace and the engine it runs on, chosen for the scheduler
behaviour it exercises, not tuned to the simulator: every one was written
before its comparison ran. Sessions are agent-like: prompt k+1 is prompt k,
the answer k, then a tool result.
"""

from __future__ import annotations

import random
from pathlib import Path

from replay.oracle import OracleConfig
from traces.format import Call, Session, ToolCall, Trace

SHARED_TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"


def agent_sessions(n: int, turns: int, seed: int, *, system: int = 0, task=(20, 120), output=(8, 60),
                   tool=(10, 150), gap=(0, 6), start=None, prefix: str = "s") -> list[Session]:
    rng = random.Random(seed)
    out = []
    for s in range(n):
        sid = f"{prefix}{s}"
        prompt = ([("sys", system)] if system else []) + [(f"{sid}:task", rng.randint(*task))]
        calls = []
        for t in range(turns):
            o = rng.randint(*output)
            ts = None if start is None or t else float(start(s, rng))
            calls.append(Call(sid, t, tuple(prompt), o, f"{sid}:o{t}", (ToolCall("bash", "shell", 0.0),),
                              gap_s=float(rng.randint(*gap)), timestamp_s=ts))
            prompt = prompt + [(f"{sid}:o{t}", o), (f"{sid}:r{t}", rng.randint(*tool))]
        out.append(Session(sid, tuple(calls)))
    return out


def tool_mix_sessions(n: int, turns: int, seed: int, *, system: int = 300, task=(40, 160), output=(8, 40),
                      tool=(10, 80)) -> list[Session]:
    """Agent sessions whose tool calls predict their gaps: ``read`` returns at once (0-2 steps),
    ``test`` takes long (25-60 steps); the last call submits. For the policies that read tool-call
    metadata (their predictor learns these categories from the trace)."""
    rng = random.Random(seed)
    out = []
    for s in range(n):
        sid = f"m{s}"
        prompt = ([("sys", system)] if system else []) + [(f"{sid}:task", rng.randint(*task))]
        calls = []
        for t in range(turns):
            o = rng.randint(*output)
            if t == turns - 1:
                tc, gap = ToolCall("submit", "submit", 0.0), 0.0
            elif rng.random() < 0.5:
                tc, gap = ToolCall("cat", "read", 0.0), float(rng.randint(0, 2))
            else:
                tc, gap = ToolCall("pytest", "test", 0.0), float(rng.randint(25, 60))
            calls.append(Call(sid, t, tuple(prompt), o, f"{sid}:o{t}", (tc,), gap_s=gap))
            prompt = prompt + [(f"{sid}:o{t}", o), (f"{sid}:r{t}", rng.randint(*tool))]
        out.append(Session(sid, tuple(calls)))
    return out


def tool_mix_history(turns: int = 6, n: int = 40) -> list[Session]:
    """Other sessions of the :func:`tool_mix_sessions` workload (another seed): the history a
    policy's predictor is fitted on, never the replayed sessions themselves (that is the trace's
    future; and on a few sessions a category like ``submit`` has too few samples to be learnt)."""
    return tool_mix_sessions(n, turns, seed=99)


def miniswe_sample(n_sessions: int, scale: int, max_turns: int) -> Trace:
    """The first real mini-swe-agent sessions (the importer's output of the shared raw trajectories), token
    counts divided by ``scale``, cut to ``max_turns`` calls, gaps to 20 s (``traces.transform.shrink``)."""
    from traces.importers import miniswe
    from traces.transform import shrink

    calls, _ = miniswe.convert(miniswe.find([SHARED_TRACES / "mini-swe-agent-deepseek"])[:n_sessions])
    by_session: dict[str, list[Call]] = {}
    for c in calls:
        by_session.setdefault(c.session_id, []).append(c)
    sessions = [Session(sid, tuple(sorted(cs, key=lambda c: c.turn))) for sid, cs in by_session.items()]
    small = shrink(Trace(sessions), token_scale=scale, max_turns=max_turns, max_sessions=n_sessions, max_gap_s=20.0)
    return Trace(small.sessions, source="mini-swe-agent-deepseek (scaled)")


def OC(**kw) -> OracleConfig:
    kw.setdefault("max_num_seqs", 16)  # vLLM wants max_num_batched_tokens >= max_num_seqs
    return OracleConfig(**kw)


def workloads() -> dict[str, tuple]:
    """name -> (trace factory, OracleConfig)."""
    return {
        "single-stream": (lambda: Trace(agent_sessions(3, 6, seed=1, system=300), source="single-stream"),
                          OC(kv_blocks=40, block_size=32, agents=1)),
        "concurrent-chunked": (lambda: Trace(agent_sessions(6, 5, seed=2, task=(100, 400)), source="chunked"),
                               OC(kv_blocks=120, block_size=32, agents=6, max_num_batched_tokens=96)),
        "heavy-pressure": (lambda: Trace(agent_sessions(8, 5, seed=3, output=(60, 200), tool=(20, 80)),
                                         source="pressure"),
                           OC(kv_blocks=48, block_size=32, agents=8, max_num_batched_tokens=512)),
        "shared-system-prompt": (lambda: Trace(agent_sessions(6, 4, seed=4, system=700), source="shared-system"),
                                 OC(kv_blocks=90, block_size=32, agents=3, max_num_batched_tokens=1024)),
        "longer-than-budget": (lambda: Trace(agent_sessions(4, 4, seed=5, task=(300, 900), tool=(100, 400)),
                                             source="long-prompts"),
                               OC(kv_blocks=160, block_size=32, agents=4, max_num_batched_tokens=128)),
        "simultaneous-arrivals": (lambda: Trace(agent_sessions(6, 4, seed=6, gap=(0, 2),
                                                               start=lambda s, rng: 3 * (s // 3)),
                                                source="simultaneous"),
                                  OC(kv_blocks=80, block_size=32, arrivals="trace",
                                               max_num_batched_tokens=256)),
        "pool-barely-one-prompt": (lambda: Trace(agent_sessions(3, 3, seed=7, task=(200, 260), tool=(20, 40),
                                                                output=(10, 20)), source="tight-pool"),
                                   OC(kv_blocks=16, block_size=32, agents=3, max_num_batched_tokens=256)),
        "max-num-seqs": (lambda: Trace(agent_sessions(8, 3, seed=8), source="max-seqs"),
                         OC(kv_blocks=70, block_size=32, agents=8, max_num_seqs=3)),
        # tool categories that predict the gaps, a shared system prompt: the policies act here
        "tool-mix-tight": (lambda: Trace(tool_mix_sessions(10, 8, seed=12), source="tool-mix"),
                           OC(kv_blocks=50, block_size=32, agents=6, max_num_batched_tokens=512)),
        "tool-mix-roomy": (lambda: Trace(tool_mix_sessions(10, 8, seed=12), source="tool-mix"),
                           OC(kv_blocks=90, block_size=32, agents=6, max_num_batched_tokens=512)),
    }


def miniswe_workload() -> tuple:
    return (lambda: miniswe_sample(6, scale=20, max_turns=12),
            OC(kv_blocks=64, block_size=32, agents=6, max_num_batched_tokens=512))


def assert_exact(c, report: str) -> None:
    """The comparison ``c`` (``replay.compare.compare``) is exact: every call, every evicted block in order."""
    assert not c.call_diffs, report
    assert c.first_eviction_diff is None, report
    assert c.evictions[0] == c.evictions[1] == c.oracle["evicted_blocks"] == c.sim["evicted_blocks"], report
    assert c.oracle["preemptions"] == c.sim["preemptions"], report
    assert c.oracle["cached_prompt_tokens"] == c.sim["cached_prompt_tokens"], report
    assert c.oracle["makespan_s"] == c.sim["makespan_s"] and c.oracle["steps"] == c.sim["steps"], report
