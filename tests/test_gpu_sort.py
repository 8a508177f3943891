"""End-to-end sorts on the GPU (marked gpu): repeatable, and the same units as the CPU sort."""

import numpy as np
import pytest

import si_ks2py
from si_ks2py.demo import generate_demo_recording, score, summary

pytestmark = pytest.mark.gpu


def matched_fraction(a, b, tolerance=3):
    """Fraction of the spikes of sorting a that b has in the same unit within tolerance samples (0.1 ms)."""
    matched = total = 0
    for unit in a.unit_ids:
        x = a.get_unit_spike_train(unit)
        y = b.get_unit_spike_train(unit) if unit in b.unit_ids else np.zeros(0, dtype=np.int64)
        total += len(x)
        if len(y):
            i = np.clip(np.searchsorted(y, x), 1, max(1, len(y) - 1))
            near = np.minimum(np.abs(y[np.minimum(i, len(y) - 1)] - x), np.abs(y[i - 1] - x))
            matched += int((near <= tolerance).sum())
    return matched / max(total, 1)


def test_gpu_sort_repeats_and_agrees_with_cpu(tmp_path):
    recording, gt = generate_demo_recording(duration=30.0, num_units=10, seed=5)
    recording = recording.save(folder=tmp_path / "recording", verbose=False)
    gpu = [si_ks2py.run(recording, tmp_path / f"gpu{i}", device="cuda", progress=False, verbose=False)
           for i in range(2)]
    cpu = si_ks2py.run(recording, tmp_path / "cpu", device="cpu", progress=False, verbose=False)
    assert list(gpu[0].unit_ids) == list(gpu[1].unit_ids)
    assert matched_fraction(gpu[0], gpu[1]) >= 0.999 and matched_fraction(gpu[1], gpu[0]) >= 0.999
    assert list(gpu[0].unit_ids) == list(cpu.unit_ids)
    assert matched_fraction(gpu[0], cpu) >= 0.999 and matched_fraction(cpu, gpu[0]) >= 0.999
    assert summary(score(gt, gpu[0]))["accuracy_0.8"] == summary(score(gt, cpu))["accuracy_0.8"] >= 8
