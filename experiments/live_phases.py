"""Why cwsim's per-call phases differ from the live vLLM-CPU study's (offline analysis, no server).

Reads ``experiments/results/live-ratios-2026-12-06`` (16 sessions, 384 calls, 4 policies x 8 live
repeats) and re-simulates every policy as an ensemble (``--seeds`` step-jitter seeds, 0.05), with the
simulator instrumented in-process (``Scheduler.schedule``/``update`` and ``Engine.submit`` wrapped, no
file touched) to log every step (start, end, P, A, D, C) and when each call reaches the engine.

What it prints (phases: queue = first_scheduled - arrival, prefill = first_token - first_scheduled,
decode = finish - first_token; sums over the 384 calls, sim / live):

1. the phase ratios as cwsim writes its times, and "live-style": measured the way the replay
   measures a live call. vLLM's ``queue_time_ms`` starts at the QUEUED event, stamped when the engine
   core's busy loop drains its input queue *between* steps (``EngineCore.run_busy_loop``), and
   ``replay.live`` puts first_scheduled = sent + queue_ms and first_token = sent + queue_ms + ttft_ms,
   so the wait from sending to the next step boundary (frontend + rest of the step in flight) is
   missing from live "queue" and lands in live "decode". Live-style sim: queue from the first step
   start at/after the call reaches the engine; decode gets the hidden wait added;
2. per-call decode residual (live mean over repeats - sim mean over seeds), fitted as
   const + k * (output_tokens - 1), raw and live-style;
3. calls with no other call in flight (out-of-engine latency on a quiet server);
4. busy time (union of calls' [arrival, finish]) of each run regressed on the profile's prefill time
   of the run's computed tokens, live and sim;
5. sim / live prefill by how many steps the call's prefill spans in the simulation;
6. with ``--grid``: phase ratios (live-style) for profile copies (prefill terms x a,
   frontend_step_share s) written to a temporary folder.

Run (about 10 s, plus ~3 s per grid point with 8 seeds)::

    .venv/bin/python experiments/live_phases.py [--seeds 8] [--grid]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from cwsim import engine as _engine
from cwsim import scheduler as _sched
from cwsim.runner import simulate
from replay.live_compare import simulation_of
from traces.reader import load_trace

R = Path(__file__).resolve().parent / "results" / "live-ratios-2026-12-06"
POLICIES = ["vllm", "working-set", "working-set-evict", "sglang"]
KEY = ["policy", "session_id", "turn"]

# ----------------------------------------------------------------------------- instrumentation
_steps: list[list] = []
_submits: dict[tuple[str, int], float] = {}
_orig_schedule, _orig_update, _orig_submit = _sched.Scheduler.schedule, _sched.Scheduler.update, _engine.Engine.submit


def _schedule(self, now):
    plan = _orig_schedule(self, now)
    _steps.append([now, np.nan, plan.prefill_tokens, plan.attn_pairs, plan.decode_seqs, plan.decode_ctx])
    return plan


def _update(self, plan, now):
    _steps[-1][1] = now
    return _orig_update(self, plan, now)


def _submit(self, sess, turn, sent=None):
    _submits[(sess.session_id, turn)] = self.env.now
    return _orig_submit(self, sess, turn, sent)


_sched.Scheduler.schedule, _sched.Scheduler.update, _engine.Engine.submit = _schedule, _update, _submit


def phases(d: pd.DataFrame) -> pd.DataFrame:
    d["queue"] = d.first_scheduled_s - d.arrival_s
    d["prefill"] = d.first_token_s - d.first_scheduled_s
    d["decode"] = d.finish_s - d.first_token_s
    return d


def live_calls() -> pd.DataFrame:
    out = []
    for p in POLICIES:
        for k in range(8):
            d = pd.read_csv(R / f"r{k}-{p}" / "requests.csv")
            d["policy"], d["rep"] = p, k
            out.append(d)
    return phases(pd.concat(out, ignore_index=True))


_TRACE = None


def sim_calls(policy: str, seed: int, profile: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One jittered simulation of ``policy``: its calls (with live-style q_ls, d_ls) and its steps."""
    global _TRACE
    if _TRACE is None:
        _TRACE = load_trace(R / "trace.jsonl")
    t, cfg = simulation_of(R / f"r0-{policy}", profile, max_num_seqs=8, max_num_batched_tokens=512, trace=_TRACE,
                           predictor_trace=str(R / "predictor.jsonl") if policy != "vllm" else None)
    _steps.clear()
    _submits.clear()
    with tempfile.TemporaryDirectory() as td:
        simulate(t, replace(cfg, step_jitter=0.05, seed=seed), out_dir=td)
        d = phases(pd.read_csv(Path(td) / "requests.csv"))
    st = pd.DataFrame(_steps, columns=["start", "end", "P", "A", "D", "C"])
    starts = np.sort(st.start.values)
    sub = np.array([_submits[(s, int(k))] for s, k in zip(d.session_id, d.turn)])
    i = np.searchsorted(starts, sub - 1e-12)
    qe = np.where(i < len(starts), starts[np.minimum(i, len(starts) - 1)], sub)
    qe = np.minimum(np.maximum(qe, sub), d.first_scheduled_s.values)  # vLLM's QUEUED stamp
    d["submit_s"], d["queued_eq"] = sub, qe
    d["q_ls"] = d.first_scheduled_s - qe
    d["d_ls"] = d.decode + (qe - d.arrival_s)
    d["policy"], d["rep"] = policy, seed
    # each call's prefill-phase steps (count and summed features), from the step log
    st = st.dropna(subset=["end"]).sort_values("start").reset_index(drop=True)
    cs = np.vstack([np.zeros(5), np.cumsum(np.c_[np.ones(len(st)), st.P, st.A, st.D, st.C], axis=0)])
    a = np.searchsorted(st.start.values, d.first_scheduled_s.values - 2e-6)  # (times are rounded to 1 us)
    b = np.searchsorted(st.end.values, d.first_token_s.values + 2e-6)
    f = cs[np.maximum(a, b)] - cs[a]
    for k, n in enumerate(["S", "P", "A", "D", "C"]):
        d[f"pf_{n}"] = f[:, k]
    return d, st


def ensemble(profile: str, seeds) -> pd.DataFrame:
    return pd.concat([sim_calls(p, s, profile)[0] for p in POLICIES for s in seeds], ignore_index=True)


def ratios(sim: pd.DataFrame, live: pd.DataFrame, cols=("queue", "prefill", "decode")) -> pd.DataFrame:
    nl, ns = live.rep.nunique(), sim.rep.nunique()
    lv = live.groupby("policy")[["queue", "prefill", "decode"]].sum() / nl
    sm = sim.groupby("policy")[list(cols)].sum() / ns
    sm.columns = ["queue", "prefill", "decode"]
    lv["e2e"], sm["e2e"] = lv.sum(axis=1), sm.sum(axis=1)
    return (sm / lv).loc[POLICIES]


def _union(d: pd.DataFrame) -> float:
    iv = sorted(zip(d.arrival_s, d.finish_s))
    tot, (cs, ce) = 0.0, iv[0]
    for s, e in iv[1:]:
        if s > ce:
            tot, cs, ce = tot + ce - cs, s, e
        else:
            ce = max(ce, e)
    return tot + ce - cs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--grid", action="store_true", help="also try profile variants (prefill x a, frontend share)")
    args = ap.parse_args()
    pd.set_option("display.width", 160)
    prof_path = str(R / "server-profile.json")
    prof = json.loads(Path(prof_path).read_text())
    live = live_calls()
    sim = ensemble(prof_path, range(args.seeds))

    print("1. sim/live phase sums (queue/prefill/decode/e2e)\n   as cwsim writes them:")
    print(ratios(sim, live).round(3).to_string())
    print("   live-style (queue from vLLM's QUEUED stamp = next step boundary; the wait before it in decode):")
    print(ratios(sim, live, ("q_ls", "prefill", "d_ls")).round(3).to_string())
    print("   hidden wait (engine arrival -> next step boundary), ms/call:",
          ((sim.queued_eq - sim.arrival_s).groupby(sim.policy).mean() * 1e3).round(1).to_dict())

    lm = live.groupby(KEY)[["decode", "prefill", "output_tokens"]].mean()
    sm = sim.groupby(KEY)[["decode", "d_ls", "prefill", "pf_S"]].mean().add_prefix("sim_")
    j = lm.join(sm)
    print("\n2. per-call decode residual live - sim = const + k*(output_tokens-1):")
    for col in ("sim_decode", "sim_d_ls"):
        y = (j.decode - j[col]).values
        X = np.c_[np.ones(len(j)), j.output_tokens - 1]
        b = np.linalg.lstsq(X, y, rcond=None)[0]
        print(f"   vs {col:10s}: const {b[0] * 1e3:6.1f} ms, k {b[1] * 1e3:5.2f} ms/token, mean {y.mean() * 1e3:5.1f} ms")

    alone = []
    for _, d in live.groupby(["policy", "rep"]):
        s, f = d.sent_s.values, d.finish_s.values
        for i in range(len(d)):
            if ((np.minimum(f, f[i]) - np.maximum(s, s[i])) > 0).sum() == 1:
                alone.append(d.iloc[i])
    al = pd.DataFrame(alone)
    extra = al.decode - (al.output_tokens - 1) * (prof["step_overhead_s"] + prof["decode_seq_s"])
    print(f"\n3. {len(al)} live calls alone in flight: decode - (n-1)*decode step = {extra.median() * 1e3:.1f} ms "
          f"median (profile request_overhead_s {prof['request_overhead_s'] * 1e3:.1f} ms)")

    rows = []
    for (src, df) in (("live", live), ("sim", sim)):
        for (p, rep), d in df.groupby(["policy", "rep"]):
            q, c = d.prompt_tokens - d.cached_tokens, d.cached_tokens
            pre = prof["prefill_token_s"] * q.sum() + prof["prefill_attn_pair_s"] * (q * c + q * (q + 1) / 2).sum()
            rows.append((src, pre, _union(d)))
    t = pd.DataFrame(rows, columns=["src", "pre", "busy"])
    print("\n4. per-run busy time = c0 + c1 * (profile's prefill time of the run's computed prompt tokens):")
    for src, g in t.groupby("src"):
        b = np.linalg.lstsq(np.c_[np.ones(len(g)), g.pre], g.busy, rcond=None)[0]
        print(f"   {src}: {b[0]:.2f} s + {b[1]:.3f} x")

    g = j.groupby(pd.cut(j.sim_pf_S, [0, 1.5, 2.5, 100]), observed=True).agg(
        calls=("prefill", "size"), sim_s=("sim_prefill", "sum"), live_s=("prefill", "sum"))
    g["sim/live"] = g.sim_s / g.live_s
    print("\n5. prefill phase by the number of steps it spans in the simulation (sums over calls, s):")
    print(g.round(2).to_string())

    if args.grid:
        print("\n6. live-style sim/live per policy (queue/prefill/decode/e2e) for profile variants:")
        with tempfile.TemporaryDirectory() as td:
            for a, share in ((1.0, 0.0), (0.85, 0.0), (1.0, 0.88), (0.85, 0.88), (0.9, 0.88), (0.9, 1.0)):
                mod = dict(prof, prefill_token_s=prof["prefill_token_s"] * a,
                           prefill_attn_pair_s=prof["prefill_attn_pair_s"] * a, frontend_step_share=share)
                path = Path(td) / "p.json"
                path.write_text(json.dumps(mod))
                r = ratios(ensemble(str(path), range(args.seeds)), live, ("q_ls", "prefill", "d_ls"))
                err = float(np.sqrt((np.log(r.values) ** 2).mean()))
                print(f"   prefill x{a:<4} share {share:<4} rms log err {err:.3f}  ws/vllm e2e "
                      f"{r.loc['working-set', 'e2e'] / r.loc['vllm', 'e2e']:.2f} | "
                      + "  ".join("/".join(f"{v:.2f}" for v in r.loc[p]) for p in POLICIES))


if __name__ == "__main__":
    main()
