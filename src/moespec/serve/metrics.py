"""Prometheus metrics of `moespec serve` (GET /metrics).

Request metrics and the speculation counters reuse the names dashboards already read (vLLM's, under the
`moespec:` prefix). Expert-cache metrics have no standard yet: they are read from the engine's expert
counters at scrape time (hits, misses, bytes loaded by tier, prefetch issued / used / wasted, stall
seconds), and distinct experts per verification layer is kept as two counters whose rates divide.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..spec_decode.stats import SpecStats

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    def __init__(self, model_name: str, expert_stats: Callable[[], dict] | None = None):
        self.registry = r = CollectorRegistry()
        lab = {"model_name": model_name}
        self._lab = lab

        def counter(name, doc, labels=()):
            return Counter(f"moespec:{name}", doc, ["model_name", *labels], registry=r)
        self._success = counter("request_success", "Finished requests (choices) by finish reason", ["finished_reason"])
        self._prompt = counter("prompt_tokens", "Prompt tokens prefilled").labels(**lab)
        self._generated = counter("generation_tokens", "Tokens generated").labels(**lab)
        self.running = Gauge("moespec:num_requests_running", "Requests decoding now", ["model_name"],
                             registry=r).labels(**lab)
        self.waiting = Gauge("moespec:num_requests_waiting", "Requests waiting for the engine", ["model_name"],
                             registry=r).labels(**lab)
        self.ttft = Histogram("moespec:time_to_first_token_seconds", "Arrival to first text", ["model_name"],
                              buckets=_LATENCY, registry=r).labels(**lab)
        self.itl = Histogram("moespec:inter_token_latency_seconds", "Time between text deltas of a choice",
                             ["model_name"], buckets=_ITL, registry=r).labels(**lab)
        self._e2e = Histogram("moespec:e2e_request_latency_seconds", "Arrival to last token of a choice",
                              ["model_name"], buckets=_LATENCY, registry=r).labels(**lab)
        self._drafts = counter("spec_decode_num_drafts", "Speculative steps (per sequence)").labels(**lab)
        self._draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed").labels(**lab)
        self._accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted").labels(**lab)
        self._per_pos = counter("spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at each "
                                "draft position", ["position"])
        self._verify_experts = counter("spec_decode_verify_distinct_experts", "Distinct experts computed, summed "
                                       "over the MoE layers of verification forwards").labels(**lab)
        self._verify_layers = counter("spec_decode_verify_layers", "MoE layers of verification forwards "
                                      "(divide the counter above by this for distinct experts per layer)").labels(**lab)
        if expert_stats is not None:
            r.register(_ExpertCollector(expert_stats, model_name))

    def finished(self, out, latency_s: float) -> None:
        """One choice ended (not aborted): its tokens, finish reason and end-to-end latency."""
        self._success.labels(finished_reason=out.finish_reason, **self._lab).inc()
        self._prompt.inc(len(out.prompt_token_ids))
        self._generated.inc(len(out.token_ids))
        self._e2e.observe(latency_s)

    def speculation(self, spec: SpecStats, seen: SpecStats) -> SpecStats:
        """Adds the speculation counters a batch gained since `seen` (what the last call returned): a server's batch
        may never end, so they are reported as it goes. Returns the new `seen`."""
        if spec.row_steps != seen.row_steps:
            self._drafts.inc(spec.row_steps - seen.row_steps)
            self._draft_tokens.inc(spec.drafted - seen.drafted)
            self._accepted.inc(spec.accepted - seen.accepted)
            for pos, n in spec.accepted_per_pos.items():
                if n != seen.accepted_per_pos.get(pos, 0):
                    self._per_pos.labels(position=str(pos), **self._lab).inc(n - seen.accepted_per_pos.get(pos, 0))
            self._verify_experts.inc(spec.verify_experts - seen.verify_experts)
            self._verify_layers.inc(spec.verify_layers - seen.verify_layers)
        return replace(spec, accepted_per_pos=dict(spec.accepted_per_pos))


class _ExpertCollector:
    """The expert cache's own counters (cumulative since load), read when Prometheus scrapes."""

    def __init__(self, stats: Callable[[], dict], model_name: str):
        self.stats, self.model_name = stats, model_name

    def collect(self):
        s = self.stats()
        g = GaugeMetricFamily("moespec:expert_cache_capacity", "Experts per MoE layer in fast memory",
                              labels=["model_name"])
        g.add_metric([self.model_name], s.get("capacity", 0))
        yield g
        for key, name, doc in (("hits", "expert_cache_hits", "Expert lookups served from fast memory"),
                               ("misses", "expert_cache_misses", "Expert lookups that loaded from the slow tier"),
                               ("evictions", "expert_cache_evictions", "Experts evicted from fast memory"),
                               ("prefetch_issued", "expert_prefetch_issued", "Experts queued for background load"),
                               ("prefetch_used", "expert_prefetch_used", "Prefetched experts used before eviction"),
                               ("prefetch_wasted", "expert_prefetch_wasted", "Prefetched experts evicted unused"),
                               ("stall_s", "expert_stall_seconds", "Time the forward waited for expert loads")):
            if key in s:
                c = CounterMetricFamily(f"moespec:{name}", doc, labels=["model_name"])
                c.add_metric([self.model_name], float(s[key]))
                yield c
        if "bytes_read" in s:
            c = CounterMetricFamily("moespec:expert_bytes_loaded", "Expert bytes read from the slow tier",
                                    labels=["model_name", "tier"])
            c.add_metric([self.model_name, str(s.get("tier", "unknown"))], float(s["bytes_read"]))
            yield c
