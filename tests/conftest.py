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
