"""Checkpoint folders into a runnable model: reading Hugging Face safetensors (checkpoint.py) into moespec's weight
layout (build.py), the expert provider over the slow tier (experts.py), and load_model (model.py)."""
from .build import load_weights
from .checkpoint import Checkpoint
from .experts import build_expert_provider
from .model import DTYPE_CHOICES, DTYPES, checkpoint_dtype, load_model, parse_dtype, resolve_dtype

__all__ = ["Checkpoint", "load_weights", "build_expert_provider", "load_model", "parse_dtype", "resolve_dtype",
           "checkpoint_dtype", "DTYPES", "DTYPE_CHOICES"]
