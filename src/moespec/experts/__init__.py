"""Where experts live and how the MoE block reaches them (see docs/architecture.md).

pool.py: slot pools and the all-resident provider; quant_pool.py: pools of quantized experts; pools.py: a pool
from its storage layout; store.py / packfile.py: the slow tier (RAM or a packed file read with O_DIRECT); cache.py:
slots in fast memory, slot table, locks, chunking, stats; policy.py: LRU / LFU / static hot set, routing profiles,
capacity parsing; prefetch.py: loader threads and the next-layer predictor. Building a provider from a checkpoint
is loading/experts.py's job: this package reads nothing above it.
"""
__all__ = ["ExpertPool", "ResidentExperts", "ExpertCache", "RamStore", "DiskStore", "parse_capacity", "load_profile",
           "save_profile", "profile_from_routing"]
_WHERE = {"ExpertPool": "pool", "ResidentExperts": "pool", "ExpertCache": "cache", "RamStore": "store",
          "DiskStore": "store", "parse_capacity": "policy", "load_profile": "policy",
          "save_profile": "policy", "profile_from_routing": "policy"}


def __getattr__(name):
    # Imported on first use: models import only the pools from here, and need not pay for the cache and the stores.
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
