"""KV-cache policies: the contract (``api``), the policies, and their registry."""

from cwsim.policies.api import Environment, Need, Policy, Release, ReleaseReason, RequestView, ToolCall
from cwsim.policies.registry import POLICIES, PolicySpec, get_policy, make_policy, register_policy

__all__ = ["Environment", "Need", "Policy", "Release", "ReleaseReason", "RequestView", "ToolCall", "POLICIES",
           "PolicySpec", "get_policy", "make_policy", "register_policy"]
