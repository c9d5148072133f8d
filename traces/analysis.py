"""Workload analysis of a trace: what it asks of a KV cache.

``analyze(trace)`` returns one JSON-serialisable dict of summary statistics
(layout below); ``write_analysis`` writes it as ``analysis.json`` plus PNG
figures; ``compare(a, b)`` gives the relative difference of two analyses'
scalar summaries (e.g. a generated trace against the real one it imitates).

Layout of ``analyze``'s dict (the keys are a contract: ``compare`` and the
trace generator rely on them). A *stats dict* is ``{count, mean, median,
p10, p90, p99, max}`` (numpy's linear-interpolation percentiles; all but
``count`` are ``None`` when ``count`` is 0).

``sessions``, ``calls``
    Counts.
``calls_per_session``, ``prompt_tokens``, ``output_tokens``
    Stats dicts over sessions / calls.
``gap_s``
    Stats of ``Call.next_gap_s`` over calls that have a next call (the gap of
    a session's last call is ignored by the simulator, so it is left out).
``new_tokens_per_call``
    Stats of the prompt tokens an eviction-free prefix cache would still have
    to prefill per call: prompt tokens minus that call's *avoidable* tokens
    (see ``eviction_free_prefill``).
``prev_prefix_share``
    Stats over calls with ``turn >= 1`` of: prompt tokens that are a prefix
    shared with the previous call's prompt + output (token-identity rule of
    ``docs/trace-format.md``; an output without ``output_segment`` is never
    shared) / prompt tokens.
``cross_session_prefix_share``
    Stats over sessions of: the longest prefix of the session's first prompt
    that some other session's first prompt shares / its prompt tokens.
``prompt_growth``
    ``by_turn_median``: median prompt tokens at turn 0, 1, ... over the
    sessions that reach that turn (at most 200 turns);
    ``tokens_per_turn_slope``: least-squares slope of prompt tokens against
    turn over all calls with turn < 200 (0.0 when all calls have one turn).
``tool_duration_s``
    Category -> stats dict of tool durations, plus ``all``.
``tool_mix``
    Category -> share of all tool calls (``{}`` without tool calls).
``llm_latency_s``
    Stats dict of recorded ``latency_s``, ``None`` if no call records one.
``eviction_free_prefill``
    ``prompt_tokens`` (all calls), ``avoidable_tokens`` (what a cache that
    never evicts would not prefill: for ``turn >= 1`` the prefix shared with
    the same session's previous prompt + output, for a first call the prefix
    its first prompt shares with some other session's first prompt; the
    latter ignores which session runs first, so it is an upper bound by at
    most one first prompt per shared prefix) and ``avoidable_share``.
``kv_working_set``
    ``pool_blocks``, ``block_size``, ``peak_blocks``, ``mean_blocks``,
    ``time_over_pool_share``, ``series``: the distinct KV blocks that the
    active sessions' current contexts need over simulated time, or ``None``
    when ``analyze`` is given no :class:`WorkingSetInputs`. The timing comes
    from outside this package: ``cwsim.analysis.analyze`` simulates the trace
    with the ``infinite`` policy (no eviction, so no eviction distorts it) and
    ``agents`` concurrent sessions and passes the simulator's request and
    session tables in. From a call's arrival until the session's next arrival
    (or the session's end) the session holds
    ``ceil((prompt + output) / block_size)`` blocks; full blocks of a prefix
    that active sessions share across sessions (the system prompt) are
    counted once. ``mean_blocks`` is time-weighted over the simulated span,
    ``time_over_pool_share`` is the share of that span with more blocks than
    ``pool_blocks`` (``cwsim.analysis``'s default: what the simulator gives
    the profile's GPU). ``series`` is ``[t_s, blocks]`` points of the step
    function (value from ``t_s`` on); with more than 500 steps it is cut into
    500 equal time bins, each point giving the bin's start and its *maximum*,
    so the peak survives the downsampling.

This module runs no simulation and imports nothing from ``cwsim``: the
simulator-backed entry point is ``cwsim.analysis.analyze``.
"""

from __future__ import annotations

import json
import math
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from traces.columnar import TraceTable
from traces.files import atomic_write_text, ensure_folder
from traces.format import Trace
from traces.sequences import shared_tokens

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "WorkingSetInputs",
    "analyze",
    "call_table",
    "compare",
    "make_figures",
    "plot_calls_per_session",
    "plot_gaps_ecdf",
    "plot_kv_working_set",
    "plot_prefill",
    "plot_prev_prefix_share",
    "plot_prompt_growth",
    "plot_tool_durations",
    "session_first_prompt_shares",
    "stats",
    "summary_scalars",
    "tool_table",
    "working_set",
    "write_analysis",
]

#: turns kept in ``prompt_growth`` (and used for its slope)
MAX_GROWTH_TURNS = 200
#: points kept in ``kv_working_set.series``
MAX_SERIES_POINTS = 500


# --------------------------------------------------------------- primitives
def stats(values: Iterable[float]) -> dict:
    """``{count, mean, median, p10, p90, p99, max}`` of ``values`` (floats; ``None`` when empty)."""
    v = np.asarray(list(values) if not isinstance(values, (np.ndarray, pd.Series)) else values, dtype=float)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return {"count": 0, "mean": None, "median": None, "p10": None, "p90": None, "p99": None, "max": None}
    p10, p50, p90, p99 = np.percentile(v, [10, 50, 90, 99])
    return {
        "count": int(v.size),
        "mean": float(v.mean()),
        "median": float(p50),
        "p10": float(p10),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(v.max()),
    }


def _context(call, si: int) -> tuple:
    """A call's prompt followed by its output segment (unique when the output is never reused)."""
    out_id = call.output_segment if call.output_segment is not None else f"\0out:{si}:{call.turn}"
    return (*call.prompt, (out_id, call.output_tokens))


def _first_prompts(trace: Trace | TraceTable) -> list[tuple]:
    """Each session's first prompt (a table reads them from its columns, building no session)."""
    if isinstance(trace, TraceTable):
        return trace.first_prompts()
    return [s.calls[0].prompt for s in trace.sessions]


def session_first_prompt_shares(trace: Trace | TraceTable) -> list[int]:
    """Per session: tokens of its first prompt that some other session's first prompt shares.

    Sorting the segment lists as tuples keeps lists that share a longer
    prefix next to each other (also under the prefix rule for a segment id
    with two lengths), so the best partner of each is a sorted neighbour.
    """
    firsts = _first_prompts(trace)
    order = sorted(range(len(firsts)), key=firsts.__getitem__)
    best = [0] * len(firsts)
    for i, j in zip(order, order[1:]):
        n = shared_tokens(firsts[i], firsts[j])
        best[i] = max(best[i], n)
        best[j] = max(best[j], n)
    return best


# ------------------------------------------------------------------- tables
def call_table(trace: Trace | TraceTable) -> pd.DataFrame:
    """One row per call, in trace order.

    Columns: ``session`` (index in ``trace.sessions``), ``session_id``,
    ``turn``, ``last`` (last call of its session), ``prompt_tokens``,
    ``output_tokens``, ``context_tokens`` (prompt + output), ``gap_s``
    (``next_gap_s``; NaN on a session's last call), ``latency_s`` (NaN if not
    recorded), ``prev_shared_tokens`` (prefix shared with the previous call's
    prompt + output; 0 on turn 0), ``prev_prefix_share`` (NaN on turn 0),
    ``cross_shared_tokens`` (turn 0: prefix shared with another session's
    first prompt; 0 otherwise), ``avoidable_tokens`` and ``new_tokens``
    (prompt tokens an eviction-free prefix cache would / would not prefill),
    ``first_shared_tokens`` (the context's prefix shared with the session's
    first prompt, used for cross-session block sharing).
    """
    return _tables(trace)[0]


def tool_table(trace: Trace | TraceTable) -> pd.DataFrame:
    """One row per tool call: ``session``, ``turn``, ``name``, ``category``, ``duration_s``."""
    return _tables(trace)[1]


def _tables(trace: Trace | TraceTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`call_table` and :func:`tool_table`, in one pass over the sessions."""
    cross = session_first_prompt_shares(trace)
    # compact columns while building (a list would hold a Python object per call and column)
    cols: dict[str, array] = {k: array("d" if k in ("gap_s", "latency_s") else "q") for k in (
        "session", "turn", "prompt_tokens", "output_tokens", "gap_s", "latency_s", "prev_shared_tokens",
        "cross_shared_tokens", "first_shared_tokens")}
    session_ids: list[str] = []
    tool_rows = []
    for si, sess in enumerate(trace.sessions):
        session_ids.append(sess.session_id)
        first = sess.calls[0].prompt
        prev_ctx = None
        n = len(sess.calls)
        for k, c in enumerate(sess.calls):
            ctx = _context(c, si)
            cols["session"].append(si)
            cols["turn"].append(c.turn)
            cols["prompt_tokens"].append(c.prompt_tokens)
            cols["output_tokens"].append(c.output_tokens)
            cols["gap_s"].append(c.next_gap_s if k < n - 1 else math.nan)
            cols["latency_s"].append(c.latency_s if c.latency_s is not None else math.nan)
            cols["prev_shared_tokens"].append(shared_tokens(prev_ctx, c.prompt) if prev_ctx is not None else 0)
            cols["cross_shared_tokens"].append(cross[si] if k == 0 else 0)
            cols["first_shared_tokens"].append(shared_tokens(ctx, first))
            tool_rows.extend((si, c.turn, t.name, t.category, t.duration_s) for t in c.tools)
            prev_ctx = ctx
    data = {k: np.frombuffer(v, dtype=np.float64 if v.typecode == "d" else np.int64) for k, v in cols.items()}
    session = data.pop("session")
    df = pd.DataFrame({"session": session, "session_id": np.asarray(session_ids, dtype=object)[session],
                       "turn": data.pop("turn"), "last": np.append(session[1:] != session[:-1], True), **data})
    df["context_tokens"] = df["prompt_tokens"] + df["output_tokens"]
    df["prev_prefix_share"] = (df["prev_shared_tokens"] / df["prompt_tokens"]).where(df["turn"] > 0)
    df["avoidable_tokens"] = df["prev_shared_tokens"] + df["cross_shared_tokens"]
    df["new_tokens"] = df["prompt_tokens"] - df["avoidable_tokens"]
    return df, pd.DataFrame(tool_rows, columns=["session", "turn", "name", "category", "duration_s"])


# -------------------------------------------------------------- working set
@dataclass(frozen=True)
class WorkingSetInputs:
    """What ``kv_working_set`` needs beyond the trace, supplied by the caller.

    ``requests`` and ``sessions`` are the simulated times that
    :func:`working_set` reads (e.g. the ``requests.csv`` / ``sessions.csv``
    of an ``infinite``-policy run of the trace); ``block_size`` is the
    tokens per KV block, ``pool_blocks`` the pool to compare against.
    """

    requests: pd.DataFrame
    sessions: pd.DataFrame
    block_size: int
    pool_blocks: int


def working_set(calls: pd.DataFrame, requests: pd.DataFrame, sessions: pd.DataFrame, trace: Trace, *,
                block_size: int, pool_blocks: int) -> dict:
    """The ``kv_working_set`` dict from simulated times.

    ``calls`` is :func:`call_table` of ``trace``; ``requests`` needs columns
    ``session_id``, ``turn``, ``arrival_s`` (as in the simulator's
    ``requests.csv``), ``sessions`` columns ``session_id``, ``end_s`` (as in
    ``sessions.csv``). Sessions absent from ``requests`` are ignored.

    Blocks held by a set of active contexts = sum of their blocks minus, in
    session order, for each context the most full blocks it shares with an
    earlier one (exact for a prefix tree). Two contexts of sessions ``i`` and
    ``j`` share ``min(L_ij, f_i, f_j)`` tokens, where ``L_ij`` is what their
    first prompts share and ``f`` what each context still shares with its own
    session's first prompt.
    """
    bs = block_size
    sid_index = {sid: i for i, sid in enumerate(
        trace.session_ids if isinstance(trace, TraceTable) else (s.session_id for s in trace.sessions))}
    firsts = _first_prompts(trace)
    cross_max = calls.loc[calls["turn"] == 0].set_index("session")["cross_shared_tokens"]

    key = calls.set_index(["session_id", "turn"])
    req = requests[["session_id", "turn", "arrival_s"]].copy()
    req["session_id"] = req["session_id"].astype(str)
    req = req.join(key[["session", "context_tokens", "first_shared_tokens"]], on=["session_id", "turn"])
    if req["session"].isna().any():
        bad = req.loc[req["session"].isna()].iloc[0]
        raise ValueError(f"request {bad['session_id']!r} turn {bad['turn']} is not in the trace")
    ends = sessions[["session_id", "end_s"]].copy()
    ends["session_id"] = ends["session_id"].astype(str)

    # events: (time, kind 0 = call arrival / 1 = session end, session, blocks, tokens shared with first prompt)
    ev = pd.DataFrame({
        "t": req["arrival_s"].astype(float),
        "kind": 0,
        "session": req["session"].astype(int),
        "blocks": -(-req["context_tokens"].astype(int) // bs),
        "first": req["first_shared_tokens"].astype(int),
    })
    ends = ends.loc[ends["session_id"].isin(sid_index)]
    ev_end = pd.DataFrame({
        "t": ends["end_s"].astype(float),
        "kind": 1,
        "session": ends["session_id"].map(sid_index).astype(int),
        "blocks": 0,
        "first": 0,
    })
    ev = pd.concat([ev, ev_end], ignore_index=True).sort_values(["t", "kind"], kind="stable")

    pair_cache: dict[tuple[int, int], int] = {}

    def pair(i: int, j: int) -> int:
        k = (i, j) if i < j else (j, i)
        v = pair_cache.get(k)
        if v is None:
            v = pair_cache[k] = shared_tokens(firsts[i], firsts[j])
        return v

    blocks: dict[int, int] = {}
    sharing: dict[int, int] = {}  # active sessions that share something across sessions -> effective f
    total = 0
    saved = 0
    times: list[float] = []
    values: list[int] = []
    t_arr = ev["t"].to_numpy()
    kind_arr = ev["kind"].to_numpy()
    s_arr = ev["session"].to_numpy()
    b_arr = ev["blocks"].to_numpy()
    f_arr = ev["first"].to_numpy()
    n = len(ev)
    for e in range(n):
        s = int(s_arr[e])
        total -= blocks.pop(s, 0)
        changed = False
        if kind_arr[e] == 0:
            b = int(b_arr[e])
            blocks[s] = b
            total += b
            cm = int(cross_max.get(s, 0))
            if cm >= bs:
                f = min(int(f_arr[e]), cm)
                if sharing.get(s) != f:
                    sharing[s] = f
                    changed = True
        elif s in sharing:
            del sharing[s]
            changed = True
        if changed:
            saved = 0
            active = sorted(sharing)
            for x, i in enumerate(active):
                fi = sharing[i]
                best = 0
                for j in active[:x]:
                    best = max(best, min(pair(i, j), fi, sharing[j]) // bs)
                saved += best
        if e == n - 1 or t_arr[e + 1] != t_arr[e]:
            v = total - saved
            if not values or v != values[-1]:
                times.append(float(t_arr[e]))
                values.append(v)

    t = np.asarray(times, dtype=float)
    v = np.asarray(values, dtype=float)
    if len(t) == 0:
        return {"pool_blocks": int(pool_blocks), "block_size": bs, "peak_blocks": 0, "mean_blocks": 0.0,
                "time_over_pool_share": 0.0, "series": []}
    span = float(t[-1] - t[0])
    dt = np.diff(t)  # value v[i] holds on [t[i], t[i+1]); the last point ends the span
    if span > 0:
        mean = float((v[:-1] * dt).sum() / span)
        over = float(dt[v[:-1] > pool_blocks].sum() / span)
    else:
        mean = float(v.max())
        over = float(v.max() > pool_blocks)
    if len(t) <= MAX_SERIES_POINTS:
        series = [[float(a), int(b)] for a, b in zip(t, v)]
    else:
        edges = np.linspace(t[0], t[-1], MAX_SERIES_POINTS + 1)
        lo = np.searchsorted(t, edges[:-1], side="right") - 1
        hi = np.searchsorted(t, edges[1:], side="left")
        hi[-1] = len(t)
        series = [[float(edges[b]), int(v[lo[b]:max(hi[b], lo[b] + 1)].max())] for b in range(MAX_SERIES_POINTS)]
    return {
        "pool_blocks": int(pool_blocks),
        "block_size": int(bs),
        "peak_blocks": int(v.max()),
        "mean_blocks": mean,
        "time_over_pool_share": over,
        "series": series,
    }


# ------------------------------------------------------------------ analyze
def analyze(trace: Trace, *, working_set_inputs: WorkingSetInputs | None = None) -> dict:
    """Summary statistics of ``trace`` (see the module docstring for the layout).

    ``kv_working_set`` is computed with :func:`working_set` from
    ``working_set_inputs`` and is ``None`` without them (this function runs
    no simulation; ``cwsim.analysis.analyze`` runs one and passes its times).
    """
    if not trace.sessions:
        raise ValueError("trace has no sessions")
    calls, tools = _tables(trace)

    per_turn = calls.loc[calls["turn"] < MAX_GROWTH_TURNS]
    by_turn = per_turn.groupby("turn")["prompt_tokens"].median().sort_index()
    x = per_turn["turn"].to_numpy(dtype=float)
    y = per_turn["prompt_tokens"].to_numpy(dtype=float)
    slope = float(np.polyfit(x, y, 1)[0]) if np.unique(x).size > 1 else 0.0

    tool_stats = {cat: stats(g["duration_s"]) for cat, g in sorted(tools.groupby("category"), key=lambda kv: kv[0])}
    tool_stats["all"] = stats(tools["duration_s"])
    mix = (tools["category"].value_counts() / len(tools)) if len(tools) else pd.Series(dtype=float)
    latency = stats(calls["latency_s"])

    first = calls.loc[calls["turn"] == 0]
    prompt_total = int(calls["prompt_tokens"].sum())
    avoidable = int(calls["avoidable_tokens"].sum())
    return {
        "sessions": len(trace.sessions),
        "calls": int(len(calls)),
        "calls_per_session": stats([len(s.calls) for s in trace.sessions]),
        "prompt_tokens": stats(calls["prompt_tokens"]),
        "output_tokens": stats(calls["output_tokens"]),
        "gap_s": stats(calls["gap_s"]),
        "new_tokens_per_call": stats(calls["new_tokens"]),
        "prev_prefix_share": stats(calls["prev_prefix_share"]),
        "cross_session_prefix_share": stats(first["cross_shared_tokens"] / first["prompt_tokens"]),
        "prompt_growth": {
            "by_turn_median": [float(v) for v in by_turn.to_numpy()],
            "tokens_per_turn_slope": slope,
        },
        "tool_duration_s": tool_stats,
        "tool_mix": {str(k): float(v) for k, v in sorted(mix.items())},
        "llm_latency_s": latency if latency["count"] else None,
        "eviction_free_prefill": {
            "prompt_tokens": prompt_total,
            "avoidable_tokens": avoidable,
            "avoidable_share": avoidable / prompt_total if prompt_total else 0.0,
        },
        "kv_working_set": None if working_set_inputs is None else working_set(
            calls, working_set_inputs.requests, working_set_inputs.sessions, trace,
            block_size=working_set_inputs.block_size, pool_blocks=working_set_inputs.pool_blocks),
    }


# ------------------------------------------------------------------ compare
_STATS_KEYS = ("calls_per_session", "prompt_tokens", "output_tokens", "gap_s", "new_tokens_per_call",
               "prev_prefix_share", "cross_session_prefix_share", "llm_latency_s")


def summary_scalars(analysis: dict) -> dict[str, float | None]:
    """The scalars that :func:`compare` compares, by dotted name.

    ``<stats key>.mean`` / ``.median`` for every stats dict (including
    ``tool_duration_s.<category>.mean`` / ``.median``), ``tool_mix.<category>``,
    ``eviction_free_prefill.avoidable_share``,
    ``prompt_growth.tokens_per_turn_slope``, ``kv_working_set.peak_blocks``
    and ``kv_working_set.mean_blocks``. A missing stats dict gives ``None``s.
    """
    out: dict[str, float | None] = {}

    def add_stats(name: str, s: dict | None) -> None:
        for m in ("mean", "median"):
            out[f"{name}.{m}"] = None if s is None else s.get(m)

    for k in _STATS_KEYS:
        add_stats(k, analysis.get(k))
    for cat, s in (analysis.get("tool_duration_s") or {}).items():
        add_stats(f"tool_duration_s.{cat}", s)
    for cat, share in (analysis.get("tool_mix") or {}).items():
        out[f"tool_mix.{cat}"] = share
    out["eviction_free_prefill.avoidable_share"] = (analysis.get("eviction_free_prefill") or {}).get("avoidable_share")
    out["prompt_growth.tokens_per_turn_slope"] = (analysis.get("prompt_growth") or {}).get("tokens_per_turn_slope")
    ws = analysis.get("kv_working_set") or {}
    out["kv_working_set.peak_blocks"] = ws.get("peak_blocks")
    out["kv_working_set.mean_blocks"] = ws.get("mean_blocks")
    return out


def compare(a: dict, b: dict) -> dict[str, float | None]:
    """Relative difference ``(b - a) / |a|`` of each of :func:`summary_scalars`.

    Keys are the union of both sides' names, sorted. A ``tool_mix`` category
    missing on one side counts as share 0. The value is ``0.0`` when both are
    0, and ``None`` when it is undefined (``a`` is 0 and ``b`` is not, or a
    side has no value, e.g. ``llm_latency_s`` is null or a tool category has
    no durations on that side). ``compare(a, a)`` is all zeros except for
    those ``None``s.
    """
    sa, sb = summary_scalars(a), summary_scalars(b)
    out: dict[str, float | None] = {}
    for k in sorted(set(sa) | set(sb)):
        default = 0.0 if k.startswith("tool_mix.") else None
        x, y = sa.get(k, default), sb.get(k, default)
        if x is None or y is None:
            out[k] = None
        elif x == 0:
            out[k] = 0.0 if y == 0 else None
        else:
            out[k] = float((y - x) / abs(x))
    return out


# ------------------------------------------------------------------ figures
def plot_calls_per_session(ax, calls: pd.DataFrame) -> None:
    """Histogram of calls per session."""
    per = calls.groupby("session").size()
    ax.hist(per, bins=min(30, max(5, per.nunique())), color="tab:blue", edgecolor="white")
    ax.axvline(per.median(), color="k", ls="--", lw=1, label=f"median {per.median():g}")
    ax.set_title("LLM calls per session")
    ax.set_xlabel("calls per session")
    ax.set_ylabel("sessions")
    ax.legend()


def plot_prompt_growth(ax, calls: pd.DataFrame) -> None:
    """Median prompt length by turn, with the interquartile band."""
    g = calls.loc[calls["turn"] < MAX_GROWTH_TURNS].groupby("turn")["prompt_tokens"]
    q = g.quantile([0.25, 0.5, 0.75]).unstack()
    n = g.size()
    ax.fill_between(q.index, q[0.25] / 1e3, q[0.75] / 1e3, alpha=0.3, color="tab:blue", label="25-75th percentile")
    ax.plot(q.index, q[0.5] / 1e3, color="tab:blue", label="median")
    ax.set_title("Prompt length over a session's turns")
    ax.set_xlabel("turn")
    ax.set_ylabel("prompt length (thousand tokens)")
    ax2 = ax.twinx()
    ax2.plot(n.index, n.to_numpy(), color="gray", lw=0.8, ls=":", label="sessions reaching the turn")
    ax2.set_ylabel("sessions reaching the turn")
    ax2.set_ylim(bottom=0)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper left")


def plot_prev_prefix_share(ax, calls: pd.DataFrame) -> None:
    """Histogram of the share of each prompt that the previous call's prompt + output covers."""
    v = calls["prev_prefix_share"].dropna() * 100
    ax.hist(v, bins=np.linspace(0, 100, 51), color="tab:green", edgecolor="white")
    if not len(v):
        ax.text(0.5, 0.5, "no call after a first turn", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_yscale("log")
        ax.axvline(v.median(), color="k", ls="--", lw=1, label=f"median {v.median():.1f} %")
        ax.legend(loc="upper left")
    ax.set_title("Prompt share reused from the previous call (turn ≥ 1)")
    ax.set_xlabel("prefix shared with previous prompt + output (% of prompt tokens)")
    ax.set_ylabel("calls (log scale)")


_MIN_LOG_S = 1e-3


def plot_tool_durations(ax, tools: pd.DataFrame) -> None:
    """Box plot of tool durations per category, log time axis (zeros drawn at 1 ms)."""
    if tools.empty:
        ax.text(0.5, 0.5, "no tool calls", ha="center", va="center", transform=ax.transAxes)
    else:
        groups = sorted(tools.groupby("category")["duration_s"], key=lambda kv: kv[1].median())
        data = [np.maximum(g.to_numpy(), _MIN_LOG_S) for _, g in groups]
        labels = [f"{cat} (n={len(g)})" for cat, g in groups]
        ax.boxplot(data, orientation="horizontal", tick_labels=labels, whis=(5, 95), showfliers=True,
                   flierprops={"markersize": 2, "alpha": 0.4})
        ax.set_xscale("log")
    ax.set_title("Tool call duration by category (whiskers 5-95th percentile)")
    ax.set_xlabel("duration (s, log scale; 0 drawn at 1 ms)")
    ax.set_ylabel("tool category")


def plot_gaps_ecdf(ax, calls: pd.DataFrame) -> None:
    """ECDF of the gap between a call's completion and the session's next call."""
    g = np.sort(np.maximum(calls["gap_s"].dropna().to_numpy(), _MIN_LOG_S))
    if g.size:
        ax.step(g, np.arange(1, g.size + 1) / g.size, where="post", color="tab:purple")
        ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.grid(True, which="major", alpha=0.3)
    ax.set_title("Gap between a call's completion and the next call (ECDF)")
    ax.set_xlabel("gap (s, log scale; 0 drawn at 1 ms)")
    ax.set_ylabel("fraction of gaps ≤ x")


def plot_kv_working_set(ax, analysis: dict) -> None:
    """Distinct KV blocks of the active contexts over simulated time, with the pool size."""
    ws = analysis["kv_working_set"]
    s = np.asarray(ws["series"], dtype=float).reshape(-1, 2)
    if len(s):
        ax.step(s[:, 0] / 60, s[:, 1] / 1e3, where="post", color="tab:red", label="working set")
    ax.axhline(ws["pool_blocks"] / 1e3, color="k", ls="--", lw=1, label=f"KV pool ({ws['pool_blocks']:,} blocks)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"KV working set of active sessions (peak {ws['peak_blocks']:,} blocks of {ws['block_size']} tokens)")
    ax.set_xlabel("simulated time (min, infinite cache)")
    ax.set_ylabel("KV blocks (thousands)")
    ax.legend(loc="lower right")


def plot_prefill(ax, analysis: dict) -> None:
    """Bar of prompt tokens an eviction-free prefix cache avoids vs must prefill."""
    p = analysis["eviction_free_prefill"]
    avoid, total = p["avoidable_tokens"], p["prompt_tokens"]
    vals = [avoid / 1e6, (total - avoid) / 1e6]
    bars = ax.bar(["avoidable\n(shared prefix)", "needed\n(new tokens)"], vals, color=["tab:green", "tab:orange"])
    for bar, n in zip(bars, (avoid, total - avoid)):
        share = n / total * 100 if total else 0.0
        ax.annotate(f"{share:.1f} %", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom")
    ax.set_title("Prefill with an eviction-free prefix cache")
    ax.set_ylabel("prompt tokens (millions)")


def make_figures(analysis: dict, trace: Trace) -> dict[str, Figure]:
    """The figures of :func:`write_analysis`, by file stem (Agg canvases, no pyplot state).

    ``kv_working_set`` is drawn only when the analysis has one."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    calls, tools = _tables(trace)
    specs = {
        "calls_per_session": (lambda ax: plot_calls_per_session(ax, calls), (6.4, 4.2)),
        "prompt_growth": (lambda ax: plot_prompt_growth(ax, calls), (7.2, 4.5)),
        "prev_prefix_share": (lambda ax: plot_prev_prefix_share(ax, calls), (7.2, 4.5)),
        "tool_durations": (lambda ax: plot_tool_durations(ax, tools), (7.2, 5.0)),
        "gaps_ecdf": (lambda ax: plot_gaps_ecdf(ax, calls), (6.4, 4.2)),
        "kv_working_set": (lambda ax: plot_kv_working_set(ax, analysis), (8.0, 4.5)),
        "prefill": (lambda ax: plot_prefill(ax, analysis), (5.0, 4.5)),
    }
    if analysis.get("kv_working_set") is None:
        del specs["kv_working_set"]
    figs = {}
    for name, (draw, size) in specs.items():
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        draw(fig.add_subplot())
        figs[name] = fig
    return figs


def write_analysis(analysis: dict, trace: Trace, out_dir) -> list[Path]:
    """Write one PNG per figure, then ``analysis.json`` (sorted keys, indent 2, atomically); return the paths.

    An earlier ``analysis.json`` in ``out_dir`` is removed first, so one found there belongs to
    the figures beside it."""
    out = ensure_folder(out_dir)
    path = out / "analysis.json"
    path.unlink(missing_ok=True)  # an earlier analysis's: written again last, when the figures are
    paths = []
    for name, fig in make_figures(analysis, trace).items():
        p = out / f"{name}.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    atomic_write_text(path, json.dumps(analysis, sort_keys=True, indent=2) + "\n")
    return [path, *paths]
