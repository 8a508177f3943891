"""Batch reordering on the host: the 1-D embedding of the batch distances (sortBatches2)."""

from __future__ import annotations

import numpy as np

from si_ks2py.stages.reorder import sort_batches, zscore_columns


def test_sort_batches_recovers_the_order_of_batches_along_a_drift():
    rng = np.random.default_rng(5)
    depth = rng.permutation(60).astype(float)  # batch b was recorded with the probe at depth[b]
    distance = np.log1p((depth[:, None] - depth[None, :]) ** 2 / 50)
    iorig = sort_batches(zscore_columns(distance + rng.normal(0, 0.01, distance.shape)))
    steps = np.diff(depth[iorig])
    assert (steps > 0).all() or (steps < 0).all()
