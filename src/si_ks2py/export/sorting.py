"""The sorting returned to SpikeInterface: a NumpySorting read back from the Phy folder.

Unit ids are the Phy cluster ids (template ids after merges and splits); units without spikes are not listed.
Properties: ``KSLabel`` ("good" / "mua"), ``ContamPct``, ``Amplitude`` (from the cluster_*.tsv files) and
``original_cluster_id`` (the cluster id, as SpikeInterface's read_kilosort names it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from spikeinterface.core import NumpySorting

PROPERTIES = {"KSLabel": str, "ContamPct": float, "Amplitude": float}


def read_params_py(folder: Path) -> dict:
    values: dict = {}
    exec((Path(folder) / "params.py").read_text(), {}, values)
    return values


def read_tsv(path: Path) -> dict:
    lines = path.read_text().strip().splitlines()[1:]
    return {int(row.split("\t")[0]): row.split("\t")[1] for row in lines}


def read_sorting(folder, keep_good_only: bool = False) -> NumpySorting:
    folder = Path(folder)
    fs = float(read_params_py(folder)["sample_rate"])
    times = np.load(folder / "spike_times.npy").astype(np.int64).ravel()
    clusters = np.load(folder / "spike_clusters.npy").astype(np.int64).ravel()
    unit_ids = np.unique(clusters)
    properties = {}
    for name, kind in PROPERTIES.items():
        table = read_tsv(folder / f"cluster_{name}.tsv")
        properties[name] = np.array([kind(table[u]) for u in unit_ids])
    if keep_good_only:
        unit_ids = unit_ids[properties["KSLabel"] == "good"]
        properties = {k: v[properties["KSLabel"] == "good"] for k, v in properties.items()}
        keep = np.isin(clusters, unit_ids)
        times, clusters = times[keep], clusters[keep]
    sorting = NumpySorting.from_samples_and_labels([times], [clusters], fs, unit_ids=unit_ids)
    for name, values in properties.items():
        sorting.set_property(name, values)
    sorting.set_property("original_cluster_id", unit_ids)
    return sorting
