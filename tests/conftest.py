import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)

import hf_models  # noqa: E402


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """One tiny random checkpoint per family (per-expert layout), with its transformers model."""
    out = {}
    for fam in hf_models.FAMILY_CONFIGS:
        d = tmp_path_factory.mktemp(fam)
        out[fam] = (d, hf_models.build(fam, d))
    return out


@pytest.fixture(scope="session")
def text_model(tmp_path_factory):
    """A tiny Qwen3-MoE with a real tokenizer (4 layers, MoE at 1 and 3, 8 experts, top-3, norm_topk_prob),
    shared read-only by the engine, speculation and budget tests."""
    d = tmp_path_factory.mktemp("text")
    hf_models.build_text_model(d)
    return d


@pytest.fixture(scope="module")
def llm(text_model):
    """The tiny text model loaded once per test module (tests that patch it restore it)."""
    from moespec import LLM
    return LLM(text_model)
