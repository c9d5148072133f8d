"""Sequence helpers of the simulator (workload preparation, block hashing).

They live in :mod:`traces.sequences`, the bottom layer, so that the trace
analysis can use them without importing ``cwsim``; this module keeps their
``cwsim`` names.
"""

from traces.sequences import common_prefix_len, shared_tokens

__all__ = ["common_prefix_len", "shared_tokens"]
