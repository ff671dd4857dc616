"""The forward in moespec's own code, selected by config.json's model_type (see families.py): decoder.py (the
decoder stack), layers.py, moe.py (routing and the expert block), budget.py (the verification expert budget, applied
to routing), layout.py / packed.py (weight storage). Models import nothing above them: checkpoints are read by
loading/, experts come from experts/ pools, and speculation passes what it needs as data (ForwardPlan)."""
from .decoder import DecoderLM, ForwardOutput, ForwardPlan

__all__ = ["DecoderLM", "ForwardOutput", "ForwardPlan"]
