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
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import templates as tm
from ..cpu import ops as host_ops
from ..correlograms import refractoriness
from ..probe import nearest_channels

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3_s", "W_s", "U_s", "mu_s", "dWU_s", "simScore_s", "iNeigh_s", "iNeighPC_s", "parent_s")
FILES = ()
FILE_INPUTS = ()

MIN_SPIKES = 300
#: float64 feature bytes of one group of clusters pursued together (the GPU holds about ten buffers of this size);
#: a cluster larger than this alone is pursued on the host
GROUP_BYTES = 2 ** 27


def solve_directions(ops, StS, StMu, w, active: np.ndarray):
    """The new unit directions ``StS \\ StMu`` of the active segments (w [S, d] is updated in place; a segment
    whose system cannot be solved leaves ``active``). Batched on the device; a singular system is solved on the
    host, by least squares where the solve fails, as one cluster at a time would be."""
    xp = ops.xp
    chosen = np.flatnonzero(active)
    if not len(chosen):
        return
    index = xp.asarray(chosen)
    A, b = StS[index], StMu[index]
    try:
        solved = xp.linalg.solve(A, b[..., None])[..., 0]
        ok = ops.to_host(xp.isfinite(solved).all(axis=1))
    except np.linalg.LinAlgError:
        solved, ok = xp.zeros_like(b), np.zeros(len(chosen), dtype=bool)
    if not ok.all():
        solved, A, b = ops.to_host(solved).copy(), ops.to_host(A), ops.to_host(b)
        for j in np.flatnonzero(~ok):
            try:
                solved[j] = np.linalg.solve(A[j], b[j])
            except np.linalg.LinAlgError:  # singular: the least-squares direction
                try:
                    solved[j] = np.linalg.lstsq(A[j], b[j], rcond=None)[0]
                except np.linalg.LinAlgError:
                    active[chosen[j]] = False
        keep = active[chosen]
        chosen, solved = chosen[keep], xp.asarray(solved[keep])
        index = xp.asarray(chosen)
    w[index] = solved / xp.linalg.norm(solved, axis=1)[:, None]


def bimodal_pursuit(ops, clp, counts: np.ndarray, w, active: np.ndarray):
    """50 EM iterations of a 1-D two-Gaussian mixture on each segment's clp @ w, re-estimating w on odd
    iterations after 10; all segments (clusters) at once.

    clp: [N, d] float64 features of S segments on the device of ``ops``, counts [S] their rows (host); w: [S, d]
    unit start directions (device); active: [S] bool, the segments to pursue (host; changed in place). Returns
    the responsibilities [N, 2] on the host. A segment stops early when its mixture degenerates (non-finite
    statistics) and then shows non-finite responsibilities or one empty side (not split); one without spread
    along w is not pursued (NaN responsibilities). The directions are solved for per segment (d x d).
    """
    xp = ops.xp
    segment = xp.asarray(np.repeat(np.arange(len(counts)), counts))
    n = xp.asarray(counts, dtype=xp.float64)
    x = (clp * w[segment]).sum(axis=1)
    upper = x > (ops.segment_sum(x, counts) / n)[segment]
    n_upper = ops.segment_sum(upper.astype(xp.float64), counts)

    def side(mask, count):  # mean and variance (ddof 1) of the side
        mean = ops.segment_sum(xp.where(mask, x, 0.0), counts) / count
        return mean, ops.segment_sum(xp.where(mask, (x - mean[segment]) ** 2, 0.0), counts) / (count - 1)

    (mu1, s1), (mu2, s2) = side(upper, n_upper), side(~upper, n - n_upper)
    params = xp.stack([n_upper / n, mu1, mu2, s1, s2], axis=1)
    active &= ops.to_host(xp.minimum(n_upper, n - n_upper) >= 2)  # no spread along w: nothing to fit
    rs = xp.full((len(x), 2), xp.nan)
    for k in range(1, 51):
        params = ops.segment_em_step(xp.ascontiguousarray(x), counts, params, rs, xp.asarray(active))
        if k > 10 and k % 2 == 1 and active.any():
            _, mu1, mu2, s1, s2 = params.T
            weight = rs[:, 0] / s1[segment] + rs[:, 1] / s2[segment]
            StS = ops.segment_gram(clp, counts, weight) / n[:, None, None]
            target = rs[:, 0] * (mu1 / s1)[segment] + rs[:, 1] * (mu2 / s2)[segment]
            StMu = ops.segment_sum(clp * target[:, None], counts) / n[:, None]
            # a degenerate cluster stops here (Kilosort crashed, MouseLand/Kilosort#85, #199)
            active &= ops.to_host(xp.isfinite(StS).all(axis=(1, 2)) & xp.isfinite(StMu).all(axis=1))
            solve_directions(ops, StS, StMu, w, active)
            x = (clp * w[segment]).sum(axis=1)
    return ops.to_host(rs)


def top_principal_axes(ops, clp, counts: np.ndarray) -> np.ndarray:
    """[S, d]: each segment's first left singular vector of clp.T (Kilosort's svd), from the eigenvectors of its
    small [d, d] Gram matrix; its sign is fixed (largest component positive) so the result does not depend on
    the LAPACK build. Zero for a segment whose Gram matrix is not finite."""
    xp = ops.xp
    gram = ops.segment_gram(clp, counts, xp.ones(len(clp)))
    axes = np.zeros(gram.shape[:2])
    finite = np.flatnonzero(ops.to_host(xp.isfinite(gram).all(axis=(1, 2))))
    if len(finite):  # batched on the device of ops
        axes[finite] = ops.to_host(xp.linalg.eigh(gram[xp.asarray(finite)])[1][:, :, -1])
    sign = np.where(np.take_along_axis(axes, np.abs(axes).argmax(axis=1)[:, None], axis=1) >= 0, 1.0, -1.0)
    return axes * sign


def accept_split(rs: np.ndarray, clp0: np.ndarray, times: np.ndarray, wPCA: np.ndarray, auc_split: float):
    """The split of one cluster given its pursuit's responsibilities rs [n, 2]: (the spikes of its new piece,
    bool [n], and the two sides' mean waveforms) or None. clp0: [n, d] float32 features; times in seconds."""
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
    clp0 = clp0.astype(np.float64)
    c1 = wPCA @ clp0[low].mean(axis=0).reshape(n_pcs, -1)  # [nt0, NchanNear]
    c2 = wPCA @ clp0[~low].mean(axis=0).reshape(n_pcs, -1)
    n1, n2 = np.linalg.norm(c1), np.linalg.norm(c2)
    if np.corrcoef(c1.ravel(), c2.ravel())[0, 1] > 0.9 and 2 * abs(n1 - n2) / (n1 + n2) < 0.2:
        return None  # same waveform
    return low, c1, c2


def try_splits(ops, clp0: np.ndarray, counts: np.ndarray, times: list, wPCA: np.ndarray, from_mean: bool,
               auc_split: float, pool=None) -> list:
    """Try to split S clusters at once: for each, (its new piece, bool [n], c1, c2) or None.

    clp0: [N, d] float32 host features of the clusters one after the other, counts [S] their spike counts,
    times: S arrays of their spike times (s). The pursuit runs on the device of ``ops``; the final checks (the
    correlogram, the waveforms) on the host, in ``pool`` when given.
    """
    xp = ops.xp
    counts = np.asarray(counts, dtype=np.int64)
    segment = xp.asarray(np.repeat(np.arange(len(counts)), counts))
    data = ops.asarray(clp0).astype(xp.float64)
    mean = ops.segment_sum(data, counts) / xp.asarray(counts, dtype=xp.float64)[:, None]
    clp = data - mean[segment]
    del data
    clp -= ops.segment_running_mean(clp, counts, 250.0)
    w = ops.to_host(mean) if from_mean else top_principal_axes(ops, clp, counts)
    norm = np.linalg.norm(w, axis=1)
    active = np.isfinite(norm) & (norm > 0)
    w = xp.asarray(np.where(active[:, None], w / np.where(active, norm, 1)[:, None], 0.0))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rs = bimodal_pursuit(ops, clp, counts, w, active)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    checks = [(rs[a:b], clp0[a:b], t, wPCA, auc_split) for a, b, t in zip(bounds[:-1], bounds[1:], times)]
    return list((pool.map if pool else map)(lambda c: accept_split(*c), checks))


def pursuit_groups(ops, sizes: dict, d: int):
    """The live clusters (id -> spike count) in groups of at most GROUP_BYTES of float64 features, with the ops
    each group runs on (a cluster larger than that alone on the host)."""
    limit = max(1, GROUP_BYTES // (8 * d))
    group, rows = [], 0
    for k, n in sizes.items():
        if n > limit:
            yield [k], host_ops
            continue
        if group and rows + n > limit:
            yield group, ops
            group, rows = [], 0
        group.append(k)
        rows += n
    if group:
        yield group, ops


def split_chains(ops, features, rows: list, times: np.ndarray, wPCA, from_mean: bool, auc_split: float,
                 pool=None) -> list:
    """Split each cluster (its spike rows, ascending) again and again: per cluster [(rows of the new piece, c1,
    c2), ...] in the order the pieces leave it. All clusters still splitting are tried together in each round."""
    pieces = [[] for _ in rows]
    live = {i: r for i, r in enumerate(rows) if len(r) >= MIN_SPIKES}
    d = int(np.prod(features.shape[1:]))
    while live:
        still = {}
        for group, group_ops in pursuit_groups(ops, {i: len(r) for i, r in live.items()}, d):
            group_rows = [live[i] for i in group]
            clp0 = np.asarray(features[np.concatenate(group_rows)]).reshape(-1, d)
            results = try_splits(group_ops, clp0, [len(r) for r in group_rows], [times[r] for r in group_rows],
                                 wPCA, from_mean, auc_split, pool)
            group_ops.release_memory()  # the next group's buffers have other sizes
            for i, r, result in zip(group, group_rows, results):
                if result is None:
                    continue
                low, c1, c2 = result
                pieces[i].append((r[low], c1, c2))
                if (~low).sum() >= MIN_SPIKES:
                    still[i] = r[~low]
        live = still
    return pieces


def split_all_clusters(features, st3, dWU, W, sim, ineigh, ineigh_pc, parent, iC, iW, wPCA, fs, auc_split,
                       from_mean, n_workers: int = 1, ops=host_ops):
    """One pass of splitAllClusters.m over all clusters (including the ones it creates).

    Clusters are independent, so each generation (the clusters that exist, then the ones they created, ...) is
    split together (split_chains) and the pieces are numbered in (cluster, piece) order: the same ids as
    Kilosort's loop, which tests cluster k until it stops splitting before it moves on to k + 1 and reaches new
    clusters last. ``ops``: the op table of the pursuits; ``n_workers`` threads run the final checks.
    """
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
            chains = split_chains(ops, features, [rows_of[k] for k in pending], times, wPCA, from_mean, auc_split,
                                  pool)
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
    n_workers = min(8, os.cpu_count() or 1)  # for the correlograms of the final checks
    for from_mean in (False, True):
        st3, dWU, W, sim, ineigh, ineigh_pc, parent, iW, n_splits = split_all_clusters(
            features, *state, iC, iW, wPCA, p.fs, p.AUCsplit, from_mean, n_workers, ctx.ops)
        state = (st3, dWU, W, sim, ineigh, ineigh_pc, parent)
        logger.info("split (%s): %d splits", "mean" if from_mean else "PC", n_splits)
    ops = ctx.ops  # the templates are re-factorised and compared on the device
    Ka, Kb = tm.alignment_kernels(p.nt0, p.nt0min)
    iC_d, iW_d = ops.asarray(iC), ops.asarray(iW)
    W, U, mu = ops.svd_templates(ops.asarray(dWU), ops.asarray(W), iC_d, iW_d, ops.asarray(Ka), ops.asarray(Kb),
                                 p.nt0min)
    siblings = sim == 1
    sim = ops.to_host(tm.similarity(ops, W.astype(ops.xp.float32), U.astype(ops.xp.float32), iC_d, iW_d, n_chan,
                                    n_near)["simScore"])
    W, U, mu = (ops.to_host(a) for a in (W, U, mu))
    sim[siblings] = 1
    ir.st3_s, ir.W_s, ir.U_s, ir.mu_s, ir.dWU_s = st3, W, U, mu, dWU
    ir.simScore_s = sim
    ir.iNeigh_s, ir.iNeighPC_s, ir.parent_s = ineigh, iC[iW], parent
