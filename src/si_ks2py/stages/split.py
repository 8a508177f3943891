"""Splits (splitAllClusters.m, "bimodal pursuit"), run twice: first from each cluster's top principal axis,
then from its mean feature vector.

A cluster's PC features (centred, minus a Gaussian running mean over 250 spikes for drift) are projected on a
direction that 50 EM iterations of a two-Gaussian mixture refine. The cluster is split when each side holds
over 5% and 300 spikes and is assigned with mean confidence above AUCsplit, unless the two halves are mutually
refractory (their cross-correlogram) or have the same mean waveform (correlation > 0.9 and amplitudes within
20%). The new cluster gets a new template id; its template is its spikes' mean waveform (Kilosort 2.0 gave it the
other half's, swapping templates and labels), and the piece that stays is tested again. Afterwards every
template is re-factorised and the similarities recomputed; split siblings keep similarity 1.

Outputs: ``st3_s`` (labels after both passes), ``W_s``, ``U_s``, ``mu_s``, ``dWU_s`` (templates, new ones
appended), ``simScore_s``, ``iNeigh_s``, ``iNeighPC_s``, ``parent_s`` [K] (the template each descends from).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from scipy import signal
from threadpoolctl import threadpool_limits

from .. import templates as tm
from ..correlograms import refractoriness
from ..probe import nearest_channels

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3_s", "W_s", "U_s", "mu_s", "dWU_s", "simScore_s", "iNeigh_s", "iNeighPC_s", "parent_s")
FILES = ()
FILE_INPUTS = ()

MIN_SPIKES = 300


def running_mean(x: np.ndarray, sigma: float = 250.0) -> np.ndarray:
    """my_conv2.m along axis 0: Gaussian smoothing (+-4 sigma), renormalised at the edges (FFT convolution)."""
    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    smooth = signal.fftconvolve(x, kernel[:, None], mode="same", axes=0)
    weight = signal.fftconvolve(np.ones(len(x)), kernel, mode="same")
    return smooth / weight[:, None]


@numba.njit(nogil=True, cache=True, error_model="numpy")
def mixture_em_step(x, p, mu1, mu2, s1, s2, rs):
    """One EM step of the 1-D two-Gaussian mixture (weights p, 1 - p): writes the responsibilities rs [n, 2] of
    x [n] (float64) and returns the new (p, mu1, mu2, s1, s2). Compiled, and without the GIL: the clusters'
    splits run in parallel threads."""
    n = x.shape[0]
    c1 = -0.5 * np.log(s1) + np.log(p)
    c2 = -0.5 * np.log(s2) + np.log(1 - p)
    r1_sum = r1x_sum = r2x_sum = 0.0
    for i in range(n):
        l1 = c1 - (x[i] - mu1) ** 2 / (2 * s1)
        l2 = c2 - (x[i] - mu2) ** 2 / (2 * s2)
        top = max(l1, l2)
        e1, e2 = np.exp(l1 - top), np.exp(l2 - top)
        rs[i, 0] = e1 / (e1 + e2)
        rs[i, 1] = e2 / (e1 + e2)
        r1_sum += rs[i, 0]
        r1x_sum += rs[i, 0] * x[i]
        r2x_sum += rs[i, 1] * x[i]
    r2_sum = n - r1_sum
    mu1, mu2 = r1x_sum / r1_sum, r2x_sum / r2_sum
    v1 = v2 = 0.0
    for i in range(n):
        v1 += rs[i, 0] * (x[i] - mu1) ** 2
        v2 += rs[i, 1] * (x[i] - mu2) ** 2
    return r1_sum / n, mu1, mu2, v1 / r1_sum, v2 / r2_sum


def bimodal_pursuit(clp: np.ndarray, w: np.ndarray):
    """50 EM iterations of a 1-D two-Gaussian mixture on clp @ w, re-estimating w on odd iterations after 10.

    clp: [n, d] features; w: [d] unit start direction. Returns (responsibilities [n, 2], w); the iterations stop
    early when the mixture degenerates (non-finite statistics), and the caller then sees non-finite
    responsibilities or one empty side and does not split.
    """
    n = len(clp)
    x = clp @ w
    upper = x > x.mean()
    if min(upper.sum(), (~upper).sum()) < 2:  # no spread along w: nothing to fit
        return np.full((n, 2), np.nan), w
    mu1, mu2 = x[upper].mean(), x[~upper].mean()
    s1, s2 = x[upper].var(ddof=1), x[~upper].var(ddof=1)
    p = upper.mean()
    rs = np.empty((n, 2))
    for k in range(1, 51):
        p, mu1, mu2, s1, s2 = mixture_em_step(x, p, mu1, mu2, s1, s2, rs)
        if k > 10 and k % 2 == 1:
            weight = rs[:, 0] / s1 + rs[:, 1] / s2
            StS = clp.T @ (clp * weight[:, None]) / n
            StMu = clp.T @ (rs[:, 0] * mu1 / s1 + rs[:, 1] * mu2 / s2) / n
            if not (np.isfinite(StS).all() and np.isfinite(StMu).all()):
                break  # a degenerate cluster (Kilosort crashed here, MouseLand/Kilosort#85, #199)
            try:
                w = np.linalg.solve(StS, StMu)
            except np.linalg.LinAlgError:  # singular: the least-squares direction
                try:
                    w = np.linalg.lstsq(StS, StMu, rcond=None)[0]
                except np.linalg.LinAlgError:
                    break
            w /= np.linalg.norm(w)
            x = clp @ w
    return rs, w


def top_principal_axis(clp: np.ndarray) -> np.ndarray:
    """The first left singular vector of clp.T (Kilosort's svd), from the eigenvectors of the small [d, d] Gram
    matrix; its sign is fixed (largest component positive) so the result does not depend on the LAPACK build."""
    _, vectors = np.linalg.eigh(clp.T @ clp)
    w = vectors[:, -1]
    return w if w[np.argmax(np.abs(w))] >= 0 else -w


def try_split(clp0: np.ndarray, times: np.ndarray, wPCA: np.ndarray, from_mean: bool, auc_split: float):
    """The spikes of a cluster that form its new piece (bool [n]) with their mean waveform, or None."""
    clp = clp0 - clp0.mean(axis=0)
    clp = clp - running_mean(clp)
    if from_mean:
        w = clp0.mean(axis=0)
    else:
        w = top_principal_axis(clp)
    norm = np.linalg.norm(w)
    if not np.isfinite(norm) or norm == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rs, _ = bimodal_pursuit(clp, w / norm)
    if not np.isfinite(rs).all():
        return None
    low = rs[:, 0] > rs[:, 1]
    if low.all() or not low.any():
        return None
    confidence = min(rs[low, 0].mean(), rs[~low, 1].mean())
    smaller = min(low.mean(), (~low).mean())
    score = refractoriness(times[low], times[~low])
    if score.Q < 0.25 and score.R < 0.05:  # mutually refractory: one neuron
        return None
    n_pcs = wPCA.shape[1]
    c1 = wPCA @ clp0[low].mean(axis=0).reshape(n_pcs, -1)  # [nt0, NchanNear]
    c2 = wPCA @ clp0[~low].mean(axis=0).reshape(n_pcs, -1)
    n1, n2 = np.linalg.norm(c1), np.linalg.norm(c2)
    if np.corrcoef(c1.ravel(), c2.ravel())[0, 1] > 0.9 and 2 * abs(n1 - n2) / (n1 + n2) < 0.2:
        return None  # same waveform
    if smaller > 0.05 and confidence > auc_split and min(low.sum(), (~low).sum()) > MIN_SPIKES:
        return low, c1, c2
    return None


def split_chain(features, rows: np.ndarray, times: np.ndarray, wPCA, from_mean: bool, auc_split: float):
    """Split one cluster (its spike rows, ascending) again and again: [(rows of the new piece, c1, c2), ...] in the
    order the pieces leave it."""
    pieces = []
    while len(rows) >= MIN_SPIKES:
        clp0 = np.asarray(features[rows]).reshape(len(rows), -1).astype(np.float64)
        result = try_split(clp0, times[rows], wPCA, from_mean, auc_split)
        if result is None:
            break
        low, c1, c2 = result
        pieces.append((rows[low], c1, c2))
        rows = rows[~low]
    return pieces


def split_all_clusters(features, st3, dWU, W, sim, ineigh, ineigh_pc, parent, iC, iW, wPCA, fs, auc_split,
                       from_mean, n_workers: int = 1):
    """One pass of splitAllClusters.m over all clusters (including the ones it creates).

    Clusters are independent, so each generation (the clusters that exist, then the ones they created, ...) is
    split in parallel and the pieces are numbered in (cluster, piece) order: the same ids as Kilosort's loop,
    which tests cluster k until it stops splitting before it moves on to k + 1 and reaches new clusters last.
    """
    labels = st3[:, 1].astype(np.int64)
    times = st3[:, 0] / fs
    dWU, W, sim, ineigh, ineigh_pc, parent, iW = (a.copy() for a in (dWU, W, sim, ineigh, ineigh_pc, parent, iW))
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(dWU) + 1))
    rows_of = {k: order[bounds[k]:bounds[k + 1]] for k in range(len(dWU))}
    n_splits = 0
    pending = list(range(len(dWU)))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        while pending:
            chains = pool.map(lambda k: split_chain(features, rows_of[k], times, wPCA, from_mean, auc_split),
                              pending)
            created = []
            for k, chain in zip(pending, chains):
                for rows, c1, c2 in chain:
                    new = len(dWU)
                    channels = iC[iW[k]]
                    dWU = np.concatenate([dWU, np.zeros_like(dWU[:1])])
                    dWU[new][:, channels] = c1  # the new cluster's template is the mean of its own spikes
                    dWU[k][:, channels] = c2
                    W = np.concatenate([W, wPCA[None].astype(W.dtype)])
                    iW = np.append(iW, iW[k])
                    parent = np.append(parent, parent[k])
                    labels[rows] = new
                    rows_of[new] = rows
                    sim = np.pad(sim, ((0, 1), (0, 1)))
                    sim[new, :] = sim[k, :]
                    sim[:, new] = sim[:, k]
                    sim[k, new] = sim[new, k] = 1
                    ineigh = np.concatenate([ineigh, ineigh[k:k + 1]])
                    ineigh_pc = np.concatenate([ineigh_pc, ineigh_pc[k:k + 1]])
                    created.append(new)
                    n_splits += 1
            pending = created
    st3 = st3.copy()
    st3[:, 1] = labels
    return st3, dWU, W, sim, ineigh, ineigh_pc, parent, iW, n_splits


def run(ctx):
    ir, p = ctx.intermediate, ctx.params
    n_chan = len(ir.chanMap)
    n_near = min(n_chan, 32)
    iC = nearest_channels(np.asarray(ir.xc), np.asarray(ir.yc), np.asarray(ir.kcoords), n_near)
    wPCA = np.asarray(ir.wPCA, dtype=np.float64)
    dWU = np.asarray(ir.dWU, dtype=np.float64)
    iW = tm.peak_channels(dWU, p.nt0min)
    state = (np.asarray(ir.st3_m), dWU, np.asarray(ir.W), np.asarray(ir.simScore), np.asarray(ir.iNeigh),
             np.asarray(ir.iNeighPC), np.arange(len(dWU)))
    features = ir.cProjPC
    n_workers = min(16, os.cpu_count() or 1)
    with threadpool_limits(limits=1, user_api="blas"):  # one BLAS thread per cluster worker, not 16 each
        for from_mean in (False, True):
            st3, dWU, W, sim, ineigh, ineigh_pc, parent, iW, n_splits = split_all_clusters(
                features, *state, iC, iW, wPCA, p.fs, p.AUCsplit, from_mean, n_workers)
            state = (st3, dWU, W, sim, ineigh, ineigh_pc, parent)
            logger.info("split (%s): %d splits", "mean" if from_mean else "PC", n_splits)
    Ka, Kb = tm.alignment_kernels(p.nt0, p.nt0min)
    W, U, mu = tm.svd_templates(dWU, W, iC, iW, Ka, Kb, p.nt0min)
    siblings = sim == 1
    sim = tm.similarity(W.astype(np.float32), U.astype(np.float32), iC, iW, n_chan, n_near)["simScore"]
    sim[siblings] = 1
    ir.st3_s, ir.W_s, ir.U_s, ir.mu_s, ir.dWU_s = st3, W, U, mu, dWU
    ir.simScore_s = sim
    ir.iNeigh_s, ir.iNeighPC_s, ir.parent_s = ineigh, iC[iW], parent
