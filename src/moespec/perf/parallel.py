"""Expert parallelism in the performance model: `moespec plan MODEL --nodes N --network RATE,LATENCY`.

N machines of the same profile share each MoE layer's experts evenly (parallel/ in the engine: rank 0 runs attention,
dense layers and the head; every rank computes the tokens routed to the experts it holds). One forward then costs
what one machine's forward costs with E/N experts of which K/N are routed per token (each rank reads and multiplies
its share, all at once; rank 0's dense work is unchanged), each rank's expert cache holding the experts its memory
fits, plus per MoE layer the exchange:

    dispatch = ROUNDS x ceil(log2 N) x latency + bytes / rate
    bytes    = (N - 1) x (T x D + 2 x T x K) x b + (N - 1) x T x K x D x b     (T tokens, b bytes per value)

(rank 0 broadcasts a header and then the hidden states, the routed ids and weights in one buffer, then gathers each
rank's [T, K, D] outputs; ROUNDS collectives per layer, a tree of log2 N hops each). Worked example: Mixtral-8x7B bf16,
batch 1 decode over 10 Gbit/s with 50 us latency, N = 2: 32 layers x (3 x 50 us + (4096 + 2 x 2 + 2 x 4096) x 2 B /
1.25 GB/s) = 5.4 ms a token, latency-bound (the bytes take 20 us of each layer's 170 us).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from .errors import PerfError
from .hardware import Hardware
from .model import ModelDesc
from .step import Offload, forward_cost

ROUNDS = 3                       # a header, then the hidden states, ids and weights in one buffer; outputs gathered


@dataclass(frozen=True)
class Network:
    """A link between ranks: `rate` bytes/s each way, `latency` seconds per message."""
    rate: float
    latency: float

    @staticmethod
    def parse(text: str) -> "Network":
        """"10Gbit,50us", "100Gbit,5us", "25GB/s,2us", "1.25e9,1e-4" (bytes/s and seconds)."""
        m = re.match(r"^\s*([0-9.e+-]+)\s*([a-z/]*)\s*,\s*([0-9.e+-]+)\s*([a-z]*)\s*$", str(text), re.IGNORECASE)
        rates = {"": 1, "b/s": 1, "gbit": 1e9 / 8, "gbit/s": 1e9 / 8, "gbps": 1e9 / 8, "mbit": 1e6 / 8,
                 "gb/s": 1e9, "mb/s": 1e6}
        times = {"": 1, "s": 1, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
        if not m or m.group(2).lower() not in rates or m.group(4).lower() not in times:
            raise PerfError(f"--network {text!r}: expected RATE,LATENCY such as 10Gbit,50us or 25GB/s,2us")
        try:
            rate, lat = float(m.group(1)) * rates[m.group(2).lower()], float(m.group(3)) * times[m.group(4).lower()]
        except ValueError:
            raise PerfError(f"--network {text!r}: expected RATE,LATENCY such as 10Gbit,50us") from None
        if rate <= 0 or lat < 0:
            raise PerfError(f"--network {text!r}: the rate must be positive and the latency not negative")
        return Network(rate, lat)


def dispatch_time(model: ModelDesc, tokens: int, nodes: int, net: Network) -> tuple[float, float]:
    """(seconds, bytes) of one MoE layer's exchange for `tokens` tokens among `nodes` ranks (module docstring)."""
    if nodes <= 1 or not model.moe_layers:
        return 0.0, 0.0
    b, D, K = model.dtype_bytes, model.hidden, model.top_k
    sent = (nodes - 1) * (tokens * D + 2 * tokens * K) * b
    gathered = (nodes - 1) * tokens * K * D * b
    hops = math.ceil(math.log2(nodes))
    return ROUNDS * hops * net.latency + (sent + gathered) / net.rate, sent + gathered


def ep_forward(model: ModelDesc, hw: Hardware, nodes: int, net: Network, batch: int, t: int, context: int,
               cached_per_rank: float | None = None) -> dict:
    """One forward with the experts shared among `nodes` machines: its time, the exchange's part of it and bytes.
    cached_per_rank: experts per MoE layer each rank keeps in fast memory (None: all of its share)."""
    if nodes < 1:
        raise PerfError(f"--nodes {nodes} must be at least 1")
    share = replace(model, experts=model.experts / nodes, top_k=model.top_k / nodes) if nodes > 1 else model
    offload = None
    if cached_per_rank is not None and cached_per_rank < share.experts:
        offload = Offload(cached_experts=cached_per_rank)
    cost = forward_cost(share, hw, batch, t, context, offload=offload)
    per_layer, nbytes = dispatch_time(model, batch * t, nodes, net)
    dispatch = model.moe_layers * per_layer
    return {"nodes": nodes, "time": cost.time + dispatch, "dispatch_s": dispatch,
            "dispatch_share": dispatch / (cost.time + dispatch), "dispatch_bytes": model.moe_layers * nbytes,
            "slow_s": cost.slow_time}


def plan_nodes(model: ModelDesc, hw: Hardware, max_nodes: int, net: Network, batch: int, context: int,
               memory: float | None) -> dict:
    """Decode tokens/s for 1..max_nodes machines of `hw` with `memory` bytes each: rank 0 keeps the dense weights,
    every rank caches what its memory leaves of its share of the experts; the fastest count is the pick."""
    rows = []
    for n in range(1, max_nodes + 1):
        cached = None
        if memory is not None and model.moe_layers:
            room = memory - model.nonexpert_bytes - model.kv_bytes(context, batch)      # rank 0's, the fullest
            cached = max(0.0, room / (model.expert_bytes * model.moe_layers))
        r = ep_forward(model, hw, n, net, batch, 1, context, cached)
        rows.append({**r, "tokens_per_s": batch / r["time"], "cached_per_rank": cached})
    best = max(rows, key=lambda r: r["tokens_per_s"])
    return {"network": {"rate_bytes_s": net.rate, "latency_s": net.latency}, "rows": rows, "best_nodes": best["nodes"]}
