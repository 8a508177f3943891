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


@pytest.fixture(scope="session")
def demo_sort(tmp_path_factory):
    """The demo recording (60 s, 32 channels, 12 units), saved, and its sort through run_sorter on the CPU:
    a dict with recording, gt (ground-truth sorting), sorting, folder (run_sorter's folder)."""
    from spikeinterface.sorters import run_sorter

    import si_ks2py  # noqa: F401
    from si_ks2py.demo import generate_demo_recording

    recording, gt = generate_demo_recording(duration=60.0, num_channels=32, num_units=12, seed=7)
    base = tmp_path_factory.mktemp("demo")
    recording = recording.save(folder=base / "recording", verbose=False)
    sorting = run_sorter("ks2py", recording, folder=base / "sort", device="cpu", verbose=False)
    return {"recording": recording, "gt": gt, "sorting": sorting, "folder": base / "sort", "base": base}
