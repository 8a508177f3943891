"""Per-cluster score threshold and good/mua labels (set_cutoff.m).

For each cluster the threshold on the spikes' score (sqrt of the matching cost, st3 column 3) is lowered from
Th[0] to Th[1] in steps of 0.5 while the autocorrelogram of the spikes above it stays refractory (``Q`` under
the contamination bound, 0.1 or tighter for a clean unit, and ``R < 0.05``); spikes at or under the last
accepted threshold are dropped. A cluster that passed at least one level is "good", else "mua" (and keeps only
spikes scoring above Th[0] + 0.5). ``est_contam_rate`` is Q at the kept threshold (1 when undefined).

Outputs: ``st3_c`` (kept spikes), ``keep_c`` (their rows in st3_s, to select features), ``good`` [K] bool,
``est_contam_rate`` [K], ``Ths`` [K] (NaN for clusters without spikes).
"""

from __future__ import annotations

import logging

import numpy as np

from ..correlograms import refractoriness

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3_c", "keep_c", "good", "est_contam_rate", "Ths")
FILES = ()
FILE_INPUTS = ()


def cluster_cutoff(times: np.ndarray, scores: np.ndarray, th_high: float, th_low: float):
    """(threshold, good, contamination) of one cluster; times in seconds."""
    th = th_high
    contamination_bound = 0.1
    good = False
    while th >= th_low:
        above = times[scores > th]
        if len(above) == 0:
            th -= 0.5
            continue
        score = refractoriness(above, above)
        if not (score.Q <= contamination_bound and score.R <= 0.05):
            break
        if th == th_high and score.Q < 0.05:
            contamination_bound = min(0.05, max(0.01, 2 * score.Q))  # a unit that starts clean must stay clean
        good = True
        th -= 0.5
    th += 0.5
    above = times[scores > th]
    contamination = refractoriness(above, above).Q if len(above) else np.nan
    return th, good, 1.0 if not np.isfinite(contamination) else contamination


def set_cutoff(st3: np.ndarray, n_templates: int, Th: list[float], fs: float):
    labels = st3[:, 1].astype(np.int64)
    good = np.zeros(n_templates, dtype=bool)
    contamination = np.ones(n_templates)
    thresholds = np.full(n_templates, np.nan)
    keep = np.ones(len(st3), dtype=bool)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_templates + 1))
    for j in range(n_templates):
        rows = order[bounds[j]:bounds[j + 1]]
        if len(rows) == 0:
            continue
        th, good[j], contamination[j] = cluster_cutoff(st3[rows, 0] / fs, st3[rows, 3], Th[0], Th[-1])
        thresholds[j] = th
        keep[rows[st3[rows, 3] <= th]] = False
    return np.flatnonzero(keep), good, contamination, thresholds


def run(ctx):
    ir, p = ctx.intermediate, ctx.params
    st3 = np.asarray(ir.st3_s)
    keep, good, contamination, thresholds = set_cutoff(st3, len(ir.mu_s), p.Th, p.fs)
    logger.info("cutoff: %d of %d spikes kept; %d good units", len(keep), len(st3), good.sum())
    ir.st3_c = st3[keep]
    ir.keep_c = keep
    ir.good = good
    ir.est_contam_rate = contamination
    ir.Ths = thresholds
