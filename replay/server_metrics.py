"""vLLM's Prometheus ``/metrics``: the counters a replay reads before and after a run.

``/metrics`` has no eviction counter (``BlockRemoved`` events are the count);
it has the prefix-cache queries and hits (in tokens), preemptions, prompt and
generated tokens and finished requests, and the sums of two per-request
histograms: the time requests waited in the engine core's queue and the time
from their first scheduling to their last token (``request_queue_s``,
``request_inference_s``: the engine core's own share of a call;
``replay.live.outside_engine`` is what is left of a call's latency).
:func:`parse_metrics` sums each counter over its label sets; :func:`cache_config`
reads the pool's size and block size from ``vllm:cache_config_info``.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

#: summary key -> vLLM counter (the sample name, with its ``_total``, or a histogram's ``_sum``)
COUNTERS = {
    "prefix_cache_queries": "vllm:prefix_cache_queries_total",
    "prefix_cache_hits": "vllm:prefix_cache_hits_total",
    "preemptions": "vllm:num_preemptions_total",
    "prompt_tokens": "vllm:prompt_tokens_total",
    "generation_tokens": "vllm:generation_tokens_total",
    "requests_finished": "vllm:request_success_total",
    # histogram sums, seconds (vllm/v1/metrics/stats.py: queued = scheduled_ts - queued_ts, inference =
    # last_token_ts - scheduled_ts, both engine-core timestamps)
    "request_queue_s": "vllm:request_queue_time_seconds_sum",
    "request_inference_s": "vllm:request_inference_time_seconds_sum",
}


def parse_metrics(text: str) -> dict[str, float]:
    """The :data:`COUNTERS` in a ``/metrics`` page, each summed over its label sets (0 when absent)."""
    wanted = {v: k for k, v in COUNTERS.items()}
    out = dict.fromkeys(COUNTERS, 0.0)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = wanted.get(s.name)
            if key is not None:
                out[key] += s.value
    return out


def cache_config(text: str) -> dict[str, int]:
    """``num_gpu_blocks`` and ``block_size`` from ``vllm:cache_config_info`` ({} when absent)."""
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith("vllm:cache_config_info"):
                return {k: int(s.labels[k]) for k in ("num_gpu_blocks", "block_size")
                        if str(s.labels.get(k, "")).isdigit()}
    return {}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in COUNTERS}
