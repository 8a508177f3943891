"""Cross-correlograms and Kilosort's refractoriness scores (ccg.m), shared by merges, splits and the cutoff."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import erf

N_BINS = 500
BIN = 1e-3  # s


@dataclass
class Refractoriness:
    """Q: the central correlogram over its shoulders (small: a refractory dip); R: the probability of seeing so
    few central pairs by chance (small: significant)."""

    Q: float
    R: float


def correlogram(st1: np.ndarray, st2: np.ndarray, n_bins: int = N_BINS, bin_size: float = BIN) -> np.ndarray:
    """[2*n_bins + 1] counts of ``st2 - st1`` lags (seconds), bin ``n_bins + round(lag / bin)`` (half away from
    zero), over pairs with ``|lag| < n_bins * bin``; an autocorrelogram counts each spike with itself at 0."""
    st1 = np.sort(np.asarray(st1, dtype=np.float64))
    st2 = np.sort(np.asarray(st2, dtype=np.float64))
    window = n_bins * bin_size
    counts = np.zeros(2 * n_bins + 1, dtype=np.int64)
    lo = np.searchsorted(st1, st2 - window, side="right")
    hi = np.searchsorted(st1, st2 + window, side="left")
    step = max(1, 2 ** 22 // max(1, int(np.mean(hi - lo)) + 1))
    for a in range(0, len(st2), step):  # bounded memory for long trains
        n = hi[a:a + step] - lo[a:a + step]
        second = np.repeat(np.arange(a, min(a + step, len(st2))), n)
        first = np.repeat(lo[a:a + step], n) + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
        lag = (st2[second] - st1[first]) / bin_size
        bins = (np.sign(lag) * np.floor(np.abs(lag) + 0.5)).astype(np.int64) + n_bins
        counts += np.bincount(bins, minlength=2 * n_bins + 1)[:2 * n_bins + 1]
    return counts


def refractoriness(st1: np.ndarray, st2: np.ndarray) -> Refractoriness:
    """ccg.m's scores: ``Q = min_i Qi / max(Q00, Q01)`` and ``R = min_i Ri`` over central windows of 1..10 ms."""
    K = correlogram(st1, st2).astype(np.float64)
    n = N_BINS
    n1, n2 = len(st1), len(st2)
    both = np.concatenate([np.asarray(st1, float), np.asarray(st2, float)])
    T = both.max() - both.min() if len(both) else 0.0
    rate = BIN * n1 * n2 / T if T > 0 else np.inf  # expected pairs per bin for independent trains
    far = np.r_[1:n // 2, 3 * n // 2:2 * n]  # long shoulders
    near_left, near_right = np.arange(n - 50, n - 10), np.arange(n + 11, n + 50)
    R00 = max(K[near_left].mean(), K[near_right].mean(), K[far].mean())
    K[n] = 0  # the centre bin holds self-pairs and duplicates
    Qi = np.empty(10)
    Ri = np.empty(10)
    with np.errstate(divide="ignore", invalid="ignore"):  # empty or single-instant trains give NaN scores
        Q00 = K[far].sum() / (len(far) * rate)
        Q01 = max(K[near_left].sum() / (len(near_left) * rate), K[near_right].sum() / (len(near_right) * rate))
        for i in range(1, 11):
            central = K[n - i:n + i + 1].sum()
            Qi[i - 1] = central / (2 * i * rate)
            lam = R00 * i
            Ri[i - 1] = 0.5 * (1 + erf((central / 2 - lam) / np.sqrt(2 * lam)))
        Q = np.min(Qi / max(Q00, Q01))
    return Refractoriness(Q=float(Q), R=float(np.nanmin(Ri)) if np.isfinite(Ri).any() else float("nan"))
