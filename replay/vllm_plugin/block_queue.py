"""vLLM's free-block queue, ordered by the simulator's ``FreeBlockQueue`` and scored by the policy.

:class:`PolicyBlockQueue` has the surface of vLLM's ``FreeKVCacheBlockQueue``
(``popleft``, ``popleft_n``, ``remove``, ``append``, ``append_n``,
``prepend_n``, ``num_free_blocks``, ``get_all_free_blocks``) over vLLM's
``KVCacheBlock`` objects; it keeps their ids in a
``cwsim.free_queue.FreeBlockQueue``, the class the simulator's pool uses, so
both engines order free blocks by one implementation. vLLM's ``BlockPool``
prepends the blocks of a release that have no hash and appends those that have
one, in eviction order; the appended batch is scored by the policy, given the
release that the scheduler announced (:meth:`VllmEnvironment.before_free`).
"""

from __future__ import annotations

import numpy as np

from cwsim.free_queue import FreeBlockQueue


class PolicyBlockQueue:
    def __init__(self, blocks: list, free_now: list, env):
        self._blocks = blocks  # KVCacheBlock by id
        self._q = FreeBlockQueue(len(blocks), np.array([b.block_id for b in free_now], dtype=np.int64))
        self._env = env

    @property
    def queue(self) -> FreeBlockQueue:
        return self._q

    @property
    def num_free_blocks(self) -> int:
        return self._q.num_free_blocks

    def _popped(self, ids) -> list:
        blocks = self._blocks
        out = [blocks[i] for i in ids]
        sharing = self._env.sharing
        if sharing is not None:  # the cached ones are about to be evicted: their contents' cached lives end
            evicted = [b.block_id for b in out if b.block_hash is not None]
            if evicted:
                sharing.forget(evicted)
        return out

    def popleft(self):
        return self._popped(self._q.popleft_small(1))[0]

    def popleft_n(self, n: int) -> list:
        if n <= 0:
            return []
        return self._popped(self._q.popleft_n(n).tolist())

    def remove(self, block) -> None:
        self._q.remove(np.array([block.block_id], dtype=np.int64))

    def prepend_n(self, blocks: list) -> None:
        if blocks:
            self._q.prepend_n(np.array([b.block_id for b in blocks], dtype=np.int64))

    def append(self, block) -> None:
        self.append_n([block])

    def append_n(self, blocks: list) -> None:
        if not blocks:
            return
        ids = np.array([b.block_id for b in blocks], dtype=np.int64)
        self._q.append_n(ids, self._env.score(ids, blocks, self._q.next_seq))

    def get_all_free_blocks(self) -> list:
        blocks = self._blocks
        return [blocks[i] for i in self._q.get_all_free_blocks()]

    def iter_blocks_after(self, cursor):
        ids = self._q.get_all_free_blocks()
        start = 0 if cursor is None else ids.index(cursor.block_id) + 1
        blocks = self._blocks
        for i in ids[start:]:
            yield blocks[i]
