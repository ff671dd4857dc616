"""`GET /v1/engine`: what the web page's engine view shows, read from what the server already keeps.

The decode loop is not asked for anything: the numbers come from one pass over the Prometheus registry, the expert
memory's counters and each MoE layer's resident experts (the cache reads its slot table under its lock, briefly).
tokens/s is the rate of text deltas (one per generated token of every running choice) since the previous call.
"""
from __future__ import annotations

import time


class EngineView:
    def __init__(self, svc):
        self.svc = svc
        self._last = (time.monotonic(), 0.0)

    def _tokens_per_s(self, s: dict) -> float | None:
        now, deltas = time.monotonic(), s.get("moespec:inter_token_latency_seconds_count", 0.0)
        (t0, d0), self._last = self._last, (now, deltas)
        return (deltas - d0) / (now - t0) if now > t0 else None

    def _samples(self) -> dict:
        """{name: value} of the server's own metrics, {(name, position): value} per draft position: one collection
        (get_sample_value collects the whole registry, the expert counters included, on every call)."""
        out = {}
        for metric in self.svc.metrics.registry.collect():
            if metric.name.startswith("moespec:expert"):
                continue
            for smp in metric.samples:
                key = (smp.name, smp.labels["position"]) if "position" in smp.labels else smp.name
                out[key] = smp.value
        return out

    def snapshot(self) -> dict:
        llm, cfg = self.svc.llm, self.svc.llm.model.cfg
        experts = llm.model.experts
        st = llm.expert_stats()
        s = self._samples()
        generated = s.get("moespec:generation_tokens_total", 0.0)
        hits, misses = st.get("hits"), st.get("misses")
        return {"model": self.svc.model_name, "running": int(s.get("moespec:num_requests_running", 0)),
                "waiting": int(s.get("moespec:num_requests_waiting", 0)), "tokens_per_s": self._tokens_per_s(s),
                "generated_tokens": int(generated),
                "experts": {"num_experts": cfg.num_experts, "tier": st.get("tier", "cache"),
                            "capacity": st.get("capacity"), "hit_rate": st.get("hit_rate"), "hits": hits,
                            "misses": misses, "bytes_read": st.get("bytes_read"),
                            "bytes_per_token": st["bytes_read"] / generated if st.get("bytes_read") and generated
                            else None,
                            **self._layers(experts, cfg.moe_layer_ids)},
                "speculation": self._speculation(s), "memory": self._memory(st), "memory_split": self._split(st)}

    def _layers(self, experts, layers: list[int]) -> dict:
        """Per MoE layer: the experts usable now (resident), those being loaded (a miss or a prefetch in flight), those
        the static policy pins, and the self drafter's expert set (what drafting computes with)."""
        out = {"resident": {}, "loading": {}, "pinned": {}, "draft": {}}
        sets = getattr(self.svc.llm.drafter, "sets", None) or {}
        for i in layers:
            res = experts.resident(i).tolist()
            out["resident"][str(i)] = res
            out["loading"][str(i)] = sorted(set(experts.cached(i).tolist()) - set(res))
            out["pinned"][str(i)] = experts.hot(i) if hasattr(experts, "hot") else []
            out["draft"][str(i)] = sets[i].tolist() if i in sets else []
        return out

    def _speculation(self, s: dict) -> dict:
        drafts = s.get("moespec:spec_decode_num_drafts_total", 0.0)
        accepted = s.get("moespec:spec_decode_num_accepted_tokens_total", 0.0)
        name = "moespec:spec_decode_num_accepted_tokens_per_pos_total"
        pos = sorted(int(k[1]) for k in s if isinstance(k, tuple) and k[0] == name)
        per_pos = [s[(name, str(p))] / drafts if drafts else 0.0 for p in pos]
        return {"drafts": int(drafts), "accepted": int(accepted),
                "mean_accepted_length": 1 + accepted / drafts if drafts else None, "per_position": per_pos}

    def _split(self, st: dict) -> dict:
        """Bytes by use: the weights kept resident (all but the routed experts), the experts in fast memory (cache
        slots, or every expert), the KV budget (--kv-memory or the --memory plan's; None: sized per request), and the
        --memory budget (None without one)."""
        from ..model_info import describe
        llm = self.svc.llm
        cfg, plan = llm.model.cfg, llm.memory_plan
        es = {"float32": 4, "bfloat16": 2, "float16": 2}.get(llm.dtype, 4)
        blob = st.get("expert_bytes") or llm.model.experts.expert_bytes()    # (the cache reports it in its stats)
        experts = (st.get("capacity") or cfg.num_experts) * blob * len(cfg.moe_layer_ids)
        return {"budget": plan.limit if plan is not None else None, "weights": describe(cfg, es)["bytes_dense"],
                "experts": experts, "kv": self.svc.worker.kv_budget}

    def _memory(self, st: dict) -> str:
        llm = self.svc.llm
        if llm.memory_plan is not None:
            return llm.memory_plan.summary()
        return (f"no --memory budget: weights {llm.dtype}, KV {llm.kv_bytes_per_token / 1e3:.1f} KB per token, "
                f"experts {st.get('tier', 'cache')}")
