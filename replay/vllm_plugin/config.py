"""The plugin's settings, read from vLLM's ``--additional-config`` (key ``cachewise``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from cwsim.policies.online import DEFAULT_SESSION_IDLE_S

#: the key of ``additional_config`` that holds the plugin's settings
CONFIG_KEY = "cachewise"


def import_policy_modules(modules, flag: str = "--policy-import") -> None:
    """Import each module (one of the user's registers its own policy), or ``ValueError`` naming ``flag``."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as e:
            raise ValueError(f"{flag} {module}: {e}") from None


def engine_policy(name: str, setting_names=()):
    """The registry's spec of a policy the plugin can run with these settings, or ``ValueError``
    (one line naming ``--policy``): an unknown policy, one that runs in the simulator only, a
    setting it does not take."""
    from cwsim.policies.registry import get_policy

    try:
        spec = get_policy(name)
    except ValueError as e:
        raise ValueError(f"--policy: {e}") from None
    if not spec.runs_in_vllm:
        why = "an unbounded KV pool" if spec.unbounded else "the trace's future, which a live engine does not know"
        raise ValueError(f"--policy {spec.name}: runs in the simulator only (it needs {why})")
    bad = sorted(set(setting_names) - set(spec.params))
    if bad:
        raise ValueError(f"--policy {spec.name}: takes the settings {list(spec.params)}, not {bad}")
    return spec


@dataclass(frozen=True)
class PluginConfig:
    """``policy``: a registered policy name (``cwsim policies``), after importing the modules named
    in ``imports`` (a module of the user's that registers its own policy); ``settings``: its constructor
    settings (``aging_s``, ``offload_threshold_s``, ...); ``predictor_trace``: the trace the
    tool-call predictor is fitted on (a policy that needs a predictor needs it), with
    ``predictor_error`` and ``seed`` as in ``cwsim run``; ``session_idle_s``: how long after its
    latest finished request a session still counts as active; ``step_log``: a CSV file the scheduler
    writes one row per step to (``cwsim.runner.STEP_FIELDS``, as ``cwsim run --step-log``), or None."""

    policy: str = "vllm"
    settings: dict = field(default_factory=dict)
    imports: list = field(default_factory=list)
    predictor_trace: str | None = None
    predictor_error: float = 0.0
    seed: int = 0
    session_idle_s: float = DEFAULT_SESSION_IDLE_S
    step_log: str | None = None

    @classmethod
    def from_additional_config(cls, additional: dict | None) -> "PluginConfig":
        raw = (additional or {}).get(CONFIG_KEY) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"--additional-config {CONFIG_KEY!r} must be an object, got {raw!r}")
        known = set(cls.__dataclass_fields__)
        bad = sorted(set(raw) - known)
        if bad:
            raise ValueError(f"--additional-config {CONFIG_KEY!r}: unknown keys {bad}; known: {sorted(known)}")
        return cls(**raw)

    def to_additional_config(self) -> dict:
        return {CONFIG_KEY: asdict(self)}

    def to_json(self) -> str:
        return json.dumps(self.to_additional_config())
