"""The Phy folder (rezToPhy.m): what Kilosort 2.0 writes, loadable by phylib's TemplateModel and SpikeInterface's
read_kilosort.

Spikes are sorted by time. Cluster ids are template ids (after merges and splits); the cluster_*.tsv files list
the clusters that have spikes. ``params.py`` points at the recording's own binary file when it is one (raw
channels, ``channel_map`` = recording channel indices), and otherwise at the whitened file of the sort
(``temp_wh.dat`` in the cache folder, kept channels only, ``hp_filtered = True``). Spike times are samples of the
recording (Kilosort's convention); the whitened file starts at trange's start, so with a trange start and a
non-binary recording Phy's trace view is offset by it.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..io import binary_source, whole_rows
from ..plots import spike_depths
from . import tmp_files_to_delete

logger = logging.getLogger("si_ks2py")

PHY_FILES = ("spike_times.npy", "spike_templates.npy", "spike_clusters.npy", "amplitudes.npy", "templates.npy",
             "templates_ind.npy", "channel_map.npy", "channel_positions.npy", "channel_shanks.npy",
             "similar_templates.npy", "pc_features.npy", "pc_feature_ind.npy", "template_features.npy",
             "template_feature_ind.npy", "whitening_mat.npy", "whitening_mat_inv.npy", "params.py",
             "cluster_KSLabel.tsv", "cluster_ContamPct.tsv", "cluster_Amplitude.tsv")


def cluster_amplitudes(templates, whitening_inv, template_of_spike, amplitudes, n_templates, gain):
    """tempAmps of rezToPhy.m: mean over a cluster's spikes of (peak-to-peak of its unwhitened template x the
    spike's amplitude), times gain; 0 for clusters without spikes."""
    K, nt, n_chan = templates.shape
    # one float64 product of the stacked rows (a float32 stack times a float64 matrix takes NumPy's slow loop)
    unwhitened = (templates.reshape(-1, n_chan).astype(np.float64) @ whitening_inv).reshape(K, nt, n_chan)
    peak_to_peak = (unwhitened.max(axis=1) - unwhitened.min(axis=1)).max(axis=1)
    spike_amplitude = peak_to_peak[template_of_spike] * amplitudes
    total = np.bincount(template_of_spike, weights=spike_amplitude, minlength=n_templates)
    count = np.bincount(template_of_spike, minlength=n_templates)
    return gain * np.divide(total, count, out=np.zeros(n_templates), where=count > 0)


def write_tsv(path: Path, column: str, ids, values, fmt: str):
    lines = [f"cluster_id\t{column}"] + [f"{i}\t{format(v, fmt)}" for i, v in zip(ids, values)]
    path.write_text("\n".join(lines) + "\n")


def save_rows(path, source, rows: np.ndarray, chunk: int = 2 ** 16):
    """np.save of ``source[rows]`` as float32, ``chunk`` rows at a time (the features of a long recording need
    not fit in memory; the cache holds them memory-mapped). rows: [n] int64."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(rows),) + source.shape[1:])
    for a in range(0, len(rows), chunk):
        out[a:a + chunk] = source[rows[a:a + chunk]]


STAGING = ".phy-export.part"  # the folder (in the output folder) the new files are written to first


def write_phy(ctx, figures=None):
    """Write the Phy folder into ctx.output_folder, replacing the files of an earlier export only once every new
    file is complete: they are written into a folder beside them (STAGING) and then renamed into place, so an
    error on the way (an unreadable cache file, a full disk) leaves the earlier files as they were. ``figures``
    (a plots.FigureProcess) is asked for the templates figure and the drift map first, from the arrays of the
    files."""
    folder = Path(ctx.output_folder)
    staging = folder / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed export (the sort holds the folder's lock)
    staging.mkdir()
    try:
        write_phy_files(ctx, staging, figures)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in PHY_FILES:  # our names only: never the user's recording
        os.replace(staging / name, folder / name)
    staging.rmdir()


def write_phy_files(ctx, folder: Path, figures=None):
    """Every file of PHY_FILES into ``folder``."""
    ir, p = ctx.intermediate, ctx.params
    st3 = np.asarray(ir.st3_c)
    keep = np.asarray(ir.keep_c)
    order = np.argsort(st3[:, 0], kind="stable")
    st3, rows = st3[order], keep[order]
    clusters = st3[:, 1].astype(np.int64)
    W, U = np.asarray(ir.W_s), np.asarray(ir.U_s)
    n_templates, nt0, n_rank = W.shape
    Wphy = np.concatenate([np.zeros((n_templates, p.nt0min + 1, n_rank)), W], axis=1)  # centre at nt0min
    # W_k U_k' as one batched matrix product: tm.dense_templates (an einsum, whose summation order the pursuit's
    # NumPy twin shares) took 0.25 to 0.5 s for 250 templates of 384 channels, 20 times as long
    templates = np.matmul(Wphy, np.swapaxes(U, 1, 2)).astype(np.float32)
    whitening = np.asarray(ir.Wrot, dtype=np.float64) / p.scaleproc
    whitening_inv = np.linalg.inv(whitening)
    n_learnt = len(np.asarray(ir.iNeigh))
    parent = np.asarray(ir.parent_s)
    # template features were computed against the extraction's neighbour lists: a split template uses its parent's
    template_feature_ind = np.asarray(ir.iNeigh)[np.where(np.arange(n_templates) < n_learnt,
                                                          np.arange(n_templates), parent)]

    if figures is not None:  # drawn from these arrays while the files are written
        figures.draw("templates", templates=templates, whitening_inv=whitening_inv,
                     counts=np.bincount(clusters, minlength=n_templates), good=np.asarray(ir.good),
                     xc=np.asarray(ir.xc), yc=np.asarray(ir.yc))
        depths = spike_depths(ir.cProjPC, rows, np.asarray(ir.iNeighPC_s, dtype=np.int64), clusters,
                              np.asarray(ir.yc, dtype=np.float64))
        figures.draw("drift_map", times_s=st3[:, 0] / p.fs, depths=depths, amplitudes=st3[:, 2])
    # the two feature files (most of the folder's bytes) are gathered and written by threads meanwhile
    with ThreadPoolExecutor(max_workers=2) as writers:
        features = [writers.submit(save_rows, folder / name, source, rows)
                    for name, source in (("pc_features.npy", ir.cProjPC), ("template_features.npy", ir.cProj))]
        write_small_files(ctx, folder, st3, clusters, templates, whitening, whitening_inv, template_feature_ind)
        for written in features:
            written.result()


def write_small_files(ctx, folder: Path, st3, clusters, templates, whitening, whitening_inv, template_feature_ind):
    """Every file of the Phy folder but the features: spikes [n] (st3 [n, 5] by time, clusters [n]), templates
    [K, nt, Nchan] float32, whitening matrices [Nchan, Nchan], params.py and the cluster tables."""
    ir, p = ctx.intermediate, ctx.params
    n_templates, _, n_chan = templates.shape
    np.save(folder / "spike_times.npy", st3[:, 0].astype(np.uint64))
    np.save(folder / "spike_templates.npy", clusters.astype(np.uint32))
    np.save(folder / "spike_clusters.npy", clusters.astype(np.uint32))
    np.save(folder / "amplitudes.npy", st3[:, 2].astype(np.float64))
    np.save(folder / "templates.npy", templates)
    np.save(folder / "templates_ind.npy", np.tile(np.arange(n_chan, dtype=np.float64), (n_templates, 1)))
    np.save(folder / "channel_positions.npy", np.column_stack([ir.xc, ir.yc]).astype(np.float64))
    np.save(folder / "channel_shanks.npy", np.asarray(ir.kcoords, dtype=np.int32))
    np.save(folder / "similar_templates.npy", np.asarray(ir.simScore_s, dtype=np.float32))
    np.save(folder / "template_feature_ind.npy", template_feature_ind.astype(np.uint32))
    np.save(folder / "pc_feature_ind.npy", np.asarray(ir.iNeighPC_s, dtype=np.uint32))
    np.save(folder / "whitening_mat.npy", whitening)
    np.save(folder / "whitening_mat_inv.npy", whitening_inv)

    # Phy reads the recording's own file where there is one (a channel slice of it: the file's rows, its channel
    # indices), else the whitened file; with drift correction always the whitened file: the templates fit the
    # corrected data
    recording, file_channels = whole_rows(ctx.raw_data)
    source = None if p.get("do_correction") else binary_source(recording)
    if source is not None:
        dat_path, dtype, offset = source
        np.save(folder / "channel_map.npy", file_channels[np.asarray(ir.chanMap)].astype(np.int32))
        n_channels_dat, hp_filtered = recording.get_num_channels(), False
    else:
        dat_path, dtype, offset = ir.file_path("temp_wh.dat").absolute(), "int16", 0
        np.save(folder / "channel_map.npy", np.arange(n_chan, dtype=np.int32))
        n_channels_dat, hp_filtered = n_chan, True
    note = ""
    if source is None and "temp_wh.dat" in tmp_files_to_delete(ctx.user_params["delete_tmp_files"]):
        # the whitened file is deleted after the export: phylib reads a blank dat_path as "no raw data file"
        dat_path, note = "", "# no data file: the whitened file was deleted (delete_tmp_files)\n"
    (folder / "params.py").write_text(
        f"{note}dat_path = {os.fspath(dat_path)!r}\nn_channels_dat = {n_channels_dat}\ndtype = {dtype!r}\n"
        f"offset = {offset}\nsample_rate = {float(p.fs)!r}\nhp_filtered = {hp_filtered}\n"
    )

    ids = np.unique(clusters)
    good = np.asarray(ir.good)
    amplitude = cluster_amplitudes(templates, whitening_inv, clusters, st3[:, 2], n_templates, p.gain)
    write_tsv(folder / "cluster_KSLabel.tsv", "KSLabel", ids, np.where(good[ids], "good", "mua"), "s")
    write_tsv(folder / "cluster_ContamPct.tsv", "ContamPct", ids, 100 * np.asarray(ir.est_contam_rate)[ids], ".1f")
    write_tsv(folder / "cluster_Amplitude.tsv", "Amplitude", ids, amplitude[ids], ".1f")
    logger.info("phy folder: %d spikes, %d clusters (%d good) in %s", len(st3), len(ids), good[ids].sum(),
                ctx.output_folder)
