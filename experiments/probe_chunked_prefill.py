"""Does a profile time a prefill that takes several steps (chunked prefill) as a live server does?

What it measures
    On a ``cwreplay serve``-style server (tiny model, a big pool, ``--max-num-batched-tokens``
    512 as the live-ratio study's), one request at a time (nothing else in flight): ``q`` new
    tokens on ``c`` cached ones (a prefix sent once before, so it hits), 2 output tokens, timed
    from the client (median of ``--repeats``). Beside it, what the profile predicts for the same
    request alone (``replay.calibrate_server.predicted_call_s`` with ``--budget``): its
    ``request_overhead_s``, then the prefill in the chunks vLLM's scheduler gives it (``--budget``
    tokens a step, each chunk attending to everything before it), then one decode step. Shapes whose prefill fits one step are the calibration's own kind (the design
    never goes past one step); those of two or more steps are what the live-ratio study found
    the simulator slow on (sim / live 1.22-1.28 for calls whose prefill took 2+ steps).

    .venv/bin/python experiments/probe_chunked_prefill.py --profile P [--repeats 7]   # ~1 min, nothing else running
    .venv/bin/python experiments/probe_chunked_prefill.py --calibrate P                # calibrate P on the same server first (~6 min)

A profile only holds for the machine it was calibrated on (the same CPU label has given prefill
costs 60x apart on different days' machines): ``--calibrate`` fits one on the probe's own server
(``cwreplay calibrate --server``'s design, 512-token steps) just before the probe.

Prints one row per shape: steps, measured ms, predicted ms, predicted / measured, and for
shapes of 2+ steps what the prediction would be with each chunk after the first costing
what the same chunk costs alone (no attention to the chunks before it): which of the two the
measurement sits nearer.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = ((256, 0), (480, 0), (768, 0), (1024, 0), (1536, 0), (256, 512), (480, 512), (768, 512), (1024, 512))


def without_chunk_attention_s(prof, q: int, c: int, n: int, budget: int) -> float:
    """The other reading, for comparison: :func:`replay.calibrate_server.predicted_call_s` with each chunk
    after the first attending only to the cached ``c`` tokens, not to the chunks before it."""
    from cwsim.steptime import prefill_attn_pairs

    t = prof.request_overhead_s
    for start in range(0, q, budget):
        chunk = min(budget, q - start)
        t += prof.step_time(chunk, prefill_attn_pairs(chunk, c), 0, 0)
    return t + sum(prof.step_time(0, 0, 1, q + c + k) for k in range(1, n))


async def measure(url: str, vocab: int, shapes, repeats: int, n: int = 2) -> dict:
    import aiohttp

    from replay.calibrate_server import _Prober

    out = {}
    async with aiohttp.ClientSession() as session:
        p = _Prober(session, url, "cachewise-replay", vocab)
        for _ in range(3):  # one-off costs first
            await p.complete(p.fresh(256), 4)
        for q, c in shapes:
            ts = []
            for _ in range(repeats):
                prefix = p.fresh(c) if c else []
                if c:
                    await p.complete(prefix, 1)  # cached from now on
                t, cached = await p.complete(prefix + p.fresh(q), n)
                if cached < c:
                    raise SystemExit(f"shape {q} on {c}: only {cached} tokens were cached (is the pool big enough?)")
                ts.append(t)
            out[(q, c)] = statistics.median(ts)
            print(f"  {q} on {c}: {1e3 * out[(q, c)]:.1f} ms", flush=True)
    return out


def main() -> int:
    from cwsim.steptime import load_profile
    from replay.calibrate_server import predicted_call_s
    from replay.server import ServerConfig, start_server
    from replay.tiny_model import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    who = ap.add_mutually_exclusive_group(required=True)
    who.add_argument("--profile", type=Path, help="a profile calibrated through such a server on this machine")
    who.add_argument("--calibrate", type=Path, help="calibrate a profile on the probe's server first, written here")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--budget", type=int, default=512, help="the server's --max-num-batched-tokens")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="cwcp-"))  # short: the server's socket paths
    try:
        model = str(build_tiny_model(scratch / "tiny-llama"))
        with start_server(ServerConfig(model=model, kv_blocks=1024, block_size=32, max_num_seqs=8,
                                       max_num_batched_tokens=args.budget), scratch / "srv") as srv:
            if args.calibrate is not None:
                from replay.calibrate_server import ServerCalibrationConfig, calibrate_server

                print(f"calibrating {args.calibrate} on the probe's server ...", flush=True)
                calibrate_server(ServerCalibrationConfig(srv.url, max_num_batched_tokens=args.budget), args.calibrate,
                                 name="tiny-llama-vllm-cpu-server")
            got = asyncio.run(measure(srv.url, srv.vocab_size, SHAPES, args.repeats))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    prof = load_profile(args.profile or args.calibrate)
    print(f"\n{'shape':>14} {'steps':>5} {'measured ms':>12} {'predicted ms':>13} {'pred/meas':>9} "
          f"{'no-chunk-attn ms':>17} {'ratio':>6}")
    for (q, c), t in got.items():
        pred, steps = predicted_call_s(prof, q, c, 2, args.budget), -(-q // args.budget)
        alt = without_chunk_attention_s(prof, q, c, 2, args.budget)
        print(f"{f'{q} on {c}':>14} {steps:>5} {1e3 * t:>12.1f} {1e3 * pred:>13.1f} {pred / t:>9.2f} "
              f"{1e3 * alt:>17.1f} {alt / t:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
