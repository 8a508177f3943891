"""Cross-correlograms and Kilosort's refractoriness scores (ccg.m), shared by merges, splits and the cutoff."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba
import numpy as np
from scipy.special import erf

N_BINS = 500
BIN = 1e-3  # s
PAIRS_PER_CHUNK = 2 ** 16  # pairs handled at once: bounded memory, and arrays that stay in the cache


@dataclass
class Refractoriness:
    """Q: the central correlogram over its shoulders (small: a refractory dip); R: the probability of seeing so
    few central pairs by chance (small: significant)."""

    Q: float
    R: float


def chunk_bounds(n_pairs: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive ranges [i0, i1) of rows that hold about PAIRS_PER_CHUNK of the rows' pairs each (a row alone may
    hold more); n_pairs [k] int64. Ranges without pairs are left out."""
    before = np.concatenate([[0], np.cumsum(n_pairs)])  # pairs before each row
    cuts = np.unique(np.concatenate([[0], np.searchsorted(before[1:], np.arange(PAIRS_PER_CHUNK, before[-1],
                                                                                PAIRS_PER_CHUNK)) + 1,
                                     [len(n_pairs)]]))
    return [(int(i0), int(i1)) for i0, i1 in zip(cuts[:-1], cuts[1:]) if before[i1] > before[i0]]


def range_pairs(start: np.ndarray, count: np.ndarray) -> np.ndarray:
    """int64 [count.sum()]: start[i], start[i] + 1, .., start[i] + count[i] - 1 for each i in turn; start, count [k]
    int64, count >= 0."""
    return np.arange(count.sum()) + np.repeat(start - (np.cumsum(count) - count), count)


@numba.njit(nogil=True, cache=True)
def _count_lags(st1, st2, n_bins, bin_size, counts):
    """Add to counts the lag bins of the pairs (a, b) with st2[b] - window < st1[a] < st2[b] + window; st1, st2
    sorted float64 seconds. The float operations are those of the searchsorted and rounding they replace."""
    window = n_bins * bin_size
    lo = 0
    for b in range(st2.shape[0]):
        low, high = st2[b] - window, st2[b] + window
        while lo < st1.shape[0] and st1[lo] <= low:
            lo += 1
        a = lo
        while a < st1.shape[0] and st1[a] < high:
            lag = (st2[b] - st1[a]) / bin_size
            counts[int(np.sign(lag) * np.floor(np.abs(lag) + 0.5)) + n_bins] += 1
            a += 1


def correlogram(st1: np.ndarray, st2: np.ndarray, n_bins: int = N_BINS, bin_size: float = BIN) -> np.ndarray:
    """[2*n_bins + 1] counts of ``st2 - st1`` lags (seconds), bin ``n_bins + round(lag / bin)`` (half away from
    zero), over pairs with ``|lag| < n_bins * bin``; an autocorrelogram counts each spike with itself at 0.
    Compiled, without the GIL: the split's final checks run it in threads."""
    counts = np.zeros(2 * n_bins + 1, dtype=np.int64)
    _count_lags(np.sort(np.asarray(st1, dtype=np.float64)), np.sort(np.asarray(st2, dtype=np.float64)), n_bins,
                float(bin_size), counts)
    return counts


def autocorrelograms_by_level(times: np.ndarray, clusters: np.ndarray, levels: np.ndarray, n_clusters: int,
                              n_levels: int, n_workers: int = 1, n_bins: int = N_BINS,
                              bin_size: float = BIN) -> np.ndarray:
    """[n_clusters, n_levels, 2*n_bins + 1] int64: [c, l] is ``correlogram(s, s)`` of the spikes ``s`` of cluster c
    whose level is <= l.

    times [n] float64 seconds, clusters [n] int64 in 0..n_clusters-1, levels [n] int64 in 0..n_levels (n_levels:
    in no row). Each pair of spikes is visited once, not once per level and per order as correlogram would: it
    counts in the rows from the larger of its two levels on (a cumulative sum over levels), and the lag of (b, a)
    is exactly minus that of (a, b). ``n_workers`` threads share the pairs; the counts do not depend on it."""
    window = n_bins * bin_size
    half = n_bins + 1  # bins of the lags >= 0
    stride = n_levels * half  # a cluster's block of counts: [level, lag bin]
    listed = levels < n_levels
    times, clusters, levels = times[listed], clusters[listed], levels[listed]
    # spikes by cluster, then time: a stable sort by cluster of the time order (16-bit keys sort by radix, fast)
    by_time = np.argsort(times, kind="stable")
    key_type = np.int16 if n_clusters <= 2 ** 15 else np.int64
    order = by_time[np.argsort(clusters[by_time].astype(key_type), kind="stable")]
    st = times[order]
    block = (clusters[order] * n_levels + levels[order]) * half  # where a spike's (cluster, level) row starts
    bounds = np.searchsorted(clusters[order], np.arange(n_clusters + 1))
    # A pair (a, b), a < b in this order, counts as (first a, second b) at lag st[b] - st[a] >= 0 when
    # st[a] > st[b] - window, that is a >= lo[b], and as (first b, second a) at the opposite lag when
    # st[b] < st[a] + window, that is a >= mirror_lo[b]. The two tests differ only by rounding at the window's edge.
    lo, mirror_lo = np.empty(len(st), dtype=np.int64), np.empty(len(st), dtype=np.int64)

    def window_starts(c):
        start, stop = bounds[c], bounds[c + 1]
        own = st[start:stop]
        lo[start:stop] = start + np.searchsorted(own, own - window, side="right")
        mirror_lo[start:stop] = start + np.searchsorted(own + window, own, side="right")

    def pair_keys(a, b_times, b_blocks):
        """Flat index into [cluster, level, lag bin] of the pairs (a, b): the larger level, the bin of st[b] - st[a]."""
        lag = b_times - st[a]
        lag /= bin_size
        lag += 0.5
        key = lag.astype(np.int64)  # lag >= 0: truncation rounds half up, as correlogram's bins do
        key += np.maximum(block[a], b_blocks)
        return key

    def chunk_counts(rows):
        """(offset, counts) of the pairs (a, b), lo[b] <= a < b, of the rows b in [i0, i1)."""
        i0, i1 = rows
        n = np.arange(i0, i1) - lo[i0:i1]
        key = pair_keys(range_pairs(lo[i0:i1], n), np.repeat(st[i0:i1], n), np.repeat(block[i0:i1], n))
        first, end = block[i0] // stride * stride, (block[i1 - 1] // stride + 1) * stride  # the rows' clusters
        key -= first
        return first, np.bincount(key, minlength=end - first)

    forward = np.zeros(n_clusters * stride, dtype=np.int64)  # (first a, second b): lags >= 0
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        list(pool.map(window_starts, np.flatnonzero(np.diff(bounds))))
        for first, chunk in pool.map(chunk_counts, chunk_bounds(np.arange(len(st)) - lo)):
            forward[first:first + len(chunk)] += chunk
    forward = forward.reshape(n_clusters, n_levels, half)
    counts = np.empty((n_clusters, n_levels, 2 * n_bins + 1), dtype=np.int64)
    counts[..., n_bins + 1:] = forward[..., 1:]
    counts[..., n_bins::-1] = forward  # the same pairs the other way round
    counts[..., n_bins] += forward[..., 0] + np.bincount(block // half,  # each spike with itself
                                                         minlength=n_clusters * n_levels).reshape(n_clusters, n_levels)
    # the other way round, rows whose two window tests disagree: pairs in [mirror_lo, lo) count, [lo, mirror_lo) not
    edge = np.flatnonzero(mirror_lo != lo)
    for sign, start, stop in ((1, mirror_lo[edge], lo[edge]), (-1, lo[edge], mirror_lo[edge])):
        n = np.maximum(stop - start, 0)
        b = np.repeat(edge, n)
        row, lag_bin = np.divmod(pair_keys(range_pairs(start, n), st[b], block[b]), half)
        np.add.at(counts.reshape(-1, 2 * n_bins + 1), (row, n_bins - lag_bin), sign)
    for row in range(1, n_levels):  # row by row: faster than a cumulative sum over the middle axis
        counts[:, row] += counts[:, row - 1]
    return counts


def _python_max(first, *others):
    """Elementwise ``max(first, *others)`` as Python's max decides it (a later value wins only when greater, so
    NaN handling matches the scalar code this replaced)."""
    result = first
    for other in others:
        result = np.where(other > result, other, result)
    return result


def refractoriness_scores(K: np.ndarray, n1, n2, T) -> tuple[np.ndarray, np.ndarray]:
    """ccg.m's scores from correlograms: ``Q = min_i Qi / max(Q00, Q01)`` and ``R = min_i Ri`` over central
    windows of 1..10 ms.

    K [..., 2*N_BINS + 1] int64 counts; n1, n2 the two trains' spike counts and T (s) the span of both trains
    together, each broadcastable to K.shape[:-1]. Returns (Q, R), float64 arrays of shape K.shape[:-1]; NaN where a
    train is empty or all its spikes fall on one instant."""
    n = N_BINS
    T = np.asarray(T, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = np.where(T > 0, BIN * n1 * n2 / T, np.inf)  # expected pairs per bin for independent trains
    # sums of integer counts are exact, whatever their order, so they equal ccg.m's float sums and means
    far = (1, n // 2), (3 * n // 2, 2 * n)  # long shoulders
    near_left, near_right = (n - 50, n - 10), (n + 11, n + 50)
    far_sum = sum(K[..., i:j].sum(-1) for i, j in far).astype(np.float64)
    left_sum = K[..., near_left[0]:near_left[1]].sum(-1).astype(np.float64)
    right_sum = K[..., near_right[0]:near_right[1]].sum(-1).astype(np.float64)
    n_far = sum(j - i for i, j in far)
    n_left, n_right = near_left[1] - near_left[0], near_right[1] - near_right[0]
    R00 = _python_max(left_sum / n_left, right_sum / n_right, far_sum / n_far)
    # central windows of 1..10 bins each side, the centre bin left out (self-pairs and duplicates)
    central = (np.cumsum(K[..., n - 1:n - 11:-1], axis=-1) + np.cumsum(K[..., n + 1:n + 11], axis=-1)).astype(
        np.float64)
    windows = np.arange(1, 11)
    with np.errstate(divide="ignore", invalid="ignore"):  # empty or single-instant trains give NaN scores
        Q00 = far_sum / (n_far * rate)
        Q01 = _python_max(left_sum / (n_left * rate), right_sum / (n_right * rate))
        Qi = central / (2 * windows * rate[..., None])
        lam = R00[..., None] * windows
        Ri = 0.5 * (1 + erf((central / 2 - lam) / np.sqrt(2 * lam)))
        Q = np.min(Qi / _python_max(Q00, Q01)[..., None], axis=-1)
    return Q, np.fmin.reduce(Ri, axis=-1)  # the smallest of the defined Ri (each in [0, 1]); NaN if none is


def refractoriness(st1: np.ndarray, st2: np.ndarray) -> Refractoriness:
    """refractoriness_scores of the cross-correlogram of two spike trains (seconds)."""
    both = np.concatenate([np.asarray(st1, float), np.asarray(st2, float)])
    T = both.max() - both.min() if len(both) else 0.0
    Q, R = refractoriness_scores(correlogram(st1, st2), len(st1), len(st2), T)
    return Refractoriness(Q=float(Q), R=float(R))
