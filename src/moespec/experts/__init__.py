"""Where experts live and how the MoE block reaches them (see docs/architecture.md).

pool.py: slot pools and the all-resident provider; store.py / packfile.py: the slow tier (RAM or a
packed file read with O_DIRECT); cache.py: slots in fast memory, slot table, locks, chunking, stats;
policy.py: LRU / LFU / static hot set, routing profiles, capacity parsing; prefetch.py: loader
threads and the next-layer predictor; build.py: OffloadConfig -> provider.
"""
from .build import build_expert_provider
from .cache import ExpertCache
from .policy import load_profile, parse_capacity, profile_from_routing, save_profile
from .pool import ExpertPool, ResidentExperts
from .store import DiskStore, RamStore

__all__ = ["ExpertPool", "ResidentExperts", "ExpertCache", "RamStore", "DiskStore", "build_expert_provider",
           "parse_capacity", "load_profile", "save_profile", "profile_from_routing"]
