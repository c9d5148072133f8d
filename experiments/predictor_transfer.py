"""Does the tool-call predictor transfer across traces? Ratios to ``vllm`` side by side.

Reads two ``compare_policies.py`` results folders over the same traces, pressures and policies:
``--own`` (each run's predictor fitted on its own trace, the default) and ``--cross`` (run with
``--predictor-trace T``: its rows are named ``<trace>@pred=<T>``). Prints, per trace, pressure and
policy, the x-fewer-evictions and x-lower-total-session-time ratios to ``vllm`` of both, and writes
them to ``--cross``/``predictor_transfer.csv``.

    python experiments/predictor_transfer.py --own experiments/results/compare-2026-12-06-heldout \\
        --cross experiments/results/compare-2026-12-06-crosstrain
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def ratios(df: pd.DataFrame) -> pd.DataFrame:
    """x fewer evictions / x lower total session time than ``vllm`` at the same trace and pressure."""
    df = df.loc[df["predictor_error"] == 0]
    base = df.loc[df["policy"] == "vllm"].set_index(["trace", "pressure"])
    key = pd.MultiIndex.from_frame(df[["trace", "pressure"]])
    out = df[["trace", "pressure", "policy"]].copy()
    out["x_fewer_evictions"] = base["evicted_blocks"].reindex(key).to_numpy() / df["evicted_blocks"].where(
        df["evicted_blocks"] > 0).to_numpy()
    out["x_faster"] = base["total_session_time_s"].reindex(key).to_numpy() / df["total_session_time_s"].to_numpy()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--own", type=Path, required=True, help="results folder: predictor fitted on each run's trace")
    ap.add_argument("--cross", type=Path, required=True, help="results folder of a --predictor-trace run")
    args = ap.parse_args(argv)
    for folder in (args.own, args.cross):
        if not (folder / "results.csv").is_file():
            ap.error(f"no results.csv in {folder}")
    cross = pd.read_csv(args.cross / "results.csv")
    cross["trace"] = cross["trace"].str.split("@pred=").str[0]
    m = ratios(pd.read_csv(args.own / "results.csv")).merge(ratios(cross), on=["trace", "pressure", "policy"],
                                                           suffixes=("_own", "_cross"))
    if m.empty:
        ap.error("the two folders share no (trace, pressure, policy) row")
    m.to_csv(args.cross / "predictor_transfer.csv", index=False)
    for trace, g in m.groupby("trace", sort=False):
        print(f"\n**{trace}** (x fewer evictions / x faster than vllm: own-trace predictor -> cross-trace)\n")
        pressures = sorted(g["pressure"].unique())
        print("| policy | " + " | ".join(f"x{p:g}" for p in pressures) + " |")
        print("|---|" + "---|" * len(pressures))
        for policy, r in g.groupby("policy", sort=False):
            cells = []
            for p in pressures:
                row = r.loc[r["pressure"] == p]
                if row.empty:
                    cells.append("-")
                    continue
                row = row.iloc[0]
                cells.append(f"{row['x_fewer_evictions_own']:.2f} -> {row['x_fewer_evictions_cross']:.2f} / "
                             f"{row['x_faster_own']:.2f} -> {row['x_faster_cross']:.2f}")
            print(f"| {policy} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
