"""The sorting returned to SpikeInterface: a NumpySorting read back from the Phy folder.

Unit ids are the Phy cluster ids (template ids after merges and splits); units without spikes are not listed.
Properties: ``KSLabel`` ("good" / "mua"), ``ContamPct``, ``Amplitude`` (from the cluster_*.tsv files) and
``original_cluster_id`` (the cluster id, as SpikeInterface's read_kilosort names it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
from spikeinterface.core import NumpySorting

PROPERTIES = {"KSLabel": str, "ContamPct": float, "Amplitude": float}


def read_params_py(folder: Path) -> dict:
    """The assignments of a Phy folder's params.py, read as literals (never run: the folder may be shared).
    ValueError naming the file and line of anything other than ``name = literal``."""
    path = Path(folder) / "params.py"
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as err:
        raise ValueError(f"{path} is not a Phy params.py (line {err.lineno}: {err.msg})") from None
    values: dict = {}
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) and len(node.targets) == 1 else None
        if not isinstance(target, ast.Name):
            raise ValueError(f"{path}, line {node.lineno}: only assignments 'name = literal' are read (the file is "
                             "parsed, never run); this line is something else")
        try:
            values[target.id] = ast.literal_eval(node.value)
        except ValueError:
            raise ValueError(f"{path}, line {node.lineno}: the value of '{target.id}' is not a literal (a number, "
                             "string, bool, None, list, tuple or dict); the file is parsed, never run") from None
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
