"""Merges (find_merges.m): clusters whose cross-correlogram shows a refractory dip are one neuron.

Clusters are visited once, from fewest to most spikes; each is compared with the clusters that have more spikes
and a template similarity of at least 0.5, most similar first, and merged into the first whose
cross-correlogram has ``Q < 0.2`` and ``R < 0.05`` (correlograms.py). Templates are unchanged; the merged cluster
simply takes the other's id.

Output: ``st3_m`` (st3 with column 1 relabelled).
"""

from __future__ import annotations

import logging

import numpy as np

from ..correlograms import refractoriness

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3_m",)
FILES = ()
FILE_INPUTS = ()


def find_merges(st3: np.ndarray, sim_score: np.ndarray, fs: float) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Relabelled copy of st3 and the (merged, into) pairs in the order they were merged."""
    st3 = st3.copy()
    labels = st3[:, 1].astype(np.int64)
    n_templates = len(sim_score)
    similarity = sim_score - np.diag(np.diag(sim_score))
    n_spikes = np.bincount(labels, minlength=n_templates).astype(np.int64)
    times = st3[:, 0] / fs
    members = {k: np.flatnonzero(labels == k) for k in range(n_templates)}
    merges = []
    for j in np.argsort(n_spikes, kind="stable"):
        own = members[j]
        candidates = similarity[j] * (n_spikes > len(own))
        order = np.argsort(-candidates, kind="stable")
        for i in order[candidates[order] >= 0.5]:
            score = refractoriness(times[own], times[members[i]])
            if score.Q < 0.2 and score.R < 0.05:
                labels[own] = i
                members[i] = np.sort(np.concatenate([members[i], own]))
                members[j] = own[:0]
                n_spikes[i] += n_spikes[j]
                merges.append((int(j), int(i)))
                break
    st3[:, 1] = labels
    return st3, merges


def run(ctx):
    ir = ctx.intermediate
    st3, merges = find_merges(np.asarray(ir.st3), np.asarray(ir.simScore), ctx.params.fs)
    logger.info("merge: %d merges", len(merges))
    ir.st3_m = st3
