"""Outputs of a sort: the Phy folder, QC figures, rez.mat on request, and the SpikeInterface sorting."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger("si_ks2py")


def tmp_files_to_delete(option) -> tuple[str, ...]:
    if option is True:
        return ("temp_wh.dat",)
    if option is False:
        return ()
    return tuple(name for name in option if name == "temp_wh.dat")  # ks2py writes no MATLAB files


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
    ``delete_tmp_files``. The figures are drawn by one background thread (matplotlib, imported there, draws one
    figure at a time): the batch figure, which needs only the cache, while the Phy files are written, then the
    figures that read them. Timings: ``export`` is the Phy folder, ``qc_figures`` the wait for the figures after it."""
    from ..plots import save_batch_figure, save_phy_figures
    from .phy import write_phy

    params = ctx.user_params
    with ThreadPoolExecutor(max_workers=1) as drawing:
        figures = [drawing.submit(save_batch_figure, ctx.output_folder, ctx)] if params["fig"] else []
        t = time.perf_counter()
        write_phy(ctx)
        ctx.timings["export"] = time.perf_counter() - t
        if params["fig"]:
            t = time.perf_counter()
            figures.append(drawing.submit(save_phy_figures, ctx.output_folder, ctx))
        if params["save_rez_to_mat"]:
            save_rez(ctx)
        for figure in figures:
            figure.result()  # raises a figure's error here
        if params["fig"]:
            ctx.timings["qc_figures"] = time.perf_counter() - t
    for name in tmp_files_to_delete(params["delete_tmp_files"]):
        if ctx.intermediate.has_file(name):
            logger.info("deleting %s (delete_tmp_files); a rerun will redo preprocessing", name)
            ctx.intermediate.forget_file(name)
