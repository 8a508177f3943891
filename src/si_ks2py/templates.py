"""The low-rank template model shared by learning, extraction and splits.

Template k is ``mu_k * T_k`` with ``T_k = W_k U_k'`` of rank Nrank: ``W [K, nt0, Nrank]`` temporal factors with
unit-norm columns, ``U [K, Nchan, Nrank]`` spatial factors zero outside the template's NchanNear channels,
scaled so that ``||T_k||_F = 1``. ``dWU [K, nt0, Nchan]`` (float64) is the running average of the spikes'
waveforms from which W, U, mu are re-derived. Functions take the array module ``xp`` (NumPy or CuPy) of their
inputs, so the same code runs on both devices.
"""

from __future__ import annotations

import numpy as np


def array_module(a):
    return type(a).__module__.split(".")[0] == "cupy" and __import__("cupy") or np


def alignment_kernels(nt0: int, nt0min: int, nup: int = 10, sig: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """getKernels.m: sub-sample interpolation kernels, Ka [nup, nt0] and Kb [nup, nt0, nt0] (float64).

    ``Ka[j] @ w`` interpolates w at (0-based) time ``nt0min - 0.5 + j / nup``, around the sample where
    svd_templates puts a template's peak; ``Kb[j] @ w`` shifts w so that sample a takes the value at
    ``a - 0.5 + j / nup`` (a circular Gaussian-kernel interpolation). Kilosort 2.0 took Ka one sample earlier
    (MATLAB's 1-based nt0min against its kernel's 0-based peak sample), which shifted every template by about
    0.4 samples against the spikes it was averaged from, and the residual of each subtraction then looked like
    the template's derivative (and was found as a duplicate unit on high-amplitude units).
    """
    xs = np.arange(1, nt0 + 1, dtype=np.float64)
    ys = np.linspace(0.5, nt0 + 0.5, nt0 * nup + 1)[:-1]

    def circular_distance(a, b):
        d = np.mod(a[:, None] - b[None, :] + nt0, nt0)
        return np.minimum(d, nt0 - d)

    kxx = np.exp(-circular_distance(xs, xs) ** 2 / sig ** 2)
    kyx = np.exp(-circular_distance(ys, xs) ** 2 / sig ** 2)
    B = kyx @ np.linalg.inv(kxx + 0.01 * np.eye(nt0))  # [nt0 * nup, nt0]; row j + nup*a -> time a, shift j
    B = B.reshape(nt0, nup, nt0).transpose(1, 0, 2)  # [nup, nt0 (output time), nt0]
    return np.ascontiguousarray(B[:, nt0min, :]), np.ascontiguousarray(B)


def neighbourhood_mask(iC, iW, n_chan: int, xp=np):
    """[K, Nchan] bool: channel c belongs to the neighbourhood iC[iW[k]] of template k."""
    K = len(iW)
    mask = xp.zeros((K, n_chan), dtype=bool)
    mask[xp.arange(K)[:, None], iC[iW]] = True
    return mask


#: svd_templates: a factor whose eigenvalue is under this fraction of the first's is beyond the template's rank
RANK_TOLERANCE = 1e-12


def svd_templates(dWU, W_prev, iC, iW, Ka, Kb, nt0min: int):
    """mexSVDsmall2.cu: (W, U, mu) of each template from dWU restricted to its neighbourhood.

    dWU: [K, nt0, Nchan] float64; W_prev: [K, nt0, Nrank] (only its rank is used: the top eigenvectors of the
    temporal covariance are computed exactly where Kilosort ran 100 warm-started power iterations);
    iC: [Nchan, NchanNear]; iW: [K] peak channels; Ka, Kb: alignment_kernels. W's first factor is flipped to be
    negative at nt0min, its peak circularly shifted to nt0min and sub-sample aligned with Ka/Kb (all ranks).
    Returns W [K, nt0, Nrank], U [K, Nchan, Nrank], mu [K], all float64; U is not re-projected after the
    alignment, as in Kilosort.

    The top eigenvectors of the temporal covariance B B' ([nt0, nt0], B = dWU[k] on the template's NchanNear
    channels) are B v / ||B v|| for the top eigenvectors v of the smaller B' B ([NchanNear, NchanNear]): a batch
    of 32 x 32 eigenproblems instead of 61 x 61. A factor beyond B's rank (||B v||^2 under RANK_TOLERANCE of the
    first factor's) is 0, where Kilosort's normalised power iterations left it close to 0.
    """
    xp = array_module(dWU)
    K, nt0, n_chan = dWU.shape
    n_rank = W_prev.shape[2]
    if K == 0:
        return xp.zeros((0, nt0, n_rank)), xp.zeros((0, n_chan, n_rank)), xp.zeros(0)
    near = xp.take_along_axis(dWU, iC[iW][:, None, :], axis=2)  # [K, nt0, NchanNear]
    _, vectors = xp.linalg.eigh(near.transpose(0, 2, 1) @ near)
    W = near @ vectors[:, :, ::-1][:, :, :n_rank]  # [K, nt0, min(Nrank, NchanNear)], eigenvalues descending
    squares = (W ** 2).sum(axis=1, keepdims=True)  # [K, 1, rank]: the eigenvalues
    within_rank = (squares > RANK_TOLERANCE * squares[:, :, :1]) & (squares > 0)
    W = xp.where(within_rank, W / xp.sqrt(xp.where(within_rank, squares, 1.0)), 0.0)
    W = xp.concatenate([W, xp.zeros((K, nt0, n_rank - W.shape[2]))], axis=2)
    W[:, :, 0] *= -xp.sign(W[:, nt0min, 0] + (W[:, nt0min, 0] == 0))[:, None]
    blanked = dWU * neighbourhood_mask(iC, iW, n_chan, xp)[:, None, :]
    U = blanked.transpose(0, 2, 1) @ W  # [K, Nchan, Nrank]
    mu = xp.sqrt(1e-7 + (U ** 2).sum(axis=(1, 2)))
    U /= mu[:, None, None]
    # integer alignment of the peak of |W_0| to nt0min, then sub-sample alignment
    imax = xp.abs(W[:, :, 0]).argmax(axis=1)
    src = (xp.arange(nt0)[None, :] + imax[:, None] - nt0min) % nt0
    W = xp.take_along_axis(W, src[:, :, None], axis=1)
    up = W[:, :, 0] @ xp.asarray(Ka).T  # [K, nup]
    jmax = xp.abs(up).argmax(axis=1)
    sign = xp.sign(xp.take_along_axis(up, jmax[:, None], axis=1))[:, 0]
    W = xp.asarray(Kb)[jmax] @ W
    W[:, :, 0] *= -sign[:, None]
    return W, U, mu


def peak_channels(dWU, nt0min: int):
    """iW: [K] channel of the largest |dWU| at the trough sample nt0min - 1 (0-based)."""
    return abs(dWU[:, nt0min - 1, :]).argmax(axis=1)


def channel_overlap(iC, iW, n_chan: int):
    """getMeUtU: UtU [K, K] bool, true where two templates' neighbourhoods share a channel."""
    xp = array_module(iC)
    m = neighbourhood_mask(iC, iW, n_chan, xp).astype(xp.float32)
    return (m @ m.T) > 0


def template_xcorr(W, U, pairs_a, pairs_b):
    """mexWtW2.cu: correlation of the unit-norm templates of each pair at every lag.

    ``X[p, j] = sum_t <T_a[t], T_b[t - d]>`` with ``d = j - (nt0 - 1)``, a = pairs_a[p], b = pairs_b[p]: the
    change of the projection on b at window start ``s + d`` per unit amplitude of a spike of a at s.
    W: [K, nt0, Nrank], U: [K, Nchan, Nrank]. Returns [P, 2*nt0 - 1] float32.
    """
    xp = array_module(W)
    nt0 = W.shape[1]
    length = 2 * nt0  # >= 2*nt0 - 1: no circular wrap
    Wf = xp.fft.rfft(xp.asarray(W, dtype=xp.float64), n=length, axis=1)  # [K, F, Nrank]
    out = xp.empty((len(pairs_a), 2 * nt0 - 1), dtype=xp.float32)
    step = 8192
    for s in range(0, len(pairs_a), step):
        a, b = pairs_a[s:s + step], pairs_b[s:s + step]
        uu = xp.einsum("pcr,pcq->prq", U[a], U[b])  # [P, Nrank, Nrank]
        spec = xp.einsum("prq,pfr,pfq->pf", uu, Wf[a], xp.conj(Wf[b]))
        x = xp.fft.irfft(spec, n=length, axis=1)  # x[d mod length] = sum_t T_a[t] . T_b[t - d]
        out[s:s + step] = xp.concatenate([x[:, length - nt0 + 1:], x[:, :nt0]], axis=1)
    return out


def overlap_neighbors(iC, iW, n_chan: int):
    """[K, M] int64: for each template, the templates whose neighbourhoods overlap its own (itself included),
    padded with K."""
    return neighbors_from_overlap(channel_overlap(iC, iW, n_chan))


def neighbors_from_overlap(overlap):
    """[K, M] int64 from overlap [K, K] bool: row k lists the j with overlap[k, j] in ascending order, padded with
    K (M the longest row)."""
    xp = array_module(overlap)
    a, b = xp.nonzero(overlap)
    counts = overlap.sum(axis=1)
    K = len(overlap)
    rank = xp.arange(len(a)) - xp.concatenate([xp.zeros(1, dtype=counts.dtype), xp.cumsum(counts)[:-1]])[a]
    neighbors = xp.full((K, int(counts.max()) if K else 0), K, dtype=xp.int64)
    neighbors[a, rank] = b
    return neighbors


def neighbor_xcorr(W, U, neighbors):
    """[K, M, 2*nt0 - 1] float32: template_xcorr of each template with each of its neighbours (0 on padding)."""
    xp = array_module(W)
    a, m = xp.nonzero(neighbors < len(W))
    xcorr = xp.zeros(neighbors.shape + (2 * W.shape[1] - 1,), dtype=xp.float32)
    xcorr[a, m] = template_xcorr(W, U, a, neighbors[a, m])
    return xcorr


def similarity(ops, W, U, iC, iW, n_chan: int, n_nearest: int):
    """getMeWtW (the correlations by ``ops.neighbor_xcorr``): ``simScore`` [K, K] float32 (max over lags of the
    template correlation; 0 for templates without a common channel) and ``iList`` [K, Nnearest] (the most similar
    templates of each template, itself first; indices wrap when K < Nnearest)."""
    xp = array_module(W)
    K = len(W)
    neighbors = overlap_neighbors(iC, iW, n_chan)
    xcorr = ops.neighbor_xcorr(W, U, neighbors)
    sim = xp.zeros((K, K + 1), dtype=xp.float32)  # column K absorbs the padding
    sim[xp.arange(K)[:, None], neighbors] = xcorr.max(axis=2)
    sim = sim[:, :K]
    # iList: columns of simScore sorted descending (stable), so the template itself (similarity 1) comes first
    order = xp.argsort(-sim, axis=0, kind="stable")
    ilist = order.T[:, xp.arange(n_nearest) % K] if K else xp.zeros((0, n_nearest), dtype=xp.int64)
    return {"simScore": sim, "iList": ilist}


def zero_lag_similarity(W, U):
    """getMeWtW2: [K, K] correlation of the unit-norm templates at zero lag, diagonal zeroed."""
    xp = array_module(W)
    ww = xp.einsum("atr,btq->abrq", W, W)
    uu = xp.einsum("acr,bcq->abrq", U, U)
    cc = (ww * uu).sum(axis=(2, 3))
    cc[xp.arange(len(cc)), xp.arange(len(cc))] = 0
    return cc


def triage(W, U, mu, nsp, m0: float):
    """triageTemplates2.m: keep[K] bool; drops templates under m0 spikes per batch, then each template that has a
    twin (zero-lag correlation > 0.9, amplitudes within 4*sqrt(10)) with more spikes."""
    xp = array_module(W)
    keep = nsp >= m0
    cc = zero_lag_similarity(W, U)
    close = (cc > 0.9) & (xp.abs(mu[:, None] - mu[None, :]) < 4 * np.sqrt(10)) & (nsp[:, None] < nsp[None, :])
    close &= keep[None, :]
    return keep & ~close.any(axis=1)


def dense_templates(W, U, mu=None):
    """[K, nt0, Nchan] templates ``W_k U_k'`` (times mu_k when given)."""
    xp = array_module(W)
    t = xp.einsum("ktr,kcr->ktc", W, U)
    return t if mu is None else t * mu[:, None, None]
