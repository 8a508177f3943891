"""Outputs of a sort: the Phy folder, QC figures, rez.mat on request, and the SpikeInterface sorting."""

from __future__ import annotations

import contextlib
import logging
import time

import numpy as np

from ..plots import FigureProcess

logger = logging.getLogger("si_ks2py")


def tmp_files_to_delete(option) -> tuple[str, ...]:
    if option is True:
        return ("temp_wh.dat",)
    if option is False:
        return ()
    return tuple(name for name in option if name == "temp_wh.dat")  # ks2py writes no MATLAB files


def queue_batch_figure(figures: FigureProcess, ir):
    """Queue the batch-similarity figure, which needs only the reorder stage's ``ccb`` and ``iorig``."""
    figures.draw("batch_similarity", ccb=np.asarray(ir.ccb), iorig=np.asarray(ir.iorig))


def drift_outputs(ctx, figures: FigureProcess | None):
    """Where the drift stage ran: the motion as SpikeInterface Motion folders (motion/, or motion/shank<k>/ per
    shank of a multi-shank probe) and the drift-correction figure."""
    from ..stages.drift import batch_of, batch_times_s, interpolate_shifts
    from .motion import save_motion

    ir, p = ctx.intermediate, ctx.params
    times = batch_times_s(ctx.raw_data, p)
    dshift, yblk, st0 = np.asarray(ir.dshift), np.asarray(ir.yblk), np.asarray(ir.st0)
    save_motion(ctx.output_folder / "motion", dshift, yblk, times)
    if figures is None:
        return
    stride = p.NT - p.ntbuff
    batch = batch_of(st0[:, 0], stride, p.Nbatch)
    shank = st0[:, 3].astype(np.int64)
    corrected = st0[:, 1].copy()
    for index in range(len(yblk)):  # first order: a spike recorded at y is at y + dshift(y) after correction
        for b in range(p.Nbatch):
            mine = np.flatnonzero((shank == index) & (batch == b))
            corrected[mine] += interpolate_shifts(yblk[index], dshift[b, index], st0[mine, 1])
    figures.draw("drift_correction", times_s=st0[:, 0] / p.fs, depths=st0[:, 1], corrected=corrected,
                 amplitudes=st0[:, 2], shanks=shank, batch_times_s=(stride * np.arange(p.Nbatch) + stride / 2) / p.fs,
                 dshift=dshift, yblk=yblk, threshold=np.float64(p.drift_spkTh))


def save_rez(ctx):
    """rez.mat: the main results under Kilosort's names (0-based indices, spikes after cutoff)."""
    from scipy.io import savemat

    ir = ctx.intermediate
    savemat(ctx.output_folder / "rez.mat", {"rez": {
        "st3": ir.st3_c, "W": ir.W_s, "U": ir.U_s, "mu": ir.mu_s, "simScore": ir.simScore_s, "Wrot": ir.Wrot,
        "good": ir.good, "est_contam_rate": ir.est_contam_rate, "iorig": ir.iorig, "ccb": ir.ccb,
        "xc": ir.xc, "yc": ir.yc, "chanMap": ir.chanMap, "wPCA": ir.wPCA, "wTEMP": ir.wTEMP,
    }}, do_compression=True)


def run_export(ctx):
    """The Phy folder, then (``fig``) the QC figures, (``save_rez_to_mat``) rez.mat, and the deletion of
    ``delete_tmp_files``. The figures are drawn by a separate process (``ctx.figures``, started with the sort, or
    here when there is none, see plots.py): the batch figure, which needs only the cache, after the reorder stage
    (or here), the templates and the drift map from write_phy's arrays while it writes the files. Timings:
    ``export`` is the Phy folder, ``qc_figures`` the wait for the figures after it."""
    from .phy import write_phy

    params, ir = ctx.user_params, ctx.intermediate
    with contextlib.ExitStack() as stack:
        figures = ctx.get("figures")
        if params["fig"] and figures is None:  # no process started with the sort (which drew the batch figure)
            figures = stack.enter_context(FigureProcess(ctx.output_folder))
            queue_batch_figure(figures, ir)
        t = time.perf_counter()
        if ctx.params.get("do_correction"):
            drift_outputs(ctx, figures)
        write_phy(ctx, figures)
        ctx.timings["export"] = time.perf_counter() - t
        t = time.perf_counter()
        if params["save_rez_to_mat"]:
            save_rez(ctx)
        if figures is not None:
            figures.close()  # raises a figure's error here
            ctx.timings["qc_figures"] = time.perf_counter() - t
    for name in tmp_files_to_delete(params["delete_tmp_files"]):
        if ctx.intermediate.has_file(name):
            logger.info("deleting %s (delete_tmp_files); a rerun will redo preprocessing", name)
            ctx.intermediate.forget_file(name)
