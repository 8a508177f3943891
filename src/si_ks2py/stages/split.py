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

import contextlib
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from .. import templates as tm
from ..cpu import ops as host_ops
from ..correlograms import refractoriness
from ..probe import nearest_channels

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3_s", "W_s", "U_s", "mu_s", "dWU_s", "simScore_s", "iNeigh_s", "iNeighPC_s", "parent_s")
FILES = ()
FILE_INPUTS = ()

MIN_SPIKES = 300
#: clusters whose pursuit runs on the GPU when sorting there: smaller ones are split faster by the host threads
#: than by kernel launches, and larger ones (about 5 kB of GPU memory per spike) on the host, in host memory
DEVICE_SPIKES = (4000, 400_000)


def bimodal_pursuit(ops, clp, w: np.ndarray):
    """50 EM iterations of a 1-D two-Gaussian mixture on clp @ w, re-estimating w on odd iterations after 10.

    clp: [n, d] float64 features on the device of ``ops``; w: [d] unit start direction (host). Returns
    (responsibilities [n, 2] on the host, w); the iterations stop early when the mixture degenerates
    (non-finite statistics), and the caller then sees non-finite responsibilities or one empty side and does
    not split. The direction is solved for on the host (d x d), as Kilosort's.
    """
    xp = ops.xp
    n = len(clp)
    x = clp @ ops.asarray(w)
    upper = x > x.mean()
    n_upper = int(upper.sum())
    if min(n_upper, n - n_upper) < 2:  # no spread along w: nothing to fit
        return np.full((n, 2), np.nan), w
    params = xp.stack([upper.mean(), x[upper].mean(), x[~upper].mean(), x[upper].var(ddof=1),
                       x[~upper].var(ddof=1)])
    rs = xp.empty((n, 2))
    for k in range(1, 51):
        params = ops.mixture_em_step(x, params, rs)
        if k > 10 and k % 2 == 1:
            _, mu1, mu2, s1, s2 = params
            weight = rs[:, 0] / s1 + rs[:, 1] / s2
            StS = ops.to_host(clp.T @ (clp * weight[:, None]) / n)
            StMu = ops.to_host(clp.T @ (rs[:, 0] * mu1 / s1 + rs[:, 1] * mu2 / s2) / n)
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
            x = clp @ ops.asarray(w)
    return ops.to_host(rs), w


def top_principal_axis(ops, clp) -> np.ndarray:
    """The first left singular vector of clp.T (Kilosort's svd), from the eigenvectors of the small [d, d] Gram
    matrix; its sign is fixed (largest component positive) so the result does not depend on the LAPACK build."""
    _, vectors = np.linalg.eigh(ops.to_host(clp.T @ clp))
    w = vectors[:, -1]
    return w if w[np.argmax(np.abs(w))] >= 0 else -w


def try_split(ops, clp0: np.ndarray, times: np.ndarray, wPCA: np.ndarray, from_mean: bool, auc_split: float):
    """The spikes of a cluster that form its new piece (bool [n]) with their mean waveform, or None.

    clp0: [n, d] float64 host features; the pursuit runs on the device of ``ops``."""
    data = ops.asarray(clp0)
    clp = data - data.mean(axis=0)
    clp = clp - ops.running_mean(clp, 250.0)
    w = clp0.mean(axis=0) if from_mean else top_principal_axis(ops, clp)
    norm = np.linalg.norm(w)
    if not np.isfinite(norm) or norm == 0:
        return None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rs, _ = bimodal_pursuit(ops, clp, w / norm)
    if not np.isfinite(rs).all():
        return None
    low = rs[:, 0] > rs[:, 1]
    if low.all() or not low.any():
        return None
    confidence = min(rs[low, 0].mean(), rs[~low, 1].mean())
    smaller = min(low.mean(), (~low).mean())
    if not (smaller > 0.05 and confidence > auc_split and min(low.sum(), (~low).sum()) > MIN_SPIKES):
        return None  # tested first: cheaper than the criteria below, and the split needs all of them
    score = refractoriness(times[low], times[~low])
    if score.Q < 0.25 and score.R < 0.05:  # mutually refractory: one neuron
        return None
    n_pcs = wPCA.shape[1]
    c1 = wPCA @ clp0[low].mean(axis=0).reshape(n_pcs, -1)  # [nt0, NchanNear]
    c2 = wPCA @ clp0[~low].mean(axis=0).reshape(n_pcs, -1)
    n1, n2 = np.linalg.norm(c1), np.linalg.norm(c2)
    if np.corrcoef(c1.ravel(), c2.ravel())[0, 1] > 0.9 and 2 * abs(n1 - n2) / (n1 + n2) < 0.2:
        return None  # same waveform
    return low, c1, c2


class PursuitDevice:
    """Where a cluster's pursuit runs: on the GPU when ``ops`` is the GPU's and the cluster's size is within
    DEVICE_SPIKES, one cluster at a time (bounded memory); else on the host (the NumPy twins)."""

    def __init__(self, ops):
        self.ops = ops
        self.lock = threading.Lock()

    @contextlib.contextmanager
    def ops_for(self, n_spikes: int):
        if self.ops is host_ops or not DEVICE_SPIKES[0] <= n_spikes <= DEVICE_SPIKES[1]:
            yield host_ops
            return
        with self.lock:
            yield self.ops


def split_chain(features, rows: np.ndarray, times: np.ndarray, wPCA, from_mean: bool, auc_split: float,
                device: PursuitDevice):
    """Split one cluster (its spike rows, ascending) again and again: [(rows of the new piece, c1, c2), ...] in the
    order the pieces leave it."""
    pieces = []
    while len(rows) >= MIN_SPIKES:
        clp0 = np.asarray(features[rows]).reshape(len(rows), -1).astype(np.float64)
        with device.ops_for(len(rows)) as ops:
            result = try_split(ops, clp0, times[rows], wPCA, from_mean, auc_split)
        if result is None:
            break
        low, c1, c2 = result
        pieces.append((rows[low], c1, c2))
        rows = rows[~low]
    return pieces


def split_all_clusters(features, st3, dWU, W, sim, ineigh, ineigh_pc, parent, iC, iW, wPCA, fs, auc_split,
                       from_mean, n_workers: int = 1, device_ops=host_ops):
    """One pass of splitAllClusters.m over all clusters (including the ones it creates).

    Clusters are independent, so each generation (the clusters that exist, then the ones they created, ...) is
    split in parallel and the pieces are numbered in (cluster, piece) order: the same ids as Kilosort's loop,
    which tests cluster k until it stops splitting before it moves on to k + 1 and reaches new clusters last.
    ``device_ops``: the op table whose device takes the large clusters (see PursuitDevice).
    """
    device = PursuitDevice(device_ops)
    labels = st3[:, 1].astype(np.int64)
    times = st3[:, 0] / fs
    dWU, W, sim, ineigh, ineigh_pc, parent, iW = (a.copy() for a in (dWU, W, sim, ineigh, ineigh_pc, parent, iW))
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(len(dWU) + 1))
    rows_of = {k: order[bounds[k]:bounds[k + 1]] for k in range(len(dWU))}
    n_splits = 0
    pending = list(range(len(dWU)))
    with ThreadPoolExecutor(max_workers=n_workers) if n_workers > 1 else contextlib.nullcontext() as pool:
        while pending:
            chains = (pool.map if pool else map)(
                lambda k: split_chain(features, rows_of[k], times, wPCA, from_mean, auc_split, device), pending)
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
    n_workers = min(8, os.cpu_count() or 1)  # more threads contend (16 were slower than 8 on 16 cores)
    with threadpool_limits(limits=1, user_api="blas"):  # one BLAS thread per cluster worker, not one per core each
        for from_mean in (False, True):
            st3, dWU, W, sim, ineigh, ineigh_pc, parent, iW, n_splits = split_all_clusters(
                features, *state, iC, iW, wPCA, p.fs, p.AUCsplit, from_mean, n_workers, ctx.ops)
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
