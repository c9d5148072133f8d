"""A compared live run, read back for people: tables and figures of real against simulated.

``load_comparison(folder)`` reads a ``cwreplay run`` folder that ``cwreplay
compare`` has filled (``compare.json``, the run's ``summary.json`` and CSVs,
``sim/`` with the simulator's), and :func:`make_figures` draws what
``notebooks/replay.ipynb`` shows: simulated against real session times, the
per-call latency distributions, evictions over time, cached prompt tokens per
call, and each session's time on both sides. ``cwreplay compare`` draws the
first of them (``compare_sessions.png``) with the same code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

#: the files a compared run folder must hold, relative to it
COMPARE_FILES = ("compare.json", "summary.json", "requests.csv", "sessions.csv", "evictions.csv",
                 "sim/summary.json", "sim/requests.csv", "sim/sessions.csv", "sim/evictions.csv")


class ComparisonError(ValueError):
    """The folder is not a run that ``cwreplay compare`` has compared: one line naming the missing file."""


@dataclass
class Comparison:
    """One compared run: ``compare`` (``compare.json``), both summaries, and per call / per session /
    per eviction tables with both sides (``calls`` and ``sessions`` joined on their keys, columns
    suffixed ``_real`` and ``_sim``; ``evictions`` with a ``side`` column)."""

    folder: Path
    compare: dict
    real: dict
    sim: dict
    calls: pd.DataFrame
    sessions: pd.DataFrame
    evictions: pd.DataFrame

    def headline(self) -> pd.DataFrame:
        """Real against simulated, one row per figure of ``compare.json``."""
        c = self.compare
        rows = [
            ("evicted blocks", c["evicted_blocks"]["real"], c["evicted_blocks"]["sim"], c["evicted_blocks"]["error"]),
            ("preemptions", c["preemptions"]["real"], c["preemptions"]["sim"], c["preemptions"]["error"]),
            ("prefix hit rate", c["prefix_hit_rate"]["real"], c["prefix_hit_rate"]["sim"],
             _rel(c["prefix_hit_rate"]["real"], c["prefix_hit_rate"]["sim"])),
            ("mean session time (s)", self.sessions["duration_s_real"].mean(), self.sessions["duration_s_sim"].mean(),
             c["session_time_mape"]),
            ("mean call latency (s)", self.calls["latency_real"].mean(), self.calls["latency_sim"].mean(),
             c["call_latency_mape"]),
        ]
        df = pd.DataFrame(rows, columns=["figure", "real (vLLM)", "simulated (cwsim)", "error"])
        return df.set_index("figure")


def _rel(a, b):
    return None if not a else (b - a) / a


def joined_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The run's calls and sessions joined with the simulator's (``folder/sim``), columns suffixed
    ``_real`` / ``_sim``; each call's ``latency_real`` / ``latency_sim`` (finish - arrival)."""
    rq = pd.read_csv(folder / "requests.csv", dtype={"session_id": str})
    sq = pd.read_csv(folder / "sim" / "requests.csv", dtype={"session_id": str})
    calls = rq.merge(sq, on=["session_id", "turn"], suffixes=("_real", "_sim"))
    for side in ("real", "sim"):
        calls[f"latency_{side}"] = calls[f"finish_s_{side}"] - calls[f"arrival_s_{side}"]
    rs = pd.read_csv(folder / "sessions.csv", dtype={"session_id": str})
    ss = pd.read_csv(folder / "sim" / "sessions.csv", dtype={"session_id": str})
    return calls, rs.merge(ss, on="session_id", suffixes=("_real", "_sim"))


def load_comparison(folder: str | Path) -> Comparison:
    """Read a compared run folder; :class:`ComparisonError` names the first missing or unreadable file."""
    folder = Path(folder)
    for name in COMPARE_FILES:
        if not (folder / name).is_file():
            hint = " (run `cwreplay compare` on it first)" if name == "compare.json" or name.startswith("sim/") else ""
            raise ComparisonError(f"{folder / name}: no such file{hint}")
    try:
        compare = json.loads((folder / "compare.json").read_text())
        real = json.loads((folder / "summary.json").read_text())
        sim = json.loads((folder / "sim" / "summary.json").read_text())
    except ValueError as e:
        raise ComparisonError(f"{folder}: a summary is not JSON: {e}") from None
    calls, sessions = joined_tables(folder)
    ev = []
    for side, path in (("real", folder / "evictions.csv"), ("sim", folder / "sim" / "evictions.csv")):
        e = pd.read_csv(path, usecols=["time_s"])
        e["side"] = side
        ev.append(e)
    evictions = pd.concat(ev, ignore_index=True)
    return Comparison(folder, compare, real, sim, calls, sessions, evictions)


def session_scatter(sessions: pd.DataFrame, mape: float | None, ax) -> None:
    """Simulated against real session times, the diagonal for reference."""
    ax.scatter(sessions["duration_s_real"], sessions["duration_s_sim"], s=14)
    top = float(max(sessions["duration_s_real"].max(), sessions["duration_s_sim"].max(), 1e-9)) * 1.05
    ax.plot([0, top], [0, top], color="grey", lw=0.8)
    ax.set_xlabel("real session time (s)")
    ax.set_ylabel("simulated session time (s)")
    ax.set_title(f"cwsim vs vLLM: session MAPE {100 * (mape or 0):.1f}%")


def _labelled(ax, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    ax.figure.tight_layout()


def make_figures(c: Comparison) -> dict:
    """name -> matplotlib figure: ``sessions``, ``session_bars``, ``latency_cdf``, ``evictions``,
    ``cached_tokens``."""
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    session_scatter(c.sessions, c.compare.get("session_time_mape"), ax)
    fig.tight_layout()
    figs["sessions"] = fig

    figs["session_bars"], ax = plt.subplots(figsize=(6, 3.6))
    s = c.sessions.sort_values("duration_s_real").reset_index(drop=True)
    ax.bar(s.index - 0.2, s["duration_s_real"], width=0.4, label="vLLM")
    ax.bar(s.index + 0.2, s["duration_s_sim"], width=0.4, label="cwsim")
    ax.set_xticks(s.index, s["session_id"], rotation=60, fontsize=7)
    _labelled(ax, "session", "session completion time (s)", "each session, real and simulated")

    figs["latency_cdf"], ax = plt.subplots(figsize=(6, 3.6))
    for side, label in (("real", "vLLM"), ("sim", "cwsim")):
        x = c.calls[f"latency_{side}"].sort_values().to_numpy()
        ax.step(x, [(i + 1) / len(x) for i in range(len(x))], where="post", label=label)
    _labelled(ax, "call latency, arrival to last token (s)", "share of calls",
              f"per-call latency (MAPE {100 * (c.compare.get('call_latency_mape') or 0):.1f}%)")

    figs["evictions"], ax = plt.subplots(figsize=(6, 3.6))
    for side, label in (("real", "vLLM (BlockRemoved events)"), ("sim", "cwsim")):
        t = c.evictions.loc[c.evictions["side"] == side, "time_s"].sort_values().to_numpy()
        ax.step(t, range(1, len(t) + 1), where="post", label=f"{label}: {len(t)}")
    _labelled(ax, "time since the run's start (s)", "evicted blocks so far", "evictions over time")

    figs["cached_tokens"], ax = plt.subplots(figsize=(6, 3.6))
    order = c.calls.sort_values("arrival_s_real").reset_index(drop=True)
    ax.plot(order.index, order["cached_tokens_real"], label="vLLM", lw=1.2)
    ax.plot(order.index, order["cached_tokens_sim"], label="cwsim", lw=1.0, ls="--")
    _labelled(ax, "call, in order of its real arrival", "cached prompt tokens", "prefix-cache hits per call")
    for f in figs.values():
        plt.close(f)
    return figs
