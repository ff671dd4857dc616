"""The expected expert union (uniform and measured-profile formulas) against Monte-Carlo routing; perf has no torch."""
import ast
from pathlib import Path

import numpy as np
import pytest

from moespec.perf.union import (expected_misses, expected_union, expected_union_profile, profile_coverage,
                                sample_inclusion, sample_union)


@pytest.mark.parametrize("E,K,t,trials", [(8, 2, 1, 500), (8, 2, 4, 4000), (8, 2, 16, 2000), (16, 2, 5, 3000),
                                          (32, 4, 8, 2000), (64, 6, 3, 2000), (128, 8, 4, 1000),
                                          (128, 8, 16, 600)])
def test_uniform_union_matches_monte_carlo(E, K, t, trials):
    mc = sample_union(E, K, t, trials=trials, rng=0)
    assert expected_union(E, K, t) == pytest.approx(mc, rel=0.01)


def test_union_worked_examples_from_methods():
    assert expected_union(8, 2, 1) == pytest.approx(2.0)
    assert expected_union(8, 2, 4) == pytest.approx(5.47, abs=0.01)
    assert expected_union(128, 8, 4) == pytest.approx(29.1, abs=0.1)
    assert expected_union(128, 8, 1000) == pytest.approx(128.0)


@pytest.mark.parametrize("t", [2, 8])
def test_profile_union_matches_monte_carlo_of_skewed_router(t):
    E, K = 16, 2
    w = 1.0 / np.arange(1, E + 1) ** 1.2                    # Zipf-like: a few hot experts
    p = sample_inclusion(E, K, w, tokens=60000, rng=1)
    assert p.sum() == pytest.approx(K)
    mc = sample_union(E, K, t, trials=4000, rng=2, weights=w)
    assert expected_union_profile(p, t) == pytest.approx(mc, rel=0.01)
    assert expected_union_profile(p, t) < expected_union(E, K, t)   # skew shrinks the union


def test_misses_uniform_and_profile_match_monte_carlo():
    E, K, t, C = 16, 2, 6, 5
    rng = np.random.default_rng(3)
    w = 1.0 / np.arange(1, E + 1)
    p = sample_inclusion(E, K, w, tokens=60000, rng=4)
    cached = np.argsort(-p)[:C]                              # the C hottest experts stay in the cache
    for weights, prof in ((None, None), (w, p)):
        logw = np.zeros(E) if weights is None else np.log(weights)
        keys = logw + rng.gumbel(size=(4000, t, E))
        top = np.argpartition(-keys, K - 1, axis=-1)[..., :K]
        hit = np.zeros((4000, E), bool)
        np.put_along_axis(hit, top.reshape(4000, -1), True, axis=1)
        if prof is None:
            mc = hit.sum(1).mean() * (1 - C / E)             # uniform: any fixed cache of C
        else:
            hit[:, cached] = False
            mc = hit.sum(1).mean()
        assert expected_misses(E, K, t, C, prof) == pytest.approx(mc, rel=0.015)
    assert expected_misses(E, K, t, E) == 0.0
    assert profile_coverage(E, K, E / 2) == 0.5
    assert profile_coverage(E, K, 4, p) > 4 / E


def test_perf_package_never_imports_torch():
    root = Path(__file__).parents[1] / "src" / "moespec" / "perf"
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for n in names:
                assert not n.split(".")[0] in ("torch", "transformers"), f"{f.name} imports {n}"
                if isinstance(node, ast.ImportFrom) and node.level >= 2:
                    assert n in ("errors", "assets"), f"{f.name} imports moespec.{n}: perf must stay standalone"
