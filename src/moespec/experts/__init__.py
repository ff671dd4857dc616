"""Where experts live and how the MoE block reaches them (see docs/architecture.md)."""
from .pool import ExpertPool, ResidentExperts

__all__ = ["ExpertPool", "ResidentExperts"]
