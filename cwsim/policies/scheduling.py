"""Request-ordering policies."""

from __future__ import annotations

from cwsim.policies.base import SchedulingPolicy
from cwsim.request import Request


class FCFS(SchedulingPolicy):
    """vLLM's default: first come, first served (preempted requests in front)."""

    name = "fcfs"


class LongestPrefixMatch(SchedulingPolicy):
    """SGLang's ``lpm``: admit first the waiting request with the most cached prefix.

    Like SGLang, it falls back to FCFS when the queue is longer than
    ``max_queue`` (matching every request each step would cost too much).
    """

    name = "lpm"
    static = False

    def __init__(self, max_queue: int = 128):
        self.max_queue = max_queue

    def priority(self, req: Request) -> float:
        return -float(len(self.ctx.kv.longest_prefix(req)))
