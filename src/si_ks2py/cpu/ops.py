"""NumPy twins of the GPU ops (same names, signatures and outputs as si_ks2py.gpu.ops).

Arrays are C-ordered; a batch of traces is [n_samples, n_channels] (time rows).
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from scipy import fft as sfft
from scipy import ndimage

from .. import templates as tm
from .. import io as batch_io

# scipy.signal is imported where it is used: it takes about half a second to import, and a GPU sort, which imports
# this module for the split's host path, never calls the two functions that use it.

xp = np
name = "cpu"


def asarray(a, dtype=None):
    return np.asarray(a, dtype=dtype)


def staged(a):
    """A copy of a host array (on the GPU, in page-locked memory for a fast transfer; here it forces a read-ahead
    thread to read the pages of a memory-mapped file)."""
    return np.array(a)


def empty_staged(shape, dtype):
    """An uninitialised host array to read into (on the GPU, page-locked)."""
    return np.empty(shape, dtype)


def to_host(a):
    return np.asarray(a)


def copy_to_host(a, out: np.ndarray):
    """Copy ``a`` into the host array ``out`` (same shape and dtype)."""
    out[...] = a


def pin_host(array: np.ndarray):
    """Nothing to page-lock without a device (on the GPU, cudaHostRegister): returns None, nothing to unpin."""
    return None


def prefetch_to_device(read, items, depth: int = 2):
    """Yield ``(item, read(item))`` in order, read ahead by a background thread (the host is the device here; the
    GPU twin copies ahead into device buffers, each valid until the next item is asked for)."""
    return batch_io.prefetch(read, items)


def synchronize():
    pass


def release_memory():
    """Nothing to release on the host (on the GPU, the memory pool's cached blocks)."""


def worker_stream():
    """A context in which a thread queues its work (on the GPU, a stream of its own; here nothing)."""
    return contextlib.nullcontext()


def filtfilt_zero_state(x, b, a):
    """Forward then backward IIR filtering along time with zero initial state and no padding (gpufilter.m).

    x: [n, C] float32. b, a: 1-D float64 transfer-function coefficients of equal length <= 7.
    Returns [n, C] float32. Not scipy's filtfilt, which pads the edges: the zero state leaves transients at
    both ends, which is why batches are read with buffers.
    """
    from scipy import signal

    y = signal.lfilter(b, a, np.asarray(x, dtype=np.float64), axis=0)
    y = signal.lfilter(b, a, y[::-1], axis=0)[::-1]
    return np.ascontiguousarray(y, dtype=np.float32)


def running_min(x, half_width: int, axis: int):
    """Minimum over a window of +-half_width along ``axis``, +inf beyond the edges (my_min.m). x: 2-D float32."""
    return ndimage.minimum_filter1d(x, 2 * half_width + 1, axis=axis, mode="constant", cval=np.inf)


def column_sums(x):
    """Sums over axis 0 of x [n, C] (any dtype; exact for counts below 2**24) as float32 [1, C], by BLAS: a
    reduction along the rows of a time-major batch is several times slower."""
    x = np.asarray(x)
    return np.ones((1, x.shape[0]), dtype=np.float32) @ x.astype(np.float32, copy=False)


def row_median(x):
    """Median of each row of x [n, C] float32 (the common median reference over channels): [n, 1] float32; for an
    even C the mean of the two middle values."""
    return np.median(np.asarray(x, dtype=np.float32), axis=1, keepdims=True)


def running_sum(x, half_width: int, axis: int):
    """Sum over a window of +-half_width along ``axis``, zero beyond the edges (my_sum.m). x: 2-D float32."""
    c = np.cumsum(np.asarray(x, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    hi = np.minimum(np.arange(n) + half_width + 1, n)
    lo = np.maximum(np.arange(n) - half_width, 0)
    return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)).astype(np.float32)


def _maximum_filter(x, half_width: int):
    """Running maximum over +-half_width along axis 0 of a 1-D or 2-D array, -inf beyond the edges."""
    return ndimage.maximum_filter1d(x, 2 * half_width + 1, axis=0, mode="constant", cval=-np.inf)


def correlate_valid(x, filters):
    """out[t, c, f] = sum_i filters[i, f] * x[t + i, c] for t <= n - nt0, 0 beyond.

    x: [n, C] float32; filters: [nt0, F] float32. Returns [n, C, F] float32 (FFT correlation).
    """
    n, C = x.shape
    nt0 = filters.shape[0]
    length = sfft.next_fast_len(n + nt0 - 1, real=True)
    spectrum = sfft.rfft(x, n=length, axis=0, workers=-1)
    kernel = sfft.rfft(np.asarray(filters, dtype=np.float32)[::-1], n=length, axis=0)
    out = sfft.irfft(spectrum[:, :, None] * kernel[:, None, :], n=length, axis=0, workers=-1)[nt0 - 1:nt0 - 1 + n]
    out[n - nt0 + 1:] = 0
    return np.ascontiguousarray(out, dtype=np.float32)


def _peaks(err, threshold, lockout):
    """Local maxima of err above threshold**2: err[t] >= err within +-lockout and > err in [t - lockout, t).

    The strict test on the left breaks exact ties toward the earliest sample, so peaks are > lockout apart.
    """
    above = err > threshold * threshold
    if not above.any():
        return np.zeros(0, dtype=np.int64)
    local = err >= _maximum_filter(err, lockout)
    left = np.concatenate([np.full(1, -np.inf, dtype=err.dtype), err[:-1]])
    left_max = ndimage.maximum_filter1d(left, lockout, origin=(lockout - 1) // 2, mode="constant", cval=-np.inf)
    return np.flatnonzero(above & local & (err > left_max))


def local_peaks(norm, iC, threshold: float, nt0: int, nt0min: int):
    """Where ``norm`` [n, C] float32 (>= 0, a score per window start and channel or grid point) peaks: at (t, c)
    when norm[t, c] is the maximum over [t - nt0min + 1, t - nt0min + nt0] on c, exceeds ``threshold``, and no
    neighbour iC[c, 1:] ([C, n_near] int, itself first) has a larger such maximum; window starts t <= n - nt0.
    Returns (t, c) int64, sorted by (time, channel)."""
    n = norm.shape[0]
    # forward window max: wmax[s, c] = max(P[s:s+nt0, c]); a peak at t is the max of the window s = t - nt0min + 1
    wmax = ndimage.maximum_filter1d(norm, nt0, axis=0, origin=-(nt0 // 2), mode="constant", cval=0)
    wmax = np.where(wmax > threshold, wmax, 0)
    at_peak = np.zeros_like(norm, dtype=bool)
    s = np.arange(n) - nt0min + 1  # window whose offset nt0min - 1 is t
    valid = (s >= 0) & (np.arange(n) <= n - nt0)
    # compared in float64, as Kilosort's CUDA (a double literal): in float32 the 1e-6 vanishes for norms above 32
    peak_of_window = norm[valid].astype(np.float64) > wmax[s[valid]].astype(np.float64) - 1e-6
    at_peak[valid] = peak_of_window & (wmax[s[valid]] > threshold)
    t, c = np.nonzero(at_peak)
    if len(t) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    win = wmax[s[t], c]
    neighbour_max = wmax[s[t][:, None], iC[c][:, 1:]].max(axis=1) if iC.shape[1] > 1 else np.zeros_like(win)
    keep = neighbour_max <= win
    t, c = t[keep], c[keep]
    order = np.lexsort((c, t))
    return t[order].astype(np.int64), c[order].astype(np.int64)


def pc_threshold_spikes(data, wPCA, iC, threshold: float, nt0min: int):
    """Spikes whose PC-projection norm peaks above ``threshold``, with their PC features (mexThSpkPC.cu).

    data: [n, Nchan] float32 whitened batch. wPCA: [nt0, nPCs] float32. iC: [Nchan, NchanNear] int nearest channels
    (itself first). The projection norm ``P[t, c] = ||wPCA' data[t:t+nt0, c]||`` is computed for window starts
    t <= n - nt0; a spike sits where it peaks (local_peaks).
    Returns (times [n_spikes] int64: window starts, channels [n_spikes] int64, features [n_spikes, NchanNear,
    nPCs] float32: the projections of the window at ``times`` on the neighbour channels), sorted by (time, channel).
    """
    projections = correlate_valid(data, wPCA)  # [n, Nchan, nPCs]
    norm = np.sqrt((projections.astype(np.float64) ** 2).sum(axis=2)).astype(np.float32)
    t, c = local_peaks(norm, iC, threshold, wPCA.shape[0], nt0min)
    if len(t) == 0:
        return t, c, np.zeros((0, iC.shape[1], wPCA.shape[1]), np.float32)
    features = projections[t[:, None], iC[c], :]
    return t, c, np.ascontiguousarray(features)


GRID_ROWS_PER_CHUNK = 2048  # window starts of grid_amplitudes' gathered responses at a time


def grid_amplitudes(filtered, iC, weights, threshold: float):
    """Matched-filter amplitudes of generic templates on a grid (sumChannels of Kilosort 2.5's spikedetector3.cu).

    filtered: [n, C, R] float32, each channel correlated with R temporal prototypes (correlate_valid); iC: [G, J]
    int, the channels of each grid point's footprints; weights: [G, J, S] float32, S spatial footprints of unit
    norm. Returns amp [n, G] float32 = max over (r, s) of max(0, sum_j weights[g, j, s] filtered[t, iC[g, j], r])
    where that exceeds ``threshold``, else 0.

    Only the window starts where the J largest squared responses of some prototype sum to more than threshold^2
    are computed: by Cauchy-Schwarz (unit-norm footprints) no amplitude elsewhere exceeds the threshold, and
    whitened noise rarely passes, so most of the (slow, on the CPU) gathers are skipped.
    """
    n, C, R = filtered.shape
    G, J, S = weights.shape
    out = np.zeros((n, G), dtype=np.float32)
    squares = filtered * filtered
    top = np.partition(squares, C - J, axis=1)[:, C - J:].sum(axis=1) if J < C else squares.sum(axis=1)
    rows = np.flatnonzero((top > threshold * threshold).any(axis=1))
    w = np.ascontiguousarray(weights.astype(np.float32))  # [G, J, S]
    for start in range(0, len(rows), GRID_ROWS_PER_CHUNK):
        chunk = rows[start:start + GRID_ROWS_PER_CHUNK]
        gathered = filtered[chunk][:, iC]  # [m, G, J, R]
        scores = np.matmul(gathered.transpose(1, 0, 3, 2), w[:, None])  # [G, m, R, S]
        best = scores.reshape(G, len(chunk), R * S).max(axis=2).T  # [m, G]
        out[chunk] = np.where(best > threshold, best, 0)
    return out


def prototype_spikes(data, wTEMP, iC, n_sum: int, threshold: float, channel_spacing: int = 5):
    """New-template seeds in a (residual) batch: events that match a prototype waveform (mexGetSpikes2.cu).

    data: [n, Nchan] float32; wTEMP: [nt0, NrankPC] float32 prototypes; iC: [Nchan, >= n_sum] nearest channels.
    For each window start t and channel i, the prototype projections summed over the j + 1 nearest channels
    score ``S^2 / (j + 1)``; the best score over prototypes and j <= n_sum - 1 is ``dout[t, i]`` and
    ``err[t] = max_i dout[t, i]``. A seed is a local maximum of err over +-(nt0-1) above threshold**2; of seeds
    whose channels are less than ``channel_spacing`` indices apart only the strongest is kept.
    Returns (times [n_new] int64 window starts, channels [n_new] int64), sorted by time.
    """
    n, n_chan = data.shape
    nt0 = wTEMP.shape[0]
    n_rank = wTEMP.shape[1]
    filtered = correlate_valid(data, wTEMP).transpose(0, 2, 1).reshape(n * n_rank, n_chan)
    best = np.zeros((n, n_chan), dtype=np.float32)
    for j in range(n_sum):  # sums over the j + 1 nearest channels as one matrix product per j
        nearest = np.zeros((n_chan, n_chan), dtype=np.float32)
        nearest[iC[:, :j + 1], np.arange(n_chan)[:, None]] = 1
        summed = (filtered @ nearest).reshape(n, n_rank, n_chan)
        np.maximum(best, (summed ** 2).max(axis=1) / np.float32(j + 1), out=best)
    err = best.max(axis=1)
    best_channel = best.argmax(axis=1)
    err[n - nt0 + 1:] = 0
    t = _peaks(err, threshold, nt0 - 1)
    c = best_channel[t]
    x = err[t]
    # cleanup_heights: no stronger seed on a channel less than channel_spacing indices away
    stronger = (np.abs(c[:, None] - c[None, :]) < channel_spacing) & (x[None, :] > x[:, None])
    keep = ~stronger.any(axis=1)
    return t[keep], c[keep]


def svd_templates(dWU, W_prev, iC, iW, Ka, Kb, nt0min: int):
    """mexSVDsmall2.cu: (W, U, mu) of each template from its running average; see templates.svd_templates."""
    return tm.svd_templates(dWU, W_prev, iC, iW, Ka, Kb, nt0min)


def neighbor_xcorr(W, U, neighbors):
    """[K, M, 2*nt0 - 1] float32: the correlation at every lag (templates.template_xcorr, by FFT) of each template
    with each of its neighbours (neighbors [K, M] int64, padded with K; 0 on padding). W: [K, nt0, Nrank], U:
    [K, Nchan, Nrank] float32."""
    return tm.neighbor_xcorr(W, U, neighbors)


def _template_projections(data, W, U):
    """B [n + 1, K + 1] float32: <T_k, data[t:t+nt0]> for window starts t <= n - nt0, 0 beyond, with a scratch row
    (n) and column (K) that absorb the padded neighbour entries of match_pursuit's updates."""
    n, n_chan = data.shape
    K, nt0, _ = W.shape
    B = np.zeros((n + 1, K + 1), dtype=np.float32)
    spatial = (data @ U.transpose(1, 0, 2).reshape(n_chan, -1)).reshape(n, K, -1)  # [n, K, Nrank]
    for a in range(0, K, 64):  # per chunk of templates: FFT correlation of each spatial trace with its own W
        b = min(K, a + 64)
        length = sfft.next_fast_len(n + nt0 - 1, real=True)
        spec = sfft.rfft(spatial[:, a:b], n=length, axis=0, workers=-1)
        kern = sfft.rfft(W[a:b, ::-1, :].transpose(1, 0, 2), n=length, axis=0)
        B[:n, a:b] = sfft.irfft((spec * kern).sum(axis=2), n=length, axis=0, workers=-1)[nt0 - 1:nt0 - 1 + n]
    B[n - nt0 + 1:] = 0
    return B


def match_pursuit(data, W, U, mu, neighbors, xcorr, threshold: float, lam: float, n_iter: int,
                  feature_templates=None):
    """Template matching pursuit on one batch (mexMPnu8.cu).

    data: [n, Nchan] float32 whitened batch. W: [K, nt0, Nrank] temporal and U: [K, Nchan, Nrank] spatial factors of
    the unit-norm templates ``T_k = W_k U_k'``; mu: [K] template amplitudes. neighbors: [K, M] int64, the templates
    whose channels overlap template k's (padded with K); xcorr: [K, M, 2*nt0-1] float32, the correlation of T_k at
    window start s with T_neighbors[k, m] at window start s + j - (nt0 - 1) (see template_xcorr).

    Projections ``B[t, k] = <T_k, data[t:t+nt0]>`` for window starts t <= n - nt0; cost
    ``C = (max(0, B) + lam*mu)^2 / (1 + lam) - lam*mu^2``; ``err[t] = max(0, max_k C[t, k])``. Each iteration takes
    every local maximum of err over +-(nt0 - 1) above threshold**2 as a spike (template argmax_k C, amplitude
    y = B, score x = sqrt(err)), subtracts ``y * T`` from the residual and updates B where it changed (through
    xcorr, exact by linearity); it stops after n_iter iterations or when an iteration finds no spike.
    With feature_templates ([K, Nnearest] int64), each spike's template features are
    ``max(0, max_{tau in [-3, 2]} (B[st + tau, f] + lam/mu_f) / sqrt(1 + lam/mu_f^2))`` for f in its template's
    row, from B at detection (extractFEAT).
    Returns (st [n_spikes] int64 window starts, id [n_spikes] int64, y [n_spikes] float32, x [n_spikes] float32,
    residual [n, Nchan] float32, features [n_spikes, Nnearest] float32 or None); spikes sorted by time.
    """
    n = data.shape[0]
    K, nt0, _ = W.shape
    if K == 0:
        return (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32),
                np.array(data, dtype=np.float32), None if feature_templates is None else np.zeros((0, 0), np.float32))
    lockout = nt0 - 1
    last = n - nt0  # last window start
    templates = np.einsum("ktr,kcr->ktc", W, U).astype(np.float32)  # [K, nt0, Nchan]
    B = _template_projections(data, W, U)
    mu = np.asarray(mu, dtype=np.float32)
    lam_mu = np.float32(lam) * mu

    def cost(rows):
        c = (np.maximum(B[rows, :K], 0) + lam_mu) ** 2 / np.float32(1 + lam) - lam_mu * mu
        return c.max(axis=1), c.argmax(axis=1)

    err = np.zeros(n, dtype=np.float32)
    ftype = np.zeros(n, dtype=np.int64)
    rows = np.arange(last + 1)
    best, ftype[rows] = cost(rows)
    err[rows] = np.maximum(best, 0)
    residual = np.array(data, dtype=np.float32)
    offsets = np.arange(2 * nt0 - 1) - (nt0 - 1)
    found = {"st": [], "id": [], "y": [], "x": [], "feat": []}
    for _ in range(n_iter):
        st = _peaks(err, threshold, lockout)
        if len(st) == 0:
            break
        ids = ftype[st]
        y = B[st, ids]
        found["st"].append(st)
        found["id"].append(ids)
        found["y"].append(y)
        found["x"].append(np.sqrt(err[st]))
        if feature_templates is not None:
            f = feature_templates[ids]  # [s, Nnearest]
            t = np.clip(st[:, None] + np.arange(-3, 3)[None, :], 0, last)  # [s, 6]
            b = B[t[:, :, None], f[:, None, :]]  # [s, 6, Nnearest]
            found["feat"].append(np.maximum(0, ((b + lam / mu[f][:, None, :])
                                                / np.sqrt(1 + lam / mu[f][:, None, :] ** 2)).max(axis=1)))
        # windows of one iteration's spikes are disjoint (peaks are > lockout apart)
        win = st[:, None] + np.arange(nt0)[None, :]
        residual[win] -= y[:, None, None] * templates[ids]
        # update B; spikes of the same parity are >= 2*nt0 apart, so their update windows are disjoint
        for parity in (0, 1):
            sel = slice(parity, None, 2)
            t = st[sel, None] + offsets[None, :]  # [s, 2nt0-1]
            t = np.where((t >= 0) & (t <= last), t, n)
            B[t[:, :, None], neighbors[ids[sel]][:, None, :]] -= (
                y[sel, None, None] * xcorr[ids[sel]].transpose(0, 2, 1))
        B[n] = 0
        B[:, K] = 0
        rows = np.unique(np.clip(st[:, None] + offsets[None, :], 0, last))
        best, ftype[rows] = cost(rows)
        err[rows] = np.maximum(best, 0)
    if not found["st"]:
        st = np.zeros(0, np.int64)
        feats = None if feature_templates is None else np.zeros((0, feature_templates.shape[1]), np.float32)
        return st, st.copy(), np.zeros(0, np.float32), np.zeros(0, np.float32), residual, feats
    st, ids, y, x = (np.concatenate(found[k]) for k in ("st", "id", "y", "x"))
    order = np.argsort(st, kind="stable")
    feats = np.concatenate(found["feat"])[order].astype(np.float32) if feature_templates is not None else None
    return st[order], ids[order], y[order].astype(np.float32), x[order].astype(np.float32), residual, feats


def accumulate_templates(residual, st, ids, y, W, U, n_templates: int, selected=None):
    """Per-template sums of the spikes' clean waveforms (average_snips in mexMPnu8.cu).

    residual: [n, Nchan] float32; st, ids, y: [n_spikes] window starts, templates, amplitudes; W [K, nt0, Nrank],
    U [K, Nchan, Nrank]; selected: [n_spikes] bool, the spikes to sum (None: all of them).
    ``dWU0[k] = sum over spikes of k of residual[st:st+nt0] + y * T_k`` in float64.
    Returns (dWU0 [K, nt0, Nchan] float64, counts [K] int64).
    """
    if selected is not None:
        st, ids, y = st[selected], ids[selected], y[selected]
    K, nt0, _ = W.shape
    dwu = np.zeros((n_templates, nt0, residual.shape[1]), dtype=np.float64)
    counts = np.bincount(ids, minlength=n_templates).astype(np.int64)
    if len(st) == 0:
        return dwu, counts
    order = np.lexsort((st, ids))
    st, ids, y = st[order], ids[order], y[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    chunk = max(1, 2 ** 23 // (nt0 * residual.shape[1]))
    for a in range(0, len(st), chunk):  # bounded memory; sums are in spike order, so deterministic
        b = min(len(st), a + chunk)
        windows = residual[st[a:b, None] + np.arange(nt0)[None, :]].astype(np.float64)
        seg = starts[(starts >= a) & (starts < b)] - a
        seg = np.r_[0, seg] if len(seg) == 0 or seg[0] != 0 else seg
        np.add.at(dwu, ids[a:b][seg], np.add.reduceat(windows, seg, axis=0))
    amplitude_sum = np.bincount(ids, weights=y.astype(np.float64), minlength=n_templates)
    dwu += amplitude_sum[:, None, None] * np.einsum("ktr,kcr->ktc", W, U).astype(np.float64)
    return dwu, counts


def pc_features(residual, st, ids, y, W, U, channels, wPCA):
    """PC features of each spike's clean waveform on its template's channels (computePCfeatures in mexMPnu8.cu).

    residual: [n, Nchan] float32; st, ids, y: [n_spikes]; W [K, nt0, Nrank], U [K, Nchan, Nrank];
    channels: [K, NchanNear] int64 channels of each template; wPCA: [nt0, nPCs] float32.
    ``features[s, p, j] = sum_t (residual[st + t, ch_j] + y * T_id[t, ch_j]) * wPCA[t, p]`` with ch = channels[id].
    Returns [n_spikes, nPCs, NchanNear] float32 (Phy's pc_features layout).
    """
    nt0 = W.shape[1]
    own = np.einsum("ktr,kjr,tp->kpj", W, np.take_along_axis(U, channels[:, :, None], axis=1), wPCA)
    out = np.empty((len(st), wPCA.shape[1], channels.shape[1]), dtype=np.float32)
    chunk = max(1, 2 ** 22 // (nt0 * channels.shape[1]))
    for a in range(0, len(st), chunk):
        b = min(len(st), a + chunk)
        win = residual[st[a:b, None, None] + np.arange(nt0)[None, :, None], channels[ids[a:b]][:, None, :]]
        out[a:b] = np.einsum("stj,tp->spj", win, wPCA) + y[a:b, None, None] * own[ids[a:b]]
    return out


# ---------------------------------------------------------------------------------------------------------------
# splits


def _segment_bounds(counts) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])


def segment_sum(x, counts):
    """Sums of the rows of each segment.

    x: [N, ...] (the rows of S segments one after the other); counts: [S] int64 rows per segment (host).
    Returns [S, ...].
    """
    bounds = _segment_bounds(counts)
    out = np.empty((len(counts),) + x.shape[1:], dtype=x.dtype)
    for s in range(len(counts)):
        out[s] = x[bounds[s]:bounds[s + 1]].sum(axis=0)
    return out


def segment_gram(x, counts, weight):
    """Weighted Gram matrix of each segment, ``sum_i weight_i x_i x_i'`` over its rows.

    x: [N, d] float64; counts: [S] int64 (host); weight: [N] float64. Returns [S, d, d] float64.
    """
    bounds = _segment_bounds(counts)
    out = np.empty((len(counts), x.shape[1], x.shape[1]))
    for s in range(len(counts)):
        rows = x[bounds[s]:bounds[s + 1]]
        out[s] = rows.T @ (rows * weight[bounds[s]:bounds[s + 1], None])
    return out


def _running_mean(x, sigma: float):
    from scipy import signal

    radius = int(4 * sigma + 0.5)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    smooth = signal.fftconvolve(x, kernel[:, None], mode="same", axes=0)
    weight = signal.fftconvolve(np.ones(len(x)), kernel, mode="same")
    return smooth / weight[:, None]


def segment_running_mean(x, counts, sigma: float):
    """my_conv2.m along axis 0 within each segment: Gaussian smoothing (+-4 sigma) renormalised at the segment's
    edges (FFT convolution).

    x: [N, d] float64; counts: [S] int64 (host). Returns [N, d] float64.
    """
    bounds = _segment_bounds(counts)
    out = np.empty_like(x, dtype=np.float64)
    for s in range(len(counts)):
        if bounds[s + 1] > bounds[s]:
            out[bounds[s]:bounds[s + 1]] = _running_mean(x[bounds[s]:bounds[s + 1]], sigma)
    return out


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _mixture_em_step(x, p, mu1, mu2, s1, s2, rs):
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


def segment_em_step(x, counts, params, rs, active):
    """One EM step of a 1-D two-Gaussian mixture (weights p, 1 - p) in each active segment (compiled).

    x: [N] float64; counts: [S] int64 (host); params: [S, 5] float64 (p, mu1, mu2, s1, s2); rs: [N, 2] float64,
    the responsibilities, overwritten in the active segments' rows; active: [S] bool. Returns the new params
    [S, 5] float64 (an inactive segment's unchanged).
    """
    bounds = _segment_bounds(counts)
    out = np.array(params, dtype=np.float64)
    for s in np.flatnonzero(active):
        a, b = bounds[s], bounds[s + 1]
        out[s] = _mixture_em_step(x[a:b], *(float(v) for v in params[s]), rs[a:b])
    return out
