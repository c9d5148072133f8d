"""Scheduling and eviction policies, and their registry."""

from cwsim.policies.base import EvictionPolicy, PolicyContext, SchedulingPolicy
from cwsim.policies.registry import POLICIES, PolicySpec, get_policy

__all__ = ["EvictionPolicy", "PolicyContext", "SchedulingPolicy", "POLICIES", "PolicySpec", "get_policy"]
