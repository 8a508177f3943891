"""The sorting returned to SpikeInterface."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from spikeinterface.core import NumpySorting


def read_params_py(folder: Path) -> dict:
    values: dict = {}
    exec((Path(folder) / "params.py").read_text(), {}, values)
    return values


def read_sorting(folder) -> NumpySorting:
    """The units of a finished sort from its Phy folder (spike_times, spike_clusters, params.py)."""
    folder = Path(folder)
    fs = float(read_params_py(folder)["sample_rate"])
    times = np.load(folder / "spike_times.npy").astype(np.int64).ravel()
    clusters = np.load(folder / "spike_clusters.npy").astype(np.int64).ravel()
    unit_ids = np.unique(clusters)
    return NumpySorting.from_samples_and_labels([times], [clusters], fs, unit_ids=unit_ids)
