"""Shared fixtures: small generated ground-truth recordings (saved as binary, as run_sorter needs)."""

from __future__ import annotations

import pytest


def gpu_available() -> bool:
    from si_ks2py.backend import gpu_available as available

    return available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def generate_recording(duration=10.0, num_channels=32, num_units=10, seed=0, **kwargs):
    """A ground-truth recording at 30 kHz on a 2-column probe: (recording, sorting)."""
    import spikeinterface.core as sc

    return sc.generate_ground_truth_recording(
        durations=[duration], sampling_frequency=30000.0, num_channels=num_channels, num_units=num_units,
        seed=seed, **kwargs,
    )


@pytest.fixture(scope="session")
def small_recording(tmp_path_factory):
    """10 s, 32 channels, 10 units, saved to a binary folder (serialisable)."""
    recording, sorting = generate_recording()
    folder = tmp_path_factory.mktemp("small") / "recording"
    return recording.save(folder=folder, verbose=False), sorting
