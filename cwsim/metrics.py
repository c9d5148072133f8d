"""What a run measures, recorded as it happens and written incrementally.

- ``evicted_blocks``: cached blocks reallocated to new content (one vLLM
  BlockRemoved per block; a duplicate block of a hash that another block
  still caches counts too, as in vLLM).
- ``harmful_evictions``: evictions whose hash a later call requested again
  (counted when that call is admitted and misses it).
- ``prefix_hit_rate``: prompt tokens served from the prefix cache at a call's
  first admission / prompt tokens.
- ``recomputed_prompt_tokens``: tokens prefilled although their KV had been
  computed before: prompt blocks that were evicted (or sit cached past the
  first miss), and everything a preempted request recomputes.
- ``offloaded_blocks``, ``prefetched_blocks``, ``swap_in_hits`` (and
  ``swapped_in_tokens``, ``cpu_evicted_blocks``): the CPU tier's counters
  (``cwsim.cpu_tier``); 0 without a tier. Swapped-in blocks are neither GPU
  hits nor recomputed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from cwsim import native
from cwsim.request import Request

REQUEST_FIELDS = [
    "session_id", "turn", "arrival_s", "first_scheduled_s", "first_token_s", "finish_s",
    "prompt_tokens", "output_tokens", "cached_tokens", "recomputed_tokens", "preemptions",
]
SESSION_FIELDS = ["session_id", "calls", "start_s", "end_s", "duration_s", "prompt_tokens", "cached_tokens",
                  "recomputed_tokens", "preemptions"]


_count = np.count_nonzero


def py_count_misses(pending: np.ndarray, cached: dict, missed) -> tuple[int, int]:
    """For the distinct hash ids ``missed`` (an admission's missed prompt blocks): how many are
    flagged in ``pending`` (evicted since they were last requested: harmful evictions; their flags
    are cleared) and how many the pool's hash map ``cached`` holds. Ids past the flags are unflagged.
    The specification of the compiled ``cwsim._metrics.count_misses``, and what runs where that was not built."""
    ids = np.asarray(missed, dtype=np.int64)
    if len(ids) and int(ids.max()) >= len(pending):
        ids = ids[ids < len(pending)]
    flags = pending[ids]
    harmful = int(_count(flags))
    if harmful:
        pending[ids] = 0
    return harmful, sum(map(cached.__contains__, missed))


_compiled = native.load("cwsim._metrics")
#: whether ``count_misses`` is the compiled function (``cwsim.native``)
NATIVE = _compiled is not None
count_misses = _compiled.count_misses if NATIVE else py_count_misses


class Metrics:
    def __init__(self, block_size: int, out_dir: Path | None = None, on_progress=None):
        self.block_size = block_size
        self.pool = None
        self.cpu_tier = None
        #: pending[h] (0 or 1): hash id h was evicted and has not been requested since (a later miss is harmful)
        self._pending = np.zeros(1024, dtype=np.uint8)
        self.harmful_evictions = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.recomputed_tokens = 0
        self.preemptions = 0
        self.requests = 0
        self.session_times: list[float] = []
        self.sessions_done = 0
        self.makespan = 0.0
        self.on_progress = on_progress
        self._files = []
        self._req_writer = self._sess_writer = None
        self._sess_acc: dict[int, list[int]] = {}
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            self._req_writer = self._open(out_dir / "requests.csv", REQUEST_FIELDS)
            self._sess_writer = self._open(out_dir / "sessions.csv", SESSION_FIELDS)

    def _open(self, path: Path, fields: list[str]):
        f = open(path, "w", newline="")
        self._files.append(f)
        w = csv.writer(f)
        w.writerow(fields)
        return w

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    # ------------------------------------------------------------- events
    def _fit(self, hashes: list[int]) -> None:
        """Grow the pending flags to cover ``hashes`` (dense ids, ``cwsim.hashing.HashIds``)."""
        top = max(hashes) + 1
        if top > len(self._pending):
            grown = np.zeros(max(top, 2 * len(self._pending)), dtype=np.uint8)
            grown[: len(self._pending)] = self._pending
            self._pending = grown

    def on_evict(self, hashes) -> None:
        """Flag evicted hash ids (a list or an int64 array: the compiled pool's, indexed without a conversion)."""
        try:
            self._pending[hashes] = 1
        except IndexError:  # a hash id past the flags: grow them
            self._fit(hashes)
            self._pending[hashes] = 1

    def on_admit(self, req: Request, hit_tokens: int, now: float, swap_tokens: int = 0) -> None:
        """``hit_tokens``: the GPU prefix hit; ``swap_tokens``: the tokens swapped in from the CPU tier after it."""
        bs = self.block_size
        if swap_tokens:  # loaded, not missed: an earlier eviction of these hashes did no harm (yet)
            loaded = req.hashes[hit_tokens // bs : (hit_tokens + swap_tokens) // bs]
            if loaded:
                self._fit(loaded)
                self._pending[loaded] = 0  # (swap-ins: rare, CPU tier only)
            hit_tokens += swap_tokens  # for what follows: computed before this admission, not recomputed
        if req.admitted:  # re-admission after preemption: all of it was computed before
            req.recomputed_tokens += req.num_tokens - hit_tokens
            return
        req.admitted = True
        req.first_scheduled = now
        req.cached_tokens = hit_tokens - swap_tokens
        # (an unlisted block's hash is new: never evicted before, not in the hash map)
        missed = req.hashes[hit_tokens // bs : min(req.prompt_len // bs, req.unlisted_from)]
        # harmful: missed blocks evicted since last requested (a sequence's block hashes are distinct);
        # in_cache: missed blocks cached elsewhere (past the first miss, or a duplicate);
        # the blocks this admission has just cached itself (canonical ones) do not count
        pool = self.pool
        harmful, in_cache = count_misses(self._pending, pool.cached, missed) if missed else (0, 0)
        self.harmful_evictions += harmful
        own = int(np.count_nonzero(pool.canonical[req.blocks[hit_tokens // bs : req.num_cached_blocks]]))
        seen_before = harmful + in_cache - own
        req.recomputed_tokens += seen_before * bs

    def on_finish(self, req: Request, now: float) -> None:
        # the row first, then the counts: an interrupt between the two leaves the summary's
        # count no higher than the rows written
        if self._req_writer is not None:
            self._req_writer.writerow([
                req.session.session_id, req.turn, _r(req.arrival), _r(req.first_scheduled), _r(req.first_token),
                _r(now), req.prompt_len, req.output_len, req.cached_tokens, req.recomputed_tokens, req.preemptions,
            ])
        self.requests += 1
        self.prompt_tokens += req.prompt_len
        self.cached_tokens += req.cached_tokens
        self.recomputed_tokens += req.recomputed_tokens
        self.preemptions += req.preemptions
        acc = self._sess_acc.setdefault(req.session.index, [0, 0, 0, 0, 0])
        acc[0] += 1
        acc[1] += req.prompt_len
        acc[2] += req.cached_tokens
        acc[3] += req.recomputed_tokens
        acc[4] += req.preemptions

    def on_session_end(self, sess) -> None:
        duration = sess.end - sess.start
        self.session_times.append(duration)
        self.sessions_done += 1
        self.makespan = max(self.makespan, sess.end)
        acc = self._sess_acc.pop(sess.index)
        if self._sess_writer is not None:
            self._sess_writer.writerow([sess.session_id, acc[0], _r(sess.start), _r(sess.end), _r(duration), *acc[1:]])
            for f in self._files:
                f.flush()
        if self.on_progress is not None:
            self.on_progress(len(sess.calls))

    # ------------------------------------------------------------ summary
    def summary(self) -> dict:
        t = np.array(self.session_times) if self.session_times else np.zeros(1)
        return {
            "sessions": self.sessions_done,
            "requests": self.requests,
            "evicted_blocks": int(self.pool.num_evicted) if self.pool is not None else 0,
            "harmful_evictions": self.harmful_evictions,
            "prefix_hit_rate": self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "cached_prompt_tokens": self.cached_tokens,
            "recomputed_prompt_tokens": self.recomputed_tokens,
            "preemptions": self.preemptions,
            "total_session_time_s": float(t.sum()),
            "mean_session_time_s": float(t.mean()),
            "p99_session_time_s": float(np.percentile(t, 99)),
            "makespan_s": self.makespan,
            **self.tier_summary(),
        }

    def tier_summary(self) -> dict:
        tier, bs = self.cpu_tier, self.block_size
        n = lambda name: int(getattr(tier, name)) if tier is not None else 0  # noqa: E731
        return {
            "offloaded_blocks": n("offloaded_blocks"),
            "prefetched_blocks": n("prefetched_blocks"),
            "swap_in_hits": n("swap_in_blocks"),
            "swapped_in_tokens": n("swap_in_blocks") * bs,
            "cpu_evicted_blocks": n("cpu_evicted_blocks"),
        }


def _r(x: float) -> float:
    return round(x, 6)
