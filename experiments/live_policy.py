"""A project policy inside a live vLLM server against vLLM's own, and what cwsim predicts for both.

Starts two local servers of the same pool (``replay.server.start_server``):
one with vLLM's scheduler, one with ``--policy P`` through the plugin
(``replay/vllm_plugin``); replays the same trace on each (``replay.live``, in
real time, gaps times ``--time-scale``); then runs each live run again in
``cwsim`` (``replay.live_compare``: the same trace, pool, arrivals, policy and
predictor, step times from ``--profile``). The policy's predictor is fitted
on ``--history`` other sessions of the same workload, never on the replayed
ones. Prints evicted blocks, preemptions and prefix hit rate of all four,
whether the live eviction orders differ, and how far each live run and its
simulation evict the same blocks. Results go to ``--out``.

    .venv/bin/python experiments/live_policy.py --out runs/live-policy            # tool-mix trace, cachewise
    .venv/bin/python experiments/live_policy.py --policy continuum --kv-blocks 48 --out runs/live-continuum

Live timing is real time: the live and simulated runs agree in kind, not step
for step (for that, the in-process oracle: tests/test_vllm_plugin.py).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _evicted(out: Path) -> list[str]:
    with open(out / "evictions.csv", newline="") as f:
        return [r["block_hash"] for r in csv.DictReader(f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--policy", default="cachewise")
    ap.add_argument("--kv-blocks", type=int, default=40)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--time-scale", type=float, default=0.05)
    ap.add_argument("--history", type=int, default=40,
                    help="sessions of the same workload (another seed) the predictor is fitted on: its history")
    ap.add_argument("--profile", default="llama-3.1-8b-h100", help="step-time profile of the simulated runs")
    args = ap.parse_args(argv)

    from replay.live import LiveConfig, run_live
    from replay.live_compare import compare_live, scaled
    from replay.server import ServerConfig, start_server
    from replay.tiny_model import build_tiny_model
    from tests.oracle_workloads import tool_mix_history, tool_mix_sessions
    from traces.format import Trace
    from traces.reader import write_trace

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    trace = Trace(tool_mix_sessions(args.sessions, args.turns, seed=12), source="tool-mix")
    # the predictor is fitted on the workload's history (other sessions of it, the gaps the replay
    # really waits), never on the replayed sessions: that would be the trace's future
    history = scaled(Trace(tool_mix_history(args.turns, args.history), source="tool-mix history"), args.time_scale)
    pred = out / "predictor.jsonl"
    write_trace(pred, [c for s in history.sessions for c in s.calls])
    model = str(build_tiny_model(out / "tiny-llama"))
    sched = dict(max_num_seqs=8, max_num_batched_tokens=512)
    pool = dict(kv_blocks=args.kv_blocks, block_size=32, **sched)
    rows = {}
    for policy in ("vllm", args.policy):
        kw = {} if policy == "vllm" else dict(policy=policy, predictor_trace=str(pred))
        print(f"live {policy}: starting a server ...", flush=True)
        with start_server(ServerConfig(model=model, **pool, **kw), out / f"srv-{policy}") as srv:
            cfg = LiveConfig(server=srv.url, events=srv.events, events_replay=srv.events_replay,
                             time_scale=args.time_scale, agents=args.agents, policy=policy,
                             predictor_trace=kw.get("predictor_trace"))
            rows[f"live {policy}"] = run_live(trace, cfg, out / f"live-{policy}", vocab_size=srv.vocab_size).summary
    comps = {}
    for policy in ("vllm", args.policy):  # the same run in cwsim: policy, predictor, pool, arrivals, time scale
        comps[policy] = c = compare_live(out / f"live-{policy}", args.profile, trace=trace, **sched)
        rows[f"cwsim {policy}"] = {"evicted_blocks": c["evicted_blocks"]["sim"], "preemptions": c["preemptions"]["sim"],
                                   "prefix_hit_rate": c["prefix_hit_rate"]["sim"]}
    keys = ("evicted_blocks", "preemptions", "prefix_hit_rate")
    print(f"{'run':<22}" + "".join(f"{k:>22}" for k in keys))
    for name, s in rows.items():
        print(f"{name:<22}" + "".join(f"{s.get(k, float('nan')):>22.4g}" for k in keys))
    differ = _evicted(out / f"live-{args.policy}") != _evicted(out / "live-vllm")
    print(f"live eviction orders differ: {differ}")
    for policy, c in comps.items():
        first = c["first_differing_eviction"]
        print(f"{policy}: live and cwsim evict the same first {first['index'] if first else 'all'} blocks; "
              f"distinct evicted blocks in common {100 * (c['evicted_in_common'] or 0):.0f}%")
    (out / "live_policy.json").write_text(json.dumps({"rows": rows, "live_orders_differ": differ, "compare": comps},
                                                     indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
