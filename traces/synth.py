"""Synthetic agent traces: fit a workload model to a real trace, sample new sessions.

``fit(trace)`` turns a real trace (format v1) into a :class:`WorkloadModel`;
``iter_sessions(model, n, seed)`` / ``sample(model, n, seed)`` generate any
number of made-up sessions that look like it; ``closeness(real, synthetic)``
reports how close the two are. CLI::

    python -m traces.synth --like TRACE --sessions N --seed S -o OUT.jsonl[.gz] [--model-out model.json]

The model (what ``fit`` measures)
    Every distribution is **empirical**: a sorted list of observed values.
    Up to 1,001 observations are kept whole (sampling = bootstrap); larger
    samples are kept as their 1,001 quantiles at evenly spaced probabilities
    (``inverted_cdf``: every stored value is an observed one, integers stay
    integers). Sampling picks one stored value uniformly. Nothing is
    parametric.

    - ``session_calls``: calls per session.
    - System prompt classes: the first prompt of a session is split into a
      *system part*, its longest segment prefix that at least one other
      session's first prompt also starts with (what the source shares across
      sessions), and a *task part*, the rest (summed into one segment).
      Every distinct system part is a class with its segment sizes and its
      number of sessions; a session with nothing shared has the empty class.
      ``task_tokens``: the task parts.
    - ``output_tokens``: all calls.
    - ``tool_output_tokens[c]``: the tokens a call's next prompt appends after
      the call's answer (the tool output), for calls whose (first) tool has
      category ``c``. Only append-only successors count (see below).
    - Tool categories: a call's category is its first tool's category
      (``"(none)"`` for a call without tools). ``initial`` counts the first
      calls' categories, ``transitions[a][b]`` the successions a -> b
      (first-order Markov chain). If the category ``submit`` occurs and only
      ever on a session's last call, it is ``terminal``: the chain never
      emits it before the last call, and a session's last call is ``submit``
      with the source's share of sessions that end so (``ends_terminal``).
      Session length comes from ``session_calls``, not from the chain.
    - ``tool_duration_s[c]``: durations of all tools of category ``c``;
      ``tool_names[c]``: the category's most common tool name.
    - ``latency_s``: LLM latency (``latency_s`` where recorded) conditioned on
      the output size: the calls are split at the quartiles of their
      ``output_tokens`` (``latency_output_edges``) and each bin keeps its own
      distribution.
    - ``interarrival_s``: gaps between consecutive session starts (first
      call's ``timestamp_s``), taken **within each system-prompt class**: in a
      source made of batch runs the class is the run, and the idle time
      between runs is no arrival behaviour. ``None`` without timestamps.
    - ``non_append_share``: share of calls (turn >= 1) whose prompt does not
      start with the previous call's prompt (the context was rewritten).
    - ``last_gap_recorded``: whether the source gives its last calls a
      ``gap_s``.

What ``iter_sessions`` generates
    Session ``i`` gets id ``s<seed>-<i:06d>`` and segment ids
    ``syn/<session id>/task``, ``.../a<k>`` (answer of call k = its
    ``output_segment``), ``.../t<k>`` (tool output of call k). Its system
    class is drawn by the classes' session counts; class ``j`` uses the
    segments ``syn/sys<j>.<m>`` in every session, so cross-session sharing is
    reproduced. Prompts grow append-only: prompt k+1 = prompt k +
    ``[a<k>, output_tokens k]`` + ``[t<k>, tool output k]``, except that with
    probability ``non_append_share`` a call (turn >= 1) is a rewrite: all
    segments after the task part get fresh ids (``...v<n>``), same sizes, so
    only the system and task part stay shared. Each call has one tool (none
    for category ``(none)``) with a duration drawn for its category;
    ``gap_s`` = that duration (left out on the last call when the source has
    no last-call gaps). ``latency_s`` is drawn for every call (the first one
    too); ``timestamp_s``: session ``i`` starts at the sum of ``i`` drawn
    inter-arrival gaps (0 for the first session) and call k+1 is submitted at
    ``timestamp k + latency k + gap k``. Without latency data ``latency_s``
    is left out (and counts as 0 for the timestamps); without inter-arrival
    data every session starts at 0; with neither, ``timestamp_s`` is left out.

    Determinism: session ``i`` draws from
    ``numpy.random.default_rng(SeedSequence(seed, spawn_key=(i,)))`` (the
    ``i``-th child of ``SeedSequence(seed)``), in a fixed order, so the same
    (model, seed) gives the same sessions, and the first ``m`` sessions of a
    longer sample equal a sample of ``m``. Sessions are generated one at a
    time (consecutive prompts share their segment tuples), so
    ``write_trace(path, (c for s in iter_sessions(...) for c in s.calls))``
    streams any number of sessions in constant memory.

Known simplifications: one tool per call; session length, output sizes and
tool outputs are drawn independently of each other (except through the
category chain) and of the system class (in the bundled trace the classes are
three models with somewhat different behaviour; the model mixes them).
"""

from __future__ import annotations

import argparse
import bisect
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from traces.format import Call, Session, ToolCall, Trace

__all__ = [
    "MODEL_VERSION",
    "NO_TOOL",
    "WorkloadModel",
    "closeness",
    "fit",
    "format_closeness",
    "iter_sessions",
    "main",
    "sample",
    "synthetic_header",
    "synthetic_trace",
]

MODEL_VERSION = 1
NO_TOOL = "(none)"
TERMINAL = "submit"
MAX_POINTS = 1001  # distributions keep at most this many values


# ---------------------------------------------------------------- model


@dataclass
class WorkloadModel:
    """Empirical workload model of a trace (see the module docstring).

    Distributions are sorted lists of values; categorical data are counts.
    Everything is plain JSON data: ``to_json()`` gives a dict that
    ``json.dumps`` accepts, ``from_json`` takes that dict (or its JSON text).
    """

    source: str = ""
    fitted_sessions: int = 0
    fitted_calls: int = 0
    session_calls: list[int] = field(default_factory=list)
    # [{"tokens": [n per system segment], "sessions": count}, ...]
    system_classes: list[dict] = field(default_factory=list)
    task_tokens: list[int] = field(default_factory=list)
    output_tokens: list[int] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    tool_names: dict[str, str] = field(default_factory=dict)
    initial: dict[str, int] = field(default_factory=dict)
    transitions: dict[str, dict[str, int]] = field(default_factory=dict)
    terminal: str | None = None
    ends_terminal: int = 0  # sessions whose last call is `terminal`
    tool_output_tokens: dict[str, list[int]] = field(default_factory=dict)
    tool_duration_s: dict[str, list[float]] = field(default_factory=dict)
    latency_output_edges: list[float] = field(default_factory=list)
    latency_s: list[list[float]] | None = None
    interarrival_s: list[float] | None = None
    non_append_share: float = 0.0
    last_gap_recorded: bool = True
    version: int = MODEL_VERSION

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict | str | bytes) -> WorkloadModel:
        if isinstance(data, (str, bytes)):
            data = json.loads(data)
        if data.get("version", MODEL_VERSION) != MODEL_VERSION:
            raise ValueError(f"unsupported workload model version {data.get('version')!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown workload model keys: {sorted(unknown)}")
        return cls(**data)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> WorkloadModel:
        return cls.from_json(Path(path).read_text())


def _dist(values) -> list:
    """Sorted values, or their MAX_POINTS quantiles (observed values) if more."""
    v = sorted(values)
    if len(v) <= MAX_POINTS:
        return v
    q = np.quantile(np.asarray(v), np.linspace(0.0, 1.0, MAX_POINTS), method="inverted_cdf")
    return [type(v[0])(x) for x in q.tolist()]


def _category(call: Call) -> str:
    return call.tools[0].category if call.tools else NO_TOOL


def _system_length(first_prompts: list[tuple]) -> list[int]:
    """Per session: number of leading segments shared with another session's first prompt."""
    counts: Counter = Counter()
    for p in first_prompts:
        for j in range(1, len(p) + 1):
            counts[p[:j]] += 1
    out = []
    for p in first_prompts:
        n = 0
        for j in range(1, len(p) + 1):
            if counts[p[:j]] >= 2:
                n = j
            else:
                break
        out.append(n)
    return out


def fit(trace: Trace) -> WorkloadModel:
    """Measure a :class:`WorkloadModel` from a real trace."""
    sessions = [s for s in trace.sessions if s.calls]
    if not sessions:
        raise ValueError("cannot fit a workload model to a trace without calls")

    calls_all = [c for s in sessions for c in s.calls]
    cats_all = {_category(c) for c in calls_all}

    # Terminal category: present, and only ever on a session's last call.
    terminal = None
    if TERMINAL in cats_all and all(_category(c) != TERMINAL for s in sessions for c in s.calls[:-1]):
        terminal = TERMINAL

    # System classes and task parts.
    first_prompts = [s.calls[0].prompt for s in sessions]
    sys_len = _system_length(first_prompts)
    class_of: dict[tuple, int] = {}
    class_tokens: list[list[int]] = []
    class_sessions: list[int] = []
    task_tokens = []
    session_class = []
    for p, n in zip(first_prompts, sys_len):
        key = tuple(p[:n])
        j = class_of.get(key)
        if j is None:
            j = class_of[key] = len(class_tokens)
            class_tokens.append([t for _, t in key])
            class_sessions.append(0)
        class_sessions[j] += 1
        session_class.append(j)
        task_tokens.append(sum(t for _, t in p[n:]))

    # Categories, chain, tools.
    initial: Counter = Counter()
    transitions: dict[str, Counter] = defaultdict(Counter)
    names: dict[str, Counter] = defaultdict(Counter)
    durations: dict[str, list[float]] = defaultdict(list)
    tool_out: dict[str, list[int]] = defaultdict(list)
    ends_terminal = 0
    non_append = 0
    successors = 0
    last_gap = False
    for s in sessions:
        cats = [_category(c) for c in s.calls]
        initial[cats[0]] += 1
        if terminal is not None and cats[-1] == terminal:
            ends_terminal += 1
        if s.calls[-1].gap_s is not None:
            last_gap = True
        for a, b in zip(cats, cats[1:]):
            transitions[a][b] += 1
        for c in s.calls:
            for t in c.tools:
                names[t.category][t.name] += 1
                durations[t.category].append(t.duration_s)
        for prev, cur, cat in zip(s.calls, s.calls[1:], cats):
            successors += 1
            n = len(prev.prompt)
            if cur.prompt[:n] != prev.prompt:
                non_append += 1
                continue
            new = cur.prompt[n:]
            if new and prev.output_segment is not None and new[0][0] == prev.output_segment:
                new = new[1:]
            tokens = sum(t for _, t in new)
            if tokens > 0:
                tool_out[cat].append(tokens)

    categories = sorted(cats_all)

    # Latency, conditioned on output-token quartile bins.
    lat_pairs = [(c.output_tokens, c.latency_s) for c in calls_all if c.latency_s is not None]
    edges: list[float] = []
    latency = None
    if lat_pairs:
        outs = np.array([o for o, _ in lat_pairs], dtype=float)
        if len(lat_pairs) >= 40:
            edges = sorted(set(np.quantile(outs, [0.25, 0.5, 0.75]).tolist()))
        bins: list[list[float]] = [[] for _ in range(len(edges) + 1)]
        for o, lat in lat_pairs:
            bins[bisect.bisect_right(edges, o)].append(lat)
        # Drop empty bins by merging their edge away (cannot happen with quantile edges, kept for safety).
        while any(not b for b in bins):
            i = next(i for i, b in enumerate(bins) if not b)
            del bins[i]
            del edges[min(i, len(edges) - 1)]
        latency = [_dist(b) for b in bins]

    # Inter-arrival gaps of session starts, within each system class.
    gaps: list[float] = []
    starts: dict[int, list[float]] = defaultdict(list)
    for s, j in zip(sessions, session_class):
        if s.calls[0].timestamp_s is not None:
            starts[j].append(s.calls[0].timestamp_s)
    for ts in starts.values():
        ts.sort()
        gaps.extend(round(b - a, 6) for a, b in zip(ts, ts[1:]))

    return WorkloadModel(
        source=trace.source or str(trace.header.get("source", "")),
        fitted_sessions=len(sessions),
        fitted_calls=len(calls_all),
        session_calls=_dist(len(s.calls) for s in sessions),
        system_classes=[{"tokens": t, "sessions": n} for t, n in zip(class_tokens, class_sessions)],
        task_tokens=_dist(task_tokens),
        output_tokens=_dist(c.output_tokens for c in calls_all),
        categories=categories,
        tool_names={c: sorted(n.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for c, n in sorted(names.items())},
        initial=dict(sorted(initial.items())),
        transitions={a: dict(sorted(b.items())) for a, b in sorted(transitions.items())},
        terminal=terminal,
        ends_terminal=ends_terminal,
        tool_output_tokens={c: _dist(v) for c, v in sorted(tool_out.items())},
        tool_duration_s={c: _dist(v) for c, v in sorted(durations.items())},
        latency_output_edges=edges,
        latency_s=latency,
        interarrival_s=_dist(gaps) if gaps else None,
        non_append_share=non_append / successors if successors else 0.0,
        last_gap_recorded=last_gap,
    )


# ---------------------------------------------------------------- sampling


def _cumulative(counts: dict[str, int], categories: list[str], exclude: str | None) -> list[float] | None:
    w = [0 if c == exclude else counts.get(c, 0) for c in categories]
    total = sum(w)
    if total <= 0:
        return None
    acc, out = 0, []
    for x in w:
        acc += x
        out.append(acc / total)
    out[-1] = 1.0
    return out


class _Sampler:
    """Precomputed tables of a model for fast per-call draws."""

    def __init__(self, model: WorkloadModel):
        m = model
        if not m.session_calls or not m.output_tokens or not m.categories:
            raise ValueError("workload model is empty (fit it to a trace with calls)")
        self.m = m
        self.cats = list(m.categories)
        term = m.terminal
        n_sess = max(m.fitted_sessions, sum(c["sessions"] for c in m.system_classes), 1)
        self.p_end_terminal = m.ends_terminal / n_sess if term else 0.0
        non_term = {c: n for c, n in m.initial.items() if c != term}
        if not non_term:  # only terminal first calls: fall back to all successions' targets
            non_term = Counter()
            for row in m.transitions.values():
                non_term.update(row)
        marginal: Counter = Counter(m.initial)
        for row in m.transitions.values():
            marginal.update(row)
        self.initial = _cumulative(non_term, self.cats, term) or _cumulative(marginal, self.cats, term)
        if self.initial is None:  # the source has nothing but terminal calls
            self.initial = _cumulative(marginal, self.cats, None)
            self.p_end_terminal = 0.0
            term = None
        self.term = term
        fallback = self.initial
        self.rows = {c: _cumulative(m.transitions.get(c, {}), self.cats, term) or fallback for c in self.cats}
        self.class_cum = _cumulative(
            {str(j): c["sessions"] for j, c in enumerate(m.system_classes)},
            [str(j) for j in range(len(m.system_classes))],
            None,
        )
        self.class_segments = [
            tuple((f"syn/sys{j}.{k}", n) for k, n in enumerate(c["tokens"])) for j, c in enumerate(m.system_classes)
        ]
        pooled = sorted(x for v in m.tool_output_tokens.values() for x in v) or [1]
        self.tool_out = {c: m.tool_output_tokens.get(c) or pooled for c in self.cats}
        pooled_d = sorted(x for v in m.tool_duration_s.values() for x in v) or [0.0]
        self.duration = {c: m.tool_duration_s.get(c) or pooled_d for c in self.cats}
        self.names = {c: m.tool_names.get(c, "tool") for c in self.cats}
        self.latency = m.latency_s
        self.edges = m.latency_output_edges
        self.task = m.task_tokens or [0]


def _pick(values: list, u: float):
    return values[min(int(u * len(values)), len(values) - 1)]


def _session_rng(seed: int, i: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))


def iter_sessions(model: WorkloadModel, n_sessions: int, seed: int = 0) -> Iterator[Session]:
    """Generate ``n_sessions`` synthetic sessions, one at a time (see the module docstring)."""
    if n_sessions < 0:
        raise ValueError("n_sessions must be >= 0")
    S = _Sampler(model)
    m = model
    cats = S.cats
    start = 0.0
    for i in range(n_sessions):
        rng = _session_rng(seed, i)
        head = rng.random(4).tolist()  # length, class, task, inter-arrival
        length = max(1, int(_pick(m.session_calls, head[0])))
        u = rng.random((length, 6)).tolist()  # category, output, tool output, duration, latency, rewrite
        if i > 0 and m.interarrival_s:
            start = round(start + _pick(m.interarrival_s, head[3]), 6)
        sid = f"s{seed}-{i:06d}"
        pfx = f"syn/{sid}/"
        base = S.class_segments[bisect.bisect_right(S.class_cum, head[1])] if S.class_cum else ()
        task = int(_pick(S.task, head[2]))
        if task > 0:
            base = base + ((pfx + "task", task),)
        if not base:  # a prompt must hold a segment
            base = ((pfx + "task", 1),)

        # Categories: the chain without the terminal one; the last call may be terminal.
        seq = []
        prev = None
        for k in range(length):
            r = u[k][0]
            if k == length - 1 and S.term is not None and r < S.p_end_terminal:
                seq.append(S.term)
                break
            if k == length - 1 and S.term is not None:
                r = (r - S.p_end_terminal) / (1.0 - S.p_end_terminal)  # reuse the draw
            row = S.initial if prev is None else S.rows[prev]
            prev = cats[min(bisect.bisect_right(row, r), len(cats) - 1)]
            seq.append(prev)

        calls = []
        prompt = base
        history: list[tuple[str, int]] = []
        version = 0
        ts = start if m.interarrival_s is not None or m.latency_s is not None else None
        for k in range(length):
            uk = u[k]
            cat = seq[k]
            if k > 0 and m.non_append_share > 0 and uk[5] < m.non_append_share:
                version += 1
                prompt = base + tuple((f"{s}v{version}", n) for s, n in history)
            out = int(_pick(m.output_tokens, uk[1]))
            if cat == NO_TOOL:
                tools: tuple = ()
                dur = 0.0
            else:
                dur = float(_pick(S.duration[cat], uk[3]))
                tools = (ToolCall(S.names[cat], cat, dur),)
            lat = None
            if S.latency:
                lat = float(_pick(S.latency[bisect.bisect_right(S.edges, out)], uk[4]))
            last = k == length - 1
            gap = dur if (not last or m.last_gap_recorded) else None
            ans = pfx + f"a{k}"
            calls.append(Call(sid, k, prompt, out, ans, tools, gap, None if ts is None else round(ts, 6), lat))
            if last:
                break
            if ts is not None:
                ts += (lat or 0.0) + dur
            new = ((ans, out), (pfx + f"t{k}", int(_pick(S.tool_out[cat], uk[2]))))
            if m.non_append_share > 0:
                history.extend(new)
            prompt = prompt + new
        yield Session(sid, tuple(calls))


def sample(model: WorkloadModel, n_sessions: int, seed: int = 0) -> list[Call]:
    """All calls of ``n_sessions`` synthetic sessions, session by session."""
    return [c for s in iter_sessions(model, n_sessions, seed) for c in s.calls]


def synthetic_trace(model: WorkloadModel, n_sessions: int, seed: int = 0) -> Trace:
    """The synthetic sessions as an in-memory :class:`Trace`."""
    return Trace(
        list(iter_sessions(model, n_sessions, seed)),
        header=synthetic_header(model, n_sessions, seed),
        source=f"synthetic(seed={seed})",
    )


def synthetic_header(model: WorkloadModel, n_sessions: int, seed: int, fitted_from: str | None = None) -> dict:
    return {
        "synthetic": True,
        "generator": "traces.synth",
        "fitted_from": fitted_from or model.source,
        "fitted_sessions": model.fitted_sessions,
        "fitted_calls": model.fitted_calls,
        "seed": seed,
        "sessions": n_sessions,
        "notes": "synthetic trace sampled from an empirical workload model; segment ids are made up",
    }


# ---------------------------------------------------------------- closeness

def closeness(real: Trace, synthetic: Trace, *, analyze: Callable[[Trace], dict] | None = None,
              real_analysis: dict | None = None) -> dict:
    """How close a synthetic trace is to the real one, statistic by statistic.

    Analyses both traces with the function ``analyze`` (default
    ``traces.analysis.analyze``, which leaves out ``kv_working_set``; pass
    ``cwsim.analysis.analyze`` to simulate both traces for it, which is much
    slower, as ``cwsim synth --working-set`` does) and compares their summary scalars with ``summary_scalars`` /
    ``compare``. ``real_analysis`` reuses an analysis of ``real`` made the
    same way.

    Returns ``{"analysis", "real_sessions", "synthetic_sessions", "stats"}``;
    ``analysis`` names the analysis function (module and name), ``stats``
    maps each scalar's dotted name (``calls_per_session.median``,
    ``tool_mix.grep``, ``tool_duration_s.all.median``, ...) to ``{"real",
    "synthetic", "rel_error"}``, ``rel_error = (synthetic - real) / |real|``
    (``None`` where undefined; a tool category missing on one side has share 0).
    """
    from traces import analysis  # noqa: PLC0415  (pandas is loaded only for a report)

    if analyze is None:
        analyze = analysis.analyze
    compare, scalars = analysis.compare, analysis.summary_scalars
    name = f"{analyze.__module__}.{analyze.__qualname__}"
    ra = real_analysis if real_analysis is not None else analyze(real)
    sa = analyze(synthetic)
    r, s, rel = scalars(ra), scalars(sa), compare(ra, sa)
    stats = {}
    for key in list(r) + [k for k in s if k not in r]:
        d = 0.0 if key.startswith("tool_mix.") else None
        rv, sv = r.get(key, d), s.get(key, d)
        if rv is None and sv is None:
            continue  # e.g. kv_working_set without the simulation
        stats[key] = {"real": rv, "synthetic": sv, "rel_error": rel.get(key)}
    return {
        "analysis": name,
        "real_sessions": len(real.sessions),
        "synthetic_sessions": len(synthetic.sessions),
        "stats": stats,
    }


def _fmt(x) -> str:
    if x is None:
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def format_closeness(report: dict) -> str:
    """The closeness report as a plain-text table."""
    rows = [("statistic", "real", "synthetic", "rel.err")]
    for key, v in report["stats"].items():
        e = v["rel_error"]
        rows.append((key, _fmt(v["real"]), _fmt(v["synthetic"]), "-" if e is None else f"{e * 100:+.1f}%"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [
        f"closeness ({report['analysis']}): real {report['real_sessions']} sessions, "
        f"synthetic {report['synthetic_sessions']} sessions",
    ]
    for j, r in enumerate(rows):
        lines.append(f"{r[0]:<{w[0]}}  {r[1]:>{w[1]}}  {r[2]:>{w[2]}}  {r[3]:>{w[3]}}")
        if j == 0:
            lines.append("-" * (sum(w) + 6))
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    from traces.reader import load_trace, write_trace  # noqa: PLC0415

    ap = argparse.ArgumentParser(
        prog="python -m traces.synth",
        description="Fit an empirical workload model to a trace and write a synthetic trace like it.",
        epilog="The closeness report leaves out the KV working set; `cwsim synth --working-set` simulates it.",
    )
    ap.add_argument("--like", help="real trace to fit (.jsonl or .jsonl.gz)")
    ap.add_argument("--model", help="use this saved workload model (JSON) instead of fitting --like")
    ap.add_argument("--sessions", type=int, default=100, help="synthetic sessions to write (default 100)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("-o", "--output", required=True, help="output trace (.jsonl or .jsonl.gz)")
    ap.add_argument("--model-out", help="also write the fitted workload model (JSON) here")
    ap.add_argument(
        "--check-sessions",
        type=int,
        default=1000,
        help="closeness report on the first N synthetic sessions (regenerated in memory; 0: no report; default 1000)",
    )
    args = ap.parse_args(argv)
    if not args.like and not args.model:
        ap.error("give --like TRACE (or --model MODEL.json)")
    if args.sessions < 1:
        ap.error("--sessions must be >= 1")

    real = None
    t0 = time.perf_counter()
    if args.like:
        real = load_trace(args.like)
    if args.model:
        model = WorkloadModel.load(args.model)
        fitted_from = model.source
    else:
        model = fit(real)
        fitted_from = str(args.like)
        model.source = fitted_from
    if args.model_out:
        model.save(args.model_out)
        print(f"workload model -> {args.model_out}", file=sys.stderr)

    header = synthetic_header(model, args.sessions, args.seed, fitted_from)
    if real is not None and real.header.get("source"):
        header["fitted_from_source"] = real.header["source"]
    n = write_trace(
        args.output,
        (c for s in iter_sessions(model, args.sessions, args.seed) for c in s.calls),
        header,
    )
    print(
        f"{args.sessions} synthetic sessions, {n} calls -> {args.output} ({time.perf_counter() - t0:.1f} s)",
        file=sys.stderr,
    )
    if real is not None and args.check_sessions > 0:
        k = min(args.check_sessions, args.sessions)
        synth = synthetic_trace(model, k, args.seed)
        print(format_closeness(closeness(real, synth)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
