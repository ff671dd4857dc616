"""moespec: fast Mixture-of-Experts inference where experts do not fit in fast memory."""
from .engine import LLM, Output
from .errors import MoespecError
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "Output", "SamplingParams", "MoespecError"]
