"""The Phy folder (rezToPhy.m)."""

from __future__ import annotations

import numpy as np


def final_spikes(ir) -> np.ndarray:
    """The spike table after the last post-processing stage that ran ([n, >=4] float64)."""
    for name in ("st3_c", "st3_s", "st3_m", "st3"):
        if ir.has(name):
            return np.asarray(getattr(ir, name))
    raise FileNotFoundError("no spike table in the cache: the extraction stage has not run")


def write_phy(ctx):
    folder = ctx.output_folder
    st3 = final_spikes(ctx.intermediate)
    order = np.argsort(st3[:, 0], kind="stable")
    st3 = st3[order]
    np.save(folder / "spike_times.npy", st3[:, 0].astype(np.uint64))
    np.save(folder / "spike_templates.npy", st3[:, 1].astype(np.uint32))
    np.save(folder / "spike_clusters.npy", st3[:, 1].astype(np.uint32))
    np.save(folder / "amplitudes.npy", st3[:, 2].astype(np.float64))
    (folder / "params.py").write_text(
        f"dat_path = ''\nn_channels_dat = {ctx.probe.NchanTOT}\ndtype = 'int16'\noffset = 0\n"
        f"sample_rate = {ctx.params.fs!r}\nhp_filtered = False\n"
    )
