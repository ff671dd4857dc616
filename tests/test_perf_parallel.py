"""The performance model of expert parallelism (perf/parallel.py) and `moespec plan --nodes --network`."""
import json
import subprocess
import sys

import pytest

from moespec.perf.errors import PerfError
from moespec.perf.hardware import get_profile
from moespec.perf.model import known_model
from moespec.perf.parallel import Network, dispatch_time, ep_forward, plan_nodes
from moespec.perf.step import forward_cost


def test_network_parses_rates_and_latencies():
    for text, rate, lat in (("10Gbit,50us", 1.25e9, 50e-6), ("25GB/s, 2us", 25e9, 2e-6), ("1.25e9,1e-4", 1.25e9, 1e-4)):
        n = Network.parse(text)
        assert n.rate == pytest.approx(rate) and n.latency == pytest.approx(lat)
    for bad in ("fast", "10Gbit", "10furlongs,1us", "0Gbit,1us"):
        with pytest.raises(PerfError, match="--network"):
            Network.parse(bad)


def test_dispatch_worked_example():
    """Mixtral-8x7B bf16, one token over 10 Gbit/s and 50 us: 3 collectives of one hop and 24,584 bytes a layer."""
    m = known_model("mixtral-8x7b")
    s, b = dispatch_time(m, 1, 2, Network.parse("10Gbit,50us"))
    assert b == (4096 + 2 * 2 + 2 * 4096) * 2
    assert s == pytest.approx(3 * 50e-6 + b / 1.25e9)
    assert m.moe_layers * s == pytest.approx(5.43e-3, rel=0.01)
    assert dispatch_time(m, 1, 1, Network.parse("10Gbit,50us")) == (0.0, 0.0)
    assert dispatch_time(m, 1, 4, Network.parse("10Gbit,50us"))[0] > 2 * 3 * 50e-6      # two hops to reach 3 ranks


def test_one_node_is_the_single_machine_model_and_more_split_the_experts():
    m, hw = known_model("mixtral-8x7b"), get_profile("h100-sxm-pcie5")
    one = ep_forward(m, hw, 1, Network.parse("100Gbit,5us"), 1, 1, 1024)
    assert one["time"] == forward_cost(m, hw, 1, 1, 1024).time and one["dispatch_s"] == 0
    two = ep_forward(m, hw, 2, Network.parse("100Gbit,5us"), 1, 1, 1024)
    assert two["time"] - two["dispatch_s"] < one["time"]              # each rank reads half the experts
    assert 0 < two["dispatch_share"] < 1


def test_plan_picks_the_node_count():
    """Mixtral-8x7B does not fit one 80 GB H100 with its experts; two do, and over a slow link more nodes only add
    exchange time."""
    m, hw = known_model("mixtral-8x7b"), get_profile("h100-sxm-pcie5")
    slow = plan_nodes(m, hw, 4, Network.parse("10Gbit,50us"), 1, 1024, hw.fast_mem_bytes)
    assert slow["best_nodes"] == 2 and slow["rows"][0]["cached_per_rank"] < m.experts
    fast = plan_nodes(m, hw, 4, Network.parse("100Gbit,5us"), 1, 1024, hw.fast_mem_bytes)
    assert fast["rows"][3]["dispatch_share"] < slow["rows"][3]["dispatch_share"]
    r = subprocess.run([sys.executable, "-m", "moespec.cli", "plan", "mixtral-8x7b", "--hardware", "h100-sxm-pcie5",
                        "--nodes", "4", "--network", "10Gbit,50us", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["expert_parallel"]["best_nodes"] == 2
