"""A CPU KV tier behind the GPU pool: host memory reached over PCIe.

The tier holds block *contents*, identified by their chained block hashes
(the same hashes as the GPU pool's), up to ``capacity`` blocks, evicted LRU
when full. It is a mechanism: a policy decides what to offload and when to
prefetch (``tokencake``); admission uses it on its own (swap-in). Every
policy that never offloads leaves it empty, and then every result is the
same as without a tier.

Transfers. Moving ``n`` blocks takes ``n * block_bytes / (pcie_gbps * 1e9)``
seconds, ``block_bytes = block_size * kv_bytes_per_token`` (the step-time
profile's), ``pcie_gbps`` the effective bandwidth of one direction in GB/s
(10^9 bytes/s; default 25, a PCIe 4.0 x16 link's ~32 GB/s less overheads,
``SimConfig.pcie_gbps``). Each direction is one link: its transfers run one
after another, and they overlap with the engine's compute (background).

- **Offload** (GPU -> CPU, :meth:`CpuTier.offload`): copies free cached GPU
  blocks to the tier. The request is taken at the tick after the release that
  asked for it (the same simulated time), in request order (FIFO); the
  blocks that are still free and cached (all of them, as nothing is allocated
  between a release and the next tick) get one reference each, held by the
  copy, so they stay on the GPU and stay hits while it runs. The copy starts
  when the link is free and takes the transfer time of the blocks whose hash
  the tier does not hold already. When it ends, the hashes enter the tier
  (most recently used) and the copy's references are dropped: blocks no
  request holds lose their hash and join the front of the free queue as
  blocks without a hash (``BlockPool.release_uncached``): they are *not*
  evictions (``evicted_blocks``, ``harmful_evictions`` do not count them), as
  their content lives on in the tier; they count as ``offloaded_blocks``.
  Blocks a request took meanwhile stay cached GPU blocks. An offload is
  refused (returns False) when its blocks exceed ``capacity - reserved``
  (``reserved``: blocks of offloads still copying); otherwise the tier evicts
  its least recently used entries as needed when the copy lands.
- **Prefetch** (CPU -> GPU, :meth:`CpuTier.prefetch`): given a session's
  prefix hashes and an earliest start time. Prefetches start in order of
  that time (ties: request order), each when the link is free. At its start
  the prefetch walks the hashes in order: those cached on the GPU are
  skipped, those in the tier are to load, the first in neither ends the walk
  (later blocks could not be prefix hits). It loads at most as many blocks
  as are free: it pops them from the front of the free queue (which may
  evict cached blocks, counted as usual), gives them their hashes at once
  (lookups find them) and holds them while the copy runs. When the copy ends
  the blocks are released, tail first, scored by the eviction policy like any
  release (``FreedBlocks.reason == "prefetch"``, ``request`` the request
  that asked for it); they count as ``prefetched_blocks``. A request
  admitted on blocks whose copy has not ended waits for it: the rest of the
  copy is added to that step's time. A cancelled prefetch that has not
  started is dropped.
- **Swap-in** (synchronous, at admission; ``Scheduler._admit``): when a
  request's GPU prefix hit ends and the following prefix blocks are in the
  tier (up to the same limit as a GPU hit, ``(num_tokens - 1) // block_size``
  blocks), those blocks are loaded instead of recomputed: the request gets
  GPU blocks for them like for tokens it computes, they are cached at once,
  they count as computed (not prefilled, not recomputed), and their transfer
  time is added to the time of the step that admits the request. They count
  as ``swap_in_hits`` (blocks) and ``swapped_in_tokens`` at every admission,
  not as GPU hits (``prefix_hit_rate`` counts GPU hits only). Only one run is
  swapped in: GPU hit, then tier blocks; what follows is computed.
- **LRU.** Offload completions, prefetch starts and swap-ins make their
  hashes the most recently used. When the tier is over capacity (counting
  ``reserved``), its least recently used entries are evicted; those not cached
  on the GPU are lost content and go to ``on_evict`` (the metrics' pending
  set, so a later miss on them counts as a harmful eviction);
  ``cpu_evicted_blocks`` counts every entry evicted.

Time. The tier's events (an offload's requests and ends, a prefetch's start
and end) take effect at :meth:`tick`, which the engine calls before each
scheduling step, in time order, each at its own simulated time (the
transfers' times do not depend on when the tick runs). So an event takes
effect at the first step boundary at or after its time, as a pin expiry
does; :meth:`next_deadline` (the earliest pending event) stops the engine's
decode jumps before it, so jumps stay exact. While the engine is idle nothing
else touches the pool, so events processed late, at the next tick, give the
same state.

Simplifications: a synchronous swap-in does not wait for, or delay, the
background transfers on its link; an in-flight prefetch's source entries can
be evicted from the tier (the copy still completes); the tier is inclusive
(loading a block back keeps its entry).
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from cwsim.block_pool import BlockPool

#: default effective PCIe bandwidth per direction, GB/s (10^9 bytes/s)
DEFAULT_PCIE_GBPS = 25.0

_EMPTY = np.empty(0, dtype=np.int64)


@dataclass(slots=True, eq=False)
class _Offload:
    t: float  # when it was asked for (the release)
    blocks: np.ndarray  # GPU blocks, in the order given (eviction order of the release)
    hashes: list[int]
    gens: np.ndarray  # the blocks' eviction counts when asked (to skip blocks reused since)
    reserved: int
    n_copy: int = 0
    start: float = 0.0
    end: float = 0.0


@dataclass(slots=True, eq=False)
class Prefetch:
    """One scheduled prefetch (a handle for :meth:`CpuTier.cancel`)."""

    t: float  # earliest start
    hashes: list[int]  # the prefix to bring back, in order
    owner: object  # the request passed to the eviction policy when the blocks are released
    cancelled: bool = False
    blocks: np.ndarray = field(default_factory=lambda: _EMPTY)
    start: float = math.inf
    end: float = math.inf


class CpuTier:
    def __init__(self, capacity: int, pool: BlockPool, block_bytes: int, pcie_gbps: float = DEFAULT_PCIE_GBPS,
                 on_evict: Callable[[list[int]], None] | None = None):
        if capacity < 1:
            raise ValueError(f"CPU tier capacity must be >= 1 block, got {capacity}")
        if not pcie_gbps > 0:
            raise ValueError(f"pcie_gbps must be > 0, got {pcie_gbps}")
        self.capacity = capacity
        self.pool = pool
        self.block_time = block_bytes / (pcie_gbps * 1e9)  # seconds per block, one direction
        self.on_evict = on_evict
        self.lru: OrderedDict[int, None] = OrderedDict()  # hash -> None, least recently used first
        self.reserved = 0  # blocks of offloads not yet landed
        self._incoming: deque[_Offload] = deque()  # asked for, blocks not yet taken
        self._d2h: deque[_Offload] = deque()  # copying or queued, FIFO
        self._d2h_free = 0.0  # when the GPU -> CPU link is next free
        self._pending: list[tuple[float, int, Prefetch]] = []  # heap by earliest start
        self._pseq = 0
        self._h2d: Prefetch | None = None  # the prefetch copying now
        self._h2d_free = 0.0
        self._ready = np.zeros(pool.num_blocks)  # per GPU block: end of its prefetch copy (while copying)
        self.offloaded_blocks = 0  # GPU blocks freed, their content kept in the tier
        self.offload_copied_blocks = 0  # blocks copied GPU -> CPU
        self.prefetched_blocks = 0
        self.swap_in_blocks = 0
        self.cpu_evicted_blocks = 0
        self._version = 0  # bumped when the set of hashes held changes
        self._memo = None

    # ---------------------------------------------------------------- queries
    def __len__(self) -> int:
        return len(self.lru)

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.lru

    def transfer_time(self, n_blocks: int) -> float:
        return n_blocks * self.block_time

    def room(self) -> int:
        """The most blocks one offload may take now (evicting least recently used entries)."""
        return self.capacity - self.reserved

    def holds_blocks(self) -> bool:
        """True while transfers hold GPU blocks (copies running or queued): they will free them."""
        return bool(self._d2h or self._incoming) or self._h2d is not None

    def continuation(self, hashes, start: int, stop: int) -> int:
        """How many of ``hashes[start:stop]``, from the first on, the tier holds."""
        lru = self.lru
        if not lru or start >= stop:
            return 0
        memo = self._memo  # a request that fails admission is asked again at each step
        if memo is not None and memo[0] is hashes and memo[1] == start and memo[2] == stop and memo[3] == self._version:
            return memo[4]
        contains = lru.__contains__
        n = 0
        while start + n < stop:  # in chunks, stopping at the first miss
            flags = list(map(contains, hashes[start + n : min(stop, start + n + 256)]))
            if False in flags:
                n += flags.index(False)
                break
            n += len(flags)
        self._memo = (hashes, start, stop, self._version, n)  # holds the list: its id is not reused
        return n

    # ------------------------------------------------------------ operations
    def offload(self, blocks: np.ndarray, hashes, now: float) -> bool:
        """Ask to copy free cached GPU blocks (``hashes`` their hashes) to the tier; False if no room."""
        n = len(blocks)
        if n == 0 or n > self.room():
            return False
        blocks = np.array(blocks, dtype=np.int64)
        self.reserved += n
        self._incoming.append(_Offload(now, blocks, list(hashes), self.pool.gen[blocks].copy(), n))
        return True

    def prefetch(self, hashes, at: float, owner=None) -> Prefetch:
        """Schedule bringing ``hashes`` (a prefix, in order) back to the GPU, starting no earlier than ``at``."""
        p = Prefetch(at, list(hashes), owner)
        self._pseq += 1
        heapq.heappush(self._pending, (at, self._pseq, p))
        return p

    def cancel(self, p: Prefetch | None) -> None:
        """Drop a prefetch that has not started (no effect on one started or done)."""
        if p is not None and p.start == math.inf:
            p.cancelled = True

    def swap_in(self, hashes) -> float:
        """Account a synchronous load of ``hashes`` at admission; returns its transfer time."""
        lru = self.lru
        for h in hashes:
            lru.move_to_end(h)
        self.swap_in_blocks += len(hashes)
        return self.transfer_time(len(hashes))

    def load_wait(self, blocks: np.ndarray, now: float) -> float:
        """Seconds until the prefetch copies that ``blocks`` (GPU hits) are waiting for end (0: none)."""
        if self._h2d is None or len(blocks) == 0:
            return 0.0
        w = float(self._ready_for()[blocks].max()) - now
        return w if w > 0 else 0.0

    # ------------------------------------------------------------------ time
    def _next_start(self) -> float:
        pending = self._pending
        while pending and pending[0][2].cancelled:
            heapq.heappop(pending)
        if not pending or self._h2d is not None:
            return math.inf
        return max(pending[0][0], self._h2d_free)

    def next_deadline(self) -> float:
        """The earliest time at which :meth:`tick` will change the pool or the tier (``inf``: never)."""
        return min(self._d2h[0].end if self._d2h else math.inf,
                   self._h2d.end if self._h2d is not None else math.inf,
                   self._incoming[0].t if self._incoming else math.inf,
                   self._next_start())

    def tick(self, now: float) -> None:
        """Apply every event due at or before ``now``, in time order (ties: copies ending first)."""
        while True:
            t_d2h = self._d2h[0].end if self._d2h else math.inf
            t_h2d = self._h2d.end if self._h2d is not None else math.inf
            t_in = self._incoming[0].t if self._incoming else math.inf
            t_start = self._next_start()
            t = min(t_d2h, t_h2d, t_in, t_start)
            if t > now:
                return
            if t_d2h == t:
                self._land_offload(self._d2h.popleft())
            elif t_h2d == t:
                self._land_prefetch()
            elif t_in == t:
                self._start_offload(self._incoming.popleft())
            else:
                self._start_prefetch(heapq.heappop(self._pending)[2], t)

    def _start_offload(self, job: _Offload) -> None:
        pool, b = self.pool, job.blocks
        ok = pool.is_free(b) & pool.has_hash[b] & (pool.gen[b] == job.gens)
        if not ok.all():
            job.blocks = b = b[ok]
            job.hashes = pool.hash_of[b].tolist()
        pool.touch(b)  # held by the copy
        lru = self.lru
        job.n_copy = sum(1 for h in job.hashes if h not in lru)
        job.start = max(job.t, self._d2h_free)
        job.end = self._d2h_free = job.start + self.transfer_time(job.n_copy)
        self._d2h.append(job)

    def _land_offload(self, job: _Offload) -> None:
        self.reserved -= job.reserved
        lru = self.lru
        for h in job.hashes:
            lru[h] = None
            lru.move_to_end(h)
        self._version += 1
        self._trim()
        self.offload_copied_blocks += job.n_copy
        self.offloaded_blocks += self.pool.release_uncached(job.blocks)

    def _trim(self) -> None:
        over = len(self.lru) + self.reserved - self.capacity
        if over <= 0:
            return
        self._version += 1
        cached, lost = self.pool.cached, []
        for _ in range(over):
            h, _ = self.lru.popitem(last=False)
            if h not in cached:
                lost.append(h)
        self.cpu_evicted_blocks += over
        if lost and self.on_evict is not None:
            self.on_evict(lost)

    def _start_prefetch(self, p: Prefetch, t: float) -> None:
        pool, lru = self.pool, self.lru
        cached = pool.cached
        load = []
        for h in p.hashes:
            if h in cached:
                continue
            if h not in lru:
                break
            load.append(h)
        if not pool.growable:
            load = load[: pool.num_free]
        p.start = t
        if not load:
            p.end = t
            return
        blocks = pool.get_new_blocks(len(load))
        pool.cache_full_blocks(blocks, load)
        for h in load:
            lru.move_to_end(h)
        p.blocks = blocks
        p.end = self._h2d_free = t + self.transfer_time(len(load))
        self._ready_for()[blocks] = p.end
        self._h2d = p

    def _land_prefetch(self) -> None:
        p, self._h2d = self._h2d, None
        self._ready_for()[p.blocks] = 0.0
        self.prefetched_blocks += len(p.blocks)
        self.pool.free_blocks(p.blocks[::-1], p.owner, p.end, "prefetch")  # tail first, scored as a release

    def _ready_for(self) -> np.ndarray:
        n = self.pool.num_blocks
        if len(self._ready) < n:  # a growable pool grew
            self._ready = np.concatenate([self._ready, np.zeros(n - len(self._ready))])
        return self._ready
