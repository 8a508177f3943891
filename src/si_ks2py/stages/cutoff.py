"""Per-cluster score threshold and good/mua labels (set_cutoff.m).

For each cluster the threshold on the spikes' score (sqrt of the matching cost, st3 column 3) is lowered from
Th[0] to Th[1] in steps of 0.5 while the autocorrelogram of the spikes above it stays refractory (``Q`` under
the contamination bound, 0.1 or tighter for a clean unit, and ``R < 0.05``); spikes at or under the last
accepted threshold are dropped. A cluster that passed at least one level is "good", else "mua" (and keeps only
spikes scoring above Th[0] + 0.5). ``est_contam_rate`` is Q at the kept threshold (1 when undefined).

The autocorrelograms of every threshold a cluster can reach come from one pass over its spike pairs
(``autocorrelograms_by_level``) and their scores from one vectorised call for all clusters; the walk down the
thresholds then only reads the table. Results equal those of rescoring the spikes above each threshold.

Outputs: ``st3_c`` (kept spikes), ``keep_c`` (their rows in st3_s, to select features), ``good`` [K] bool,
``est_contam_rate`` [K], ``Ths`` [K] (NaN for clusters without spikes).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from ..correlograms import autocorrelograms_by_level, refractoriness_scores

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3_c", "keep_c", "good", "est_contam_rate", "Ths")
FILES = ()
FILE_INPUTS = ()


def threshold_steps(th_high: float, th_low: float) -> list[float]:
    """The thresholds the walk tries (th_high, then 0.5 lower by the same float steps while >= th_low), followed
    by the first one under th_low."""
    steps = [th_high]
    while steps[-1] >= th_low:
        steps.append(steps[-1] - 0.5)
    return steps


def walk_thresholds(steps, Q, R, counts):
    """The walk of set_cutoff.m for one cluster: (stop, good), where ``stop`` indexes ``steps`` at the first
    threshold that failed (or the one under th_low). Q, R, counts are given per step (all but the last)."""
    contamination_bound = 0.1
    good = False
    for i in range(len(steps) - 1):
        if counts[i] == 0:
            continue
        if not (Q[i] <= contamination_bound and R[i] <= 0.05):
            return i, good
        if i == 0 and Q[i] < 0.05:
            contamination_bound = min(0.05, max(0.01, 2 * Q[i]))  # a unit that starts clean must stay clean
        good = True
    return len(steps) - 1, good


def counts_and_spans(times: np.ndarray, clusters: np.ndarray, levels: np.ndarray, n_clusters: int, n_levels: int):
    """[n_clusters, n_levels] each: the number of a cluster's spikes of level <= l, and the time from the first to
    the last of them (ccg.m's T; 0 without spikes). times [n] s, clusters [n] and levels [n] int64 (n_levels: in
    no level)."""
    key = clusters * (n_levels + 1) + levels
    shape = (n_clusters, n_levels + 1)
    counts = np.cumsum(np.bincount(key, minlength=shape[0] * shape[1]).reshape(shape), axis=1)[:, :n_levels]
    earliest, latest = np.full(shape[0] * shape[1], np.inf), np.full(shape[0] * shape[1], -np.inf)
    np.minimum.at(earliest, key, times)
    np.maximum.at(latest, key, times)
    first = np.minimum.accumulate(earliest.reshape(shape), axis=1)[:, :n_levels]
    last = np.maximum.accumulate(latest.reshape(shape), axis=1)[:, :n_levels]
    return counts, np.where(counts > 0, last - first, 0.0)


def set_cutoff(st3: np.ndarray, n_templates: int, Th: list[float], fs: float, n_workers: int = 1):
    """(kept rows of st3, good [K], est_contam_rate [K], thresholds [K]); st3 [n, 5] float64 as extract writes it
    (sample, template, amplitude, score, batch rank). ``n_workers`` threads count the spike pairs."""
    labels = st3[:, 1].astype(np.int64)
    scores = st3[:, 3]
    steps = threshold_steps(Th[0], Th[-1])
    # every threshold whose scores the walk may read: the steps it tries and each step + 0.5, where it may stop
    finals = [th + 0.5 for th in steps]
    grid = np.array(sorted(set(steps[:-1]) | set(finals), reverse=True))
    column = {th: i for i, th in enumerate(grid.tolist())}
    tried = [column[th] for th in steps[:-1]]
    n_levels = len(grid)

    # a spike's level: the first grid threshold it scores above (it is above every later one: the grid descends)
    level = np.full(len(st3), n_levels)
    for th in grid:
        level -= scores > th
    in_range = (labels >= 0) & (labels < n_templates)  # other labels are not clusters: their spikes are kept
    cluster, level, times = labels[in_range], level[in_range], st3[in_range, 0] / fs
    counts, spans = counts_and_spans(times, cluster, level, n_templates, n_levels)
    Q, R = refractoriness_scores(autocorrelograms_by_level(times, cluster, level, n_templates, n_levels, n_workers),
                                 counts, counts, spans)

    good = np.zeros(n_templates, dtype=bool)
    contamination = np.ones(n_templates)
    thresholds = np.full(n_templates, np.nan)
    for j in np.flatnonzero(np.bincount(cluster, minlength=n_templates)):  # clusters with spikes
        stop, good[j] = walk_thresholds(steps, Q[j, tried].tolist(), R[j, tried].tolist(), counts[j, tried])
        thresholds[j] = finals[stop]
        final = column[finals[stop]]
        if counts[j, final] and np.isfinite(Q[j, final]):
            contamination[j] = Q[j, final]
    threshold_of_spike = np.full(len(st3), np.nan)  # NaN: kept
    threshold_of_spike[in_range] = thresholds[cluster]
    return np.flatnonzero(~(scores <= threshold_of_spike)), good, contamination, thresholds


def run(ctx):
    ir, p = ctx.intermediate, ctx.params
    st3 = np.asarray(ir.st3_s)
    n_workers = min(8, os.cpu_count() or 1)  # as the split's
    keep, good, contamination, thresholds = set_cutoff(st3, len(ir.mu_s), p.Th, p.fs, n_workers)
    logger.info("cutoff: %d of %d spikes kept; %d good units", len(keep), len(st3), good.sum())
    ir.st3_c = st3[keep]
    ir.keep_c = keep
    ir.good = good
    ir.est_contam_rate = contamination
    ir.Ths = thresholds
