"""Model implementations, selected by config.json's model_type (see config.FAMILIES): decoder.py (the forward),
layers.py, moe.py, layout.py / packed.py (weight storage), load.py (checkpoint folder -> DecoderLM)."""
__all__ = ["DecoderLM", "ForwardOutput", "ForwardPlan", "load_model", "parse_dtype", "resolve_dtype",
           "checkpoint_dtype", "ModelConfig", "QuantConfig", "DTYPES", "DTYPE_CHOICES"]
_WHERE = {"DecoderLM": ".decoder", "ForwardOutput": ".decoder", "ForwardPlan": ".decoder", "load_model": ".load",
          "parse_dtype": ".load", "resolve_dtype": ".load", "checkpoint_dtype": ".load", "DTYPES": ".load",
          "DTYPE_CHOICES": ".load", "ModelConfig": "..config", "QuantConfig": "..quant.scheme"}


def __getattr__(name):
    # Imported on first use: loading/ builds on the model's submodules, and load.py on loading/, so this package's
    # own import must not pull load.py in.
    if name in _WHERE:
        import importlib
        return getattr(importlib.import_module(_WHERE[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
