"""Every GPU op against its NumPy twin (marked gpu: run on the device machine).

Tolerances: float32 ops that sum the same terms in another order agree to rtol 1e-4 / atol 1e-4 of the data
scale; window min/sum ops are exact up to float32 summation order.
"""

import numpy as np
import pytest
from scipy import signal

from si_ks2py.cpu import ops as cpu

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from si_ks2py.gpu import ops

    return ops


def test_every_cpu_op_has_a_gpu_twin(gpu):
    names = {n for n in dir(cpu) if not n.startswith("_") and callable(getattr(cpu, n))}
    missing = [n for n in names if not hasattr(gpu, n)]
    assert not missing


@pytest.mark.parametrize("band", [None, 6000.0])
def test_filtfilt_zero_state(gpu, band):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(65856, 37)).cumsum(axis=0) * 0.1 + rng.normal(size=(65856, 37))).astype(np.float32)
    b, a = (signal.butter(3, 150 / 15000, "high") if band is None
            else signal.butter(3, [150 / 15000, band / 15000], "bandpass"))
    expected = cpu.filtfilt_zero_state(x, b, a)
    got = gpu.to_host(gpu.filtfilt_zero_state(gpu.asarray(x), b, a))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("axis, hw", [(0, 30), (0, 5), (1, 4), (1, 6)])
def test_running_windows(gpu, axis, hw):
    x = np.random.default_rng(1).normal(size=(4096, 48)).astype(np.float32)
    np.testing.assert_array_equal(gpu.to_host(gpu.running_min(gpu.asarray(x), hw, axis)), cpu.running_min(x, hw, axis))
    np.testing.assert_allclose(gpu.to_host(gpu.running_sum(gpu.asarray(x), hw, axis)), cpu.running_sum(x, hw, axis),
                               atol=1e-4)
