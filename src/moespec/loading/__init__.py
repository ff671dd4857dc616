"""Reading Hugging Face checkpoint folders straight into moespec's weight layout."""
from .checkpoint import Checkpoint
from .build import load_weights

__all__ = ["Checkpoint", "load_weights"]
