"""The simulator against the oracle: the same trace in both, call by call and block by block.

``compare(trace, OracleConfig(...), out_dir)`` steps the trace
(:func:`replay.oracle.step_trace`), runs it on vLLM (``out_dir/oracle``) and in
``cwsim`` with the unit-step profile and the same pool, block size, limits
and scheduler switches (``out_dir/sim``), then compares:

- per call: arrival, first token and finish (in steps), cached tokens at
  first admission, preemptions (:data:`CALL_FIELDS`);
- the evicted blocks, in order: the simulator's content hashes are mapped to
  the hashes vLLM gives the same tokens (:mod:`replay.tokens`; a call's
  output tokens are the ones the oracle's engine generated).

The result (``compare.json``) lists every differing call and the first
divergence: the earliest call event that differs, and the first eviction
that differs (its position, the step and block hash on each side).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cwsim.config import SimConfig
from cwsim.hashing import block_hashes
from cwsim.runner import simulate
from cwsim.workload import Workload
from replay.oracle import OracleConfig, VllmEngine, run_oracle, step_trace
from replay.tokens import TokenBook, external_hash, vllm_block_hashes
from traces.format import Trace

#: what must agree for every call
CALL_FIELDS = ["arrival_s", "first_token_s", "finish_s", "cached_tokens", "preemptions"]


@dataclass
class Comparison:
    calls: int
    call_diffs: list[dict] = field(default_factory=list)
    evictions: tuple[int, int] = (0, 0)  # (oracle, simulator)
    first_eviction_diff: dict | None = None
    first_divergence: dict | None = None
    oracle: dict = field(default_factory=dict)
    sim: dict = field(default_factory=dict)

    @property
    def exact(self) -> bool:
        return not self.call_diffs and self.first_eviction_diff is None

    def to_json(self) -> dict:
        return {"exact": self.exact, "calls": self.calls, "differing_calls": len(self.call_diffs),
                "evicted_blocks": {"oracle": self.evictions[0], "sim": self.evictions[1]},
                "first_divergence": self.first_divergence, "first_eviction_diff": self.first_eviction_diff,
                "call_diffs": self.call_diffs,
                "oracle_summary": self.oracle, "sim_summary": self.sim}


def sim_settings(settings) -> dict:
    """A server's policy settings (``(name, value)`` pairs) as ``SimConfig`` fields, or ``ValueError``
    naming one the simulator cannot be given."""
    kw = {}
    for name, v in settings:
        if name not in SimConfig.__dataclass_fields__:
            raise ValueError(f"policy setting {name!r} has no cwsim configuration field: the simulator cannot "
                             "be given it")
        kw[name] = v
    return kw


def sim_config_for(oc: OracleConfig, **overrides) -> SimConfig:
    """The ``cwsim`` configuration that models ``oc``'s engine (unit steps, vLLM's policy)."""
    kw = dict(policy=oc.policy or "vllm", profile="unit", kv_blocks=oc.kv_blocks, block_size=oc.block_size,
              max_num_seqs=oc.max_num_seqs, max_num_batched_tokens=oc.max_num_batched_tokens,
              arrivals=oc.arrivals, agents=oc.agents, max_sessions=oc.max_sessions,
              cpu_kv_blocks=0)  # the engine has no CPU KV tier
    kw.update(sim_settings(oc.policy_settings))
    for name in ("scheduler_reserve_full_isl", "watermark", "long_prefill_token_threshold", "async_scheduling"):
        v = getattr(oc, name)
        if v is not None and name in SimConfig.__dataclass_fields__:
            kw[name] = v
    kw.update(overrides)
    return SimConfig(**kw)


def hash_map(trace: Trace, block_size: int, outputs: dict[tuple[str, int], list[int]], vocab_size: int,
             max_sessions: int | None = None) -> dict[int, int]:
    """The simulator's content hash of every block of every call -> vLLM's 64-bit hash of the same tokens."""
    book = TokenBook(vocab_size)
    sessions = trace.sessions[: max_sessions or None]
    for s in sessions:
        for c in s.calls:
            if c.output_segment is not None and (s.session_id, c.turn) in outputs:
                book.record_output(c.output_segment, outputs[(s.session_id, c.turn)])
    wl = Workload.from_trace(Trace(list(sessions), trace.header, trace.source))
    out: dict[int, int] = {}
    for s, ws in zip(sessions, wl.sessions):
        for c, wc in zip(s.calls, ws.calls):
            ours = block_hashes(wc.segs, block_size)
            gen = outputs.get((s.session_id, c.turn), [])
            tokens = book.prompt(c.prompt) + list(gen)
            theirs = vllm_block_hashes(tokens, block_size)
            for a, b in zip(ours, theirs):
                out.setdefault(a, external_hash(b))
    return out


def _load_outputs(path: Path) -> dict[tuple[str, int], list[int]]:
    outputs = {}
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            outputs[(d["session_id"], d["turn"])] = d["tokens"]
    return outputs


def compare(trace: Trace, oc: OracleConfig, out_dir: str | Path, *, engine: VllmEngine | None = None,
            sim_overrides: dict | None = None) -> Comparison:
    out = Path(out_dir)
    stepped = step_trace(trace, oc.steps_per_s)
    oracle = run_oracle(stepped, oc, out / "oracle", engine=engine)
    sim = simulate(stepped, sim_config_for(oc, **(sim_overrides or {})), out / "sim", eviction_log=True)
    return diff_runs(stepped, oc, out, oracle.summary, sim.summary)


def diff_runs(stepped: Trace, oc: OracleConfig, out: Path, oracle_summary: dict, sim_summary: dict,
              vocab_size: int | None = None) -> Comparison:
    """Compare ``out/oracle`` with ``out/sim`` (both written by :func:`compare`)."""
    key = ["session_id", "turn"]
    o = pd.read_csv(out / "oracle" / "requests.csv", dtype={"session_id": str})
    s = pd.read_csv(out / "sim" / "requests.csv", dtype={"session_id": str})
    m = o.merge(s, on=key, how="outer", suffixes=("_oracle", "_sim"), indicator=True)
    diffs = []
    for d in m.to_dict("records"):
        what = {}
        if d["_merge"] != "both":
            what["missing_in"] = "sim" if d["_merge"] == "left_only" else "oracle"
        else:
            for f in CALL_FIELDS:
                a, b = d[f"{f}_oracle"], d[f"{f}_sim"]
                if a != b:
                    what[f] = {"oracle": a, "sim": b}
        if what:
            at = min((v["oracle"] for k, v in what.items() if k.endswith("_s") and isinstance(v, dict)),
                     default=d.get("arrival_s_oracle", float("nan")))
            diffs.append({"session_id": d["session_id"], "turn": int(d["turn"]), "at_step": float(at), **what})
    diffs.sort(key=lambda x: (x["at_step"], x["session_id"], x["turn"]))
    ev_o = pd.read_csv(out / "oracle" / "evictions.csv", dtype={"block_hash": "uint64"})
    ev_s = pd.read_csv(out / "sim" / "evictions.csv", dtype={"block_hash": "int64"})
    outputs = _load_outputs(out / "oracle" / "outputs.jsonl")
    if vocab_size is None:
        vocab_size = int(oracle_summary["vocab_size"])
    hmap = hash_map(stepped, oc.block_size, outputs, vocab_size, oc.max_sessions)
    sim_hashes = [hmap.get(int(h)) for h in ev_s["block_hash"]]
    ora_hashes = [int(h) for h in ev_o["block_hash"]]
    first_ev = None
    for i in range(max(len(sim_hashes), len(ora_hashes))):
        a = ora_hashes[i] if i < len(ora_hashes) else None
        b = sim_hashes[i] if i < len(sim_hashes) else None
        if a != b:
            first_ev = {"index": i,
                        "oracle": None if a is None else {"step": int(ev_o["step"][i]), "block_hash": a},
                        "sim": None if b is None else {"step": int(ev_s["step"][i]), "block_hash": b}}
            break
    first = None
    if diffs:
        first = {"kind": "call", **diffs[0]}
    if first_ev is not None:
        ev_step = min(x["step"] for x in (first_ev["oracle"], first_ev["sim"]) if x is not None)
        if first is None or ev_step < first["at_step"]:
            first = {"kind": "eviction", "at_step": ev_step, **first_ev}
    c = Comparison(len(m), diffs, (len(ora_hashes), len(sim_hashes)), first_ev, first, oracle_summary, sim_summary)
    (out / "compare.json").write_text(json.dumps(c.to_json(), indent=2, default=str) + "\n")
    return c


def format_report(c: Comparison, limit: int = 10) -> str:
    lines = [f"{c.calls} calls; evicted blocks: oracle {c.evictions[0]}, sim {c.evictions[1]}; "
             f"preemptions: oracle {c.oracle.get('preemptions')}, sim {c.sim.get('preemptions')}"]
    if c.exact:
        lines.append("EXACT: every call and every evicted block agree")
        return "\n".join(lines)
    lines.append(f"{len(c.call_diffs)} call(s) differ")
    for d in c.call_diffs[:limit]:
        what = ", ".join(f"{k} {v['oracle']} vs {v['sim']}" if isinstance(v, dict) else f"{k} {v}"
                         for k, v in d.items() if k not in ("session_id", "turn", "at_step"))
        lines.append(f"  step {d['at_step']:g}: {d['session_id']} turn {d['turn']}: {what} (oracle vs sim)")
    if c.first_eviction_diff is not None:
        e = c.first_eviction_diff
        lines.append(f"first differing eviction: #{e['index']}: oracle {e['oracle']}, sim {e['sim']}")
    lines.append(f"first divergence: {c.first_divergence}")
    return "\n".join(lines)
