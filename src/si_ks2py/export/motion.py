"""The drift estimate as SpikeInterface Motion folders (spikeinterface.core.Motion.load reads them)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np


def motion_of_shank(dshift: np.ndarray, yblk: np.ndarray, times_s: np.ndarray):
    """A Motion from one shank's shifts: dshift [Nbatch, nblk] um (Kilosort's sign: the data at y moves to
    y + dshift), yblk [nblk] um, times_s [Nbatch] the batches' middles. SpikeInterface's displacement is the
    opposite: a spike recorded at y was at y - displacement."""
    from spikeinterface.core.motion import Motion

    order = np.argsort(yblk, kind="stable")
    return Motion(displacement=[-np.asarray(dshift, dtype=np.float64)[:, order]],
                  temporal_bins_s=[np.asarray(times_s, dtype=np.float64)],
                  spatial_bins_um=np.asarray(yblk, dtype=np.float64)[order], direction="y")


def save_motion(folder: Path, dshift: np.ndarray, yblk: np.ndarray, times_s: np.ndarray):
    """dshift [Nbatch, n_shanks, nblk], yblk [n_shanks, nblk]: one Motion in ``folder``, or one per shank in
    ``folder``/shank<k> for several shanks (a Motion has one depth axis)."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    if len(yblk) == 1:
        motion_of_shank(dshift[:, 0], yblk[0], times_s).save(folder)
        return
    folder.mkdir(parents=True)
    for index in range(len(yblk)):
        motion_of_shank(dshift[:, index], yblk[index], times_s).save(folder / f"shank{index}")
