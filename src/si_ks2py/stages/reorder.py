"""Batch reordering (clusterSingleBatches.m + sortBatches2.m): the batch order ``iorig`` used for drift tracking.

Each batch's spikes (threshold crossings of their PC-projection norm) are clustered into ceil(Nchan/2)
templates; ``ccb[i, b]`` is the spike-weighted distance from batch b's templates to their best match among
batch i's. The z-scored, symmetrised ``ccb`` is embedded on a line, and ``iorig`` lists the batches along it,
so neighbouring batches look alike. ``reorder=False`` keeps the time order, and so does drift correction (the
data are corrected, and Kilosort 2.5 has no reordering).

Batches with almost no spikes (under a tenth of the median count: a silent stretch, an unplugged period) go to
the end of ``iorig``, and ``n_active`` counts the others: learning starts in the middle of the active batches.
Kilosort started in the middle of all batches, and when that fell in a silent stretch it learnt from silence
and missed units.

Outputs: ``iorig`` [Nbatch] int64, ``n_active`` [] int64, ``ccb`` [Nbatch, Nbatch] float32 (z-scored,
symmetrised; ccb0 in Kilosort), ``ccbsort`` = ccb[iorig][:, iorig].
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..io import batch_prefetch, noise_units, on_own_streams, open_whitened, owned_spikes, prefetch, read_batch
from ..probe import nearest_channels
from ..progress import progress_bar

logger = logging.getLogger("si_ks2py")

#: float32 bytes of the dense templates of one block of batches in batch_distances
DISTANCE_BLOCK_BYTES = 2 ** 27
#: bytes of the padded dense features (and neighbour masks) of the batches that cluster_batches takes at once
CLUSTER_GROUP_BYTES = 2 ** 28
#: batches whose spikes are detected side by side, each on a stream of its own (see io.on_own_streams)
DETECT_WORKERS = 3

OUTPUTS = ("iorig", "n_active", "ccb", "ccbsort")
FILES = ()
FILE_INPUTS = ("temp_wh.dat",)


def isolated_peaks(ops, S, params):
    """isolated_peaks_new.m: single-channel negative peaks below spkTh, alone within long_range.

    S: [n, Nchan] float32 whitened batch on the device. A peak is the minimum over +-loc_range (samples,
    channel indices) and the only one within +-long_range. Returns (rows, channels) as host int64 arrays,
    ordered by channel then time (MATLAB's find order), away from the batch edges.
    """
    xp = ops.xp
    (lt, lc), (ht, hc) = params.loc_range, params.long_range
    smin = ops.running_min(ops.running_min(S, lt, axis=0), lc, axis=1)
    peaks = (S < smin + 1e-3) & (S < params.spkTh)
    crowd = ops.running_sum(ops.running_sum(peaks.astype(xp.float32), ht, axis=0), hc, axis=1)
    peaks &= crowd < 1.2
    peaks[:params.nt0] = False
    peaks[S.shape[0] - params.nt0 - 1:] = False
    cols, rows = (ops.to_host(a) for a in xp.nonzero(peaks.T))
    return rows.astype(np.int64), cols.astype(np.int64)


def no_isolated_spikes_message(ctx, data, batches) -> str:
    """Why ``batches`` of the whitened data gave no isolated peaks, from what they hold: no sample below
    -detect_threshold at all, or peaks below it so many that none is alone within long_range."""
    ops, p = ctx.ops, ctx.params
    n_peaks, lowest = 0, np.inf
    (lt, lc) = p.loc_range
    for k, raw in batch_prefetch(ctx, data, batches):
        S = noise_units(ctx, raw)[p.nt0:-p.nt0 - 1]
        smin = ops.running_min(ops.running_min(S, lt, axis=0), lc, axis=1)
        n_peaks += int(ops.to_host(((S < smin + 1e-3) & (S < p.spkTh)).sum()))
        lowest = min(lowest, float(ops.to_host(S.min())) if S.size else np.inf)
    threshold = -p.spkTh
    if n_peaks:
        return (f"{n_peaks} peaks below detect_threshold={threshold:g} were found in the whitened data (noise has "
                f"unit variance), but none alone within long_range={p.long_range}: the threshold is so low that "
                f"noise peaks crowd every spike. Raise detect_threshold (default 6)")
    advice = "lower detect_threshold, or " if threshold > 0.5 else ""
    return (f"no sample of the whitened data went below -detect_threshold={-threshold:g} (lowest: {lowest:.2f}, in "
            f"units of the noise): the recording may hold no spikes; {advice}check its scaling")


def spike_clips(ops, S, rows, cols, params):
    """get_SpikeSample.m: single-channel clips [n, nt0] with the trough at index nt0min - 1."""
    xp = ops.xp
    t = xp.asarray(rows)[:, None] - params.nt0min + 1 + xp.arange(params.nt0)[None, :]
    return S[t, xp.asarray(cols)[:, None]]


def waveform_pcs(ops, clips_cov, n_pcs: int, sign_sample: int) -> np.ndarray:
    """Top n_pcs eigenvectors of a clip covariance [nt0, nt0], PC1 made negative at sign_sample."""
    values, vectors = np.linalg.eigh(clips_cov)
    pcs = vectors[:, np.argsort(-np.abs(values), kind="stable")[:n_pcs]].copy()
    pcs[:, 0] *= -np.sign(pcs[sign_sample, 0]) if pcs[sign_sample, 0] != 0 else 1
    return pcs.astype(np.float32)


def extract_pc_from_snippets(ctx, data, n_pcs: int) -> np.ndarray:
    """extractPCfromSnippets.m: temporal PCs [nt0, n_pcs] of isolated spikes in every 100th batch."""
    ops, p = ctx.ops, ctx.params
    cc = np.zeros((p.nt0, p.nt0))
    for k, raw in batch_prefetch(ctx, data, range(0, p.Nbatch, 100)):
        S = noise_units(ctx, raw)
        rows, cols = isolated_peaks(ops, S, p)
        clips = spike_clips(ops, S, rows, cols, p).astype(ops.xp.float64)
        cc += ops.to_host(clips.T @ clips) / 1000
    if not cc.any():
        raise ValueError("no isolated spikes were found: " + no_isolated_spikes_message(ctx, data,
                                                                                         range(0, p.Nbatch, 100)))
    return waveform_pcs(ops, cc, n_pcs, p.nt0min)


def on_all_channels(xp, values, centre, iC):
    """values [n, NchanNear, nPCs] on the nearest channels iC[centre] of each row, placed on all channels:
    [n, Nchan * nPCs] float32 (zero elsewhere)."""
    n, _, n_pcs = values.shape
    dense = xp.zeros((n, iC.shape[0], n_pcs), dtype=xp.float32)
    dense[xp.arange(n)[:, None], iC[centre]] = values
    return dense.reshape(n, -1)


def cluster_batches(xp, features, centres, counts, iC, neighbours, n_clusters: int, seeds):
    """Each batch's k-means in PC space (initializeWdata2.m + mexClustering2.cu, 10 iterations), for a group of
    batches at once: the batches' spikes are padded to a common count and every step is one batched array op, so
    the number of kernel launches does not grow with the group.

    features: [N, NchanNear, nPCs] float32 (device), the spikes of G batches one batch after another; centres: [N]
    spike channels; counts: [G] host int, spikes per batch; iC: [Nchan, NchanNear]; neighbours: [Nchan, Nchan]
    bool, c' among the nearest channels of c; seeds: [G, n_clusters] host int, the spikes (within their batch)
    that start the templates. A spike is scored against the templates whose best channel is among its nearest
    channels, by ``max(0, <features, template>)^2``; spikes without a positive score (and the padding) stay
    unassigned (Kilosort put them in cluster 0). Returns (W0 [G, T, NchanNear, nPCs] unit-norm templates on their
    own channels, mu [G, T], nsp [G, T], best channel [G, T]) as device arrays.
    """
    G, n_max = len(counts), int(max(counts))
    n_chan, n_pcs = iC.shape[0], features.shape[2]
    slots = xp.asarray(np.concatenate([g * n_max + np.arange(n) for g, n in enumerate(counts)]))
    dense = xp.zeros((G * n_max, n_chan * n_pcs), dtype=xp.float32)
    dense[slots] = on_all_channels(xp, features, centres, iC)
    dense = dense.reshape(G, n_max, -1)
    near = xp.zeros((G * n_max, n_chan), dtype=bool)
    near[slots] = neighbours[centres]
    near = near.reshape(G, n_max, n_chan)
    W = dense[xp.arange(G)[:, None], xp.asarray(seeds)]  # [G, T, Nchan * nPCs]
    clusters = xp.arange(n_clusters)
    for it in range(11):
        mu = xp.sqrt((W ** 2).sum(axis=2))
        W = W / (1e-5 + mu[:, :, None])
        best_channel = (W.reshape(G, n_clusters, n_chan, n_pcs)[..., 0] ** 2).argmax(axis=2)  # [G, T]
        if it == 10:
            break
        near_best = xp.take_along_axis(near, xp.broadcast_to(best_channel[:, None, :], (G, n_max, n_clusters)), 2)
        score = xp.maximum(dense @ W.transpose(0, 2, 1), 0) ** 2 * near_best  # [G, n, T]
        assigned = score.max(axis=2) > 0
        # a comparison, not a boolean index: no wait for the GPU to count the assigned spikes
        onehot = ((score.argmax(axis=2)[:, :, None] == clusters) & assigned[:, :, None]).astype(xp.float32)
        nsp = onehot.sum(axis=1)
        W = (onehot.transpose(0, 2, 1) @ dense) / (1e-5 + nsp[:, :, None])
    W = W.reshape(G, n_clusters, n_chan, n_pcs)
    own = W[xp.arange(G)[:, None, None], clusters[None, :, None], iC[best_channel]]  # [G, T, NchanNear, nPCs]
    own /= 1e-5 + xp.sqrt((own ** 2).sum(axis=(2, 3)))[:, :, None, None]
    return own, mu, nsp, best_channel


def batch_distances(xp, Ws, mus, ns, Whs, iC, neighbours):
    """mexDistances2.cu + ccb: [Nbatch, Nbatch] spike-weighted mean distance of batch b's templates to their
    closest template of batch i (or to zero), ``ccb[i, b]``. The batches b are taken in blocks whose dense
    templates take at most DISTANCE_BLOCK_BYTES: GPU memory does not grow with the recording's length."""
    n_batch, T, _, n_pcs = Ws.shape
    block = max(1, DISTANCE_BLOCK_BYTES // (4 * T * iC.shape[0] * n_pcs))
    ccb = xp.zeros((n_batch, n_batch), dtype=xp.float64)
    for a in range(0, n_batch, block):
        b = min(n_batch, a + block)
        dense = on_all_channels(xp, Ws[a:b].reshape(-1, *Ws.shape[2:]), Whs[a:b].reshape(-1), iC)
        mus_block, wh_block = mus[a:b].reshape(-1), Whs[a:b].reshape(-1)
        near = neighbours[wh_block]
        for i in range(n_batch):
            xs = dense @ on_all_channels(xp, Ws[i], Whs[i], iC).T  # [(b - a) * T, T]
            d = mus[i][None, :] ** 2 + mus_block[:, None] ** 2 - 2 * mus_block[:, None] * mus[i][None, :] * xs
            d = xp.where(near[:, Whs[i]], d, xp.inf)
            ds = xp.maximum(xp.minimum(mus_block ** 2, d.min(axis=1)), 0).reshape(b - a, T)
            ccb[i, a:b] = (xp.sqrt(ds) * ns[a:b]).sum(axis=1) / ns[a:b].sum(axis=1)
    return ccb


def sort_batches(ccb0: np.ndarray) -> np.ndarray:
    """sortBatches2.m: a 1-D embedding of the batches whose distances log(1 + dx^2) fit ccb0; returns iorig.

    The leading eigenvector's sign is chosen so the order runs forward in time where it can (Kilosort left it
    to the eigensolver), which makes the order repeatable.
    """
    n = len(ccb0)
    values, vectors = np.linalg.eigh(ccb0)
    u = vectors[:, np.argmax(np.abs(values))]
    if np.dot(u, np.arange(n) - (n - 1) / 2) < 0:
        u = -u
    xs = 0.01 * u / u.std(ddof=1)
    # the same arithmetic (bit for bit) as with fresh arrays at each step, in three reused buffers: a third faster
    # for 138 batches on the CI machine
    dx, ds, g = (np.empty((n, n)) for _ in range(3))
    for _ in range(200):
        np.subtract(xs[:, None], xs[None, :], out=dx)
        np.multiply(dx, dx, out=ds)
        np.subtract(ccb0, np.log1p(ds, out=g), out=g)  # err
        g -= g.mean()
        ds += 1
        g /= ds
        g *= dx
        xs = xs - (-g.mean(axis=1) + g.mean(axis=0))
    return np.argsort(xs, kind="stable")


def zscore_columns(ccb: np.ndarray) -> np.ndarray:
    """Per-column z-score (population std) then symmetrised; empty batches (NaN) count as maximally far."""
    ccb = np.where(np.isfinite(ccb), ccb, np.nanmax(ccb) if np.isfinite(ccb).any() else 0)
    std = ccb.std(axis=0)
    z = (ccb - ccb.mean(axis=0)) / np.where(std > 0, std, 1)
    return z + z.T


def active_last(iorig: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, int]:
    """iorig with the batches holding under a tenth of the median spike count moved to its end (order kept)."""
    active = counts >= 0.1 * np.median(counts[counts > 0]) if (counts > 0).any() else np.ones(len(counts), bool)
    return np.concatenate([iorig[active[iorig]], iorig[~active[iorig]]]), int(active.sum())


def keep_time_order(ir, n_batch: int):
    ir.iorig = np.arange(n_batch)
    ir.n_active = n_batch
    ir.ccb = ir.ccbsort = np.zeros((n_batch, n_batch), dtype=np.float32)


def run(ctx):
    ops, p, ir = ctx.ops, ctx.params, ctx.intermediate
    xp = ops.xp
    if not p.reorder or p.Nbatch < 3 or p.do_correction:  # corrected data: time order, as Kilosort 2.5
        keep_time_order(ir, p.Nbatch)
        return
    data = open_whitened(ctx)
    n_chan = len(ir.chanMap)
    n_clusters = int(math.ceil(n_chan / 2))
    iC = nearest_channels(np.asarray(ir.xc), np.asarray(ir.yc), np.asarray(ir.kcoords), min(n_chan, 17))
    neighbours = np.zeros((n_chan, n_chan), dtype=bool)
    neighbours[np.arange(n_chan)[:, None], iC] = True
    iC_d, neighbours_d = ops.asarray(iC), ops.asarray(neighbours)
    wPCA = ops.asarray(extract_pc_from_snippets(ctx, data, p.nPCs))
    rng = np.random.default_rng(p.seed)

    Ws = xp.zeros((p.Nbatch, n_clusters, iC.shape[1], p.nPCs), dtype=xp.float32)
    mus = xp.zeros((p.Nbatch, n_clusters), dtype=xp.float32)
    ns = xp.zeros((p.Nbatch, n_clusters), dtype=xp.float32)
    Whs = xp.zeros((p.Nbatch, n_clusters), dtype=xp.int64)
    # the last batch, often short, is replaced by the one before it (as in Kilosort)
    batches = [min(k, p.Nbatch - 2) for k in range(p.Nbatch)]
    counts = np.zeros(p.Nbatch, dtype=np.int64)
    group = []  # (batch index, features, centres) waiting for cluster_batches
    seeds = {}  # batch index -> the spikes that start its templates, drawn in batch order
    row_bytes = 4 * n_chan * p.nPCs + n_chan

    def cluster_group():
        if group:
            ks = np.array([k for k, _, _ in group])
            result = cluster_batches(xp, xp.concatenate([f for _, f, _ in group]),
                                     xp.concatenate([c for _, _, c in group]), counts[ks], iC_d, neighbours_d,
                                     n_clusters, np.stack([seeds[k] for k in ks]))
            for out, value in zip((Ws, mus, ns, Whs), result):
                out[ks] = value
            group.clear()

    def batch_spikes(read):
        """The spikes of the batch read (the last one stands in for the final batch): features, channels."""
        S = noise_units(ctx, read_batch(ctx, data, read))
        t, c, features = ops.pc_threshold_spikes(S, wPCA, iC_d, p.ThPre, p.nt0min)
        own = xp.flatnonzero(owned_spikes(t + p.nt0min, p, read))  # indices: one count for all the selections
        features, c = features[own], c[own]
        ops.synchronize()  # complete before the main thread's stream reads them
        return features, c

    bar = progress_bar(total=p.Nbatch, desc="reorder", enabled=ctx.show_progress)
    spikes = prefetch(on_own_streams(ops, batch_spikes), batches, DETECT_WORKERS)
    for k, (_, (features, c)) in enumerate(spikes):
        counts[k] = len(c)
        if counts[k] > n_clusters:
            seeds[k] = rng.permutation(counts[k])[:n_clusters]
            n_max = max([counts[k]] + [len(f) for _, f, _ in group])
            if (len(group) + 1) * n_max * row_bytes > CLUSTER_GROUP_BYTES:
                cluster_group()
            group.append((k, features, c))
        bar.update()
    cluster_group()
    bar.close()
    clustered = np.isin(np.arange(p.Nbatch), list(seeds))
    if not clustered.any():
        logger.warning("reorder: no batch had enough spikes to cluster; keeping the time order")
        keep_time_order(ir, p.Nbatch)
        return
    # a batch with too few spikes to cluster takes the templates of the last clustered batch before it
    last = np.maximum.accumulate(np.where(clustered, np.arange(p.Nbatch), -1))
    filled = np.flatnonzero((last >= 0) & ~clustered)
    for out in (Ws, mus, ns, Whs):
        out[filled] = out[last[filled]]
    with np.errstate(invalid="ignore", divide="ignore"):
        ccb = ops.to_host(batch_distances(xp, Ws, mus, ns, Whs, iC_d, neighbours_d))
    ccb0 = zscore_columns(ccb)
    iorig, n_active = active_last(sort_batches(ccb0), counts)
    if n_active < p.Nbatch:
        logger.info("reorder: %d of %d batches hold almost no spikes; learning starts among the others",
                    p.Nbatch - n_active, p.Nbatch)
    ir.iorig = iorig
    ir.n_active = n_active
    ir.ccb = ccb0.astype(np.float32)
    ir.ccbsort = ccb0[np.ix_(iorig, iorig)].astype(np.float32)
