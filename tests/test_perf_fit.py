"""fit_step / fit_link recover known synthetic rates from noisy samples."""
import numpy as np
import pytest

from moespec.perf.errors import PerfError
from moespec.perf.fit import fit_link, fit_step
from moespec.perf.hardware import PROFILES


def _samples(bw, peak, ov, n=60, noise=0.02, seed=0, intensity=(0.1, 1e4)):
    rng = np.random.default_rng(seed)
    b = 10 ** rng.uniform(5, 9, n)                                  # 100 KB .. 1 GB
    f = b * 10 ** rng.uniform(np.log10(intensity[0]), np.log10(intensity[1]), n)
    t = (np.maximum(b / bw, f / peak) + ov) * (1 + noise * rng.standard_normal(n))
    return b, f, t


@pytest.mark.parametrize("bw,peak,ov", [(20e9, 100e9, 2e-4), (800e9, 120e12, 5e-5), (3e9, 12e9, 1e-3)])
def test_fit_recovers_synthetic_parameters(bw, peak, ov):
    b, f, t = _samples(bw, peak, ov)
    fit = fit_step(b, f, t)
    assert fit.bw == pytest.approx(bw, rel=0.03)
    assert fit.peak == pytest.approx(peak, rel=0.03)
    assert fit.overhead == pytest.approx(ov, rel=0.15, abs=2e-5)
    assert fit.rel_rmse < 0.03
    assert any(fit.compute_bound) and not all(fit.compute_bound)
    assert np.allclose(fit.predict(b, f), t, rtol=0.1)


def test_fit_of_whole_forwards_and_memory_only_data():
    b, f, t = _samples(15e9, 95e9, 2e-4, seed=1)
    fit = fit_step(b * 8, f * 8, t * 8, calls=np.full(len(b), 8))   # forwards of 8 identical layers
    assert fit.bw == pytest.approx(15e9, rel=0.03) and fit.peak == pytest.approx(95e9, rel=0.03)
    b, f, t = _samples(15e9, 95e9, 2e-4, seed=2, intensity=(0.01, 1.0))  # never compute-bound
    fit = fit_step(b, f, t)
    assert fit.bw == pytest.approx(15e9, rel=0.03) and fit.peak == float("inf")
    hw = fit.apply(PROFILES["this-machine"], dtype_bytes=4.0, name="fitted")
    assert hw.mem_bw == pytest.approx(fit.bw) and hw.peak_flops(4.0) == pytest.approx(95e9)   # peak kept
    with pytest.raises(PerfError, match="at least 3 samples"):
        fit_step([1, 2], [1, 2], [1, 2])


def test_fit_link():
    rng = np.random.default_rng(0)
    size = 10 ** rng.uniform(5, 9, 30)
    t = (size / 3e9 + 1e-4) * (1 + 0.01 * rng.standard_normal(30))
    bw, lat = fit_link(size, t)
    assert bw == pytest.approx(3e9, rel=0.02) and lat == pytest.approx(1e-4, rel=0.2)
    with pytest.raises(PerfError, match="different sizes"):
        fit_link([1e6, 1e6], [1.0, 1.0])
