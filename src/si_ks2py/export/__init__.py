"""Outputs of a sort: the Phy folder, QC figures, rez.mat on request, and the SpikeInterface sorting."""

from __future__ import annotations

import logging
import time

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
    from ..plots import save_qc_figures
    from .phy import write_phy

    params = ctx.user_params
    t = time.perf_counter()
    write_phy(ctx)
    ctx.timings["export"] = time.perf_counter() - t
    if params["fig"]:
        t = time.perf_counter()
        save_qc_figures(ctx.output_folder, ctx)
        ctx.timings["qc_figures"] = time.perf_counter() - t
    if params["save_rez_to_mat"]:
        save_rez(ctx)
    for name in tmp_files_to_delete(params["delete_tmp_files"]):
        if ctx.intermediate.has_file(name):
            logger.info("deleting %s (delete_tmp_files); a rerun will redo preprocessing", name)
            ctx.intermediate.forget_file(name)
