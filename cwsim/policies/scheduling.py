"""Scheduling-only policies: SGLang's longest prefix match."""

from __future__ import annotations

from cwsim.policies.api import Policy, RequestView


class LongestPrefixMatch(Policy):
    """SGLang's ``lpm``: admit first the waiting request with the most cached prefix (LRU eviction).

    Like SGLang, it falls back to FCFS when the queue is longer than
    ``max_queue`` (matching every request each step would cost too much).
    """

    name = "sglang"

    def __init__(self, max_queue: int = 128):
        self.max_queue = max_queue

    def priority(self, req: RequestView) -> float:
        return -float(self.env.cached_prefix_blocks(req))
