"""Merges, splits, cutoff and their correlogram scores, on constructed spike trains and features."""

import numpy as np

from si_ks2py.correlograms import autocorrelograms_by_level, correlogram, refractoriness
from si_ks2py.stages.cutoff import set_cutoff
from si_ks2py.stages.merge import find_merges
from si_ks2py.stages.split import split_all_clusters

FS = 30000.0


def refractory_train(rng, rate=20.0, duration=300.0, dead=0.003):
    return np.cumsum(rng.exponential(1 / rate, int(rate * duration * 1.2)) + dead)


def test_correlogram_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = np.sort(rng.uniform(0, 50, 800)), np.sort(rng.uniform(0, 50, 600))
    lags = (b[:, None] - a[None, :]).ravel()
    lags = lags[np.abs(lags) < 0.5] / 1e-3
    expected = np.bincount((np.sign(lags) * np.floor(np.abs(lags) + 0.5)).astype(int) + 500, minlength=1001)
    np.testing.assert_array_equal(correlogram(a, b), expected)


def test_correlogram_of_sample_times_matches_brute_force_at_half_bins_and_window_edges():
    """Times on the 30 kHz sample grid put lags exactly on half bins (rounded away from zero) and on the window's
    edges (a pair counts when st2 - window < st1 < st2 + window, as the searchsorted bounds of ccg.m's port)."""
    rng = np.random.default_rng(7)
    a = np.sort(np.round(rng.uniform(0, 20, 700) * FS) / FS)
    b = np.sort(np.concatenate([a[:50] + 0.5, a[50:100] - 0.5, a[100:150] + 0.0005, a[150:200] - 0.0015,
                                np.round(rng.uniform(0, 20, 300) * FS) / FS]))
    first, second = np.meshgrid(a, b)
    inside = (first > second - 0.5) & (first < second + 0.5)
    lags = (second - first)[inside] / 1e-3
    expected = np.bincount((np.sign(lags) * np.floor(np.abs(lags) + 0.5)).astype(int) + 500, minlength=1001)
    np.testing.assert_array_equal(correlogram(a, b), expected)
    assert expected[[0, 1000]].sum() + np.isin(np.abs(lags), [0.5, 1.5]).sum() > 0  # the edge cases occur


def test_refractoriness_separates_one_neuron_from_two():
    rng = np.random.default_rng(1)
    one = refractory_train(rng)
    halves = one[::2], one[1::2]  # two labels of one refractory neuron
    assert refractoriness(*halves).Q < 0.2 and refractoriness(*halves).R < 0.05
    other = refractory_train(rng)
    assert refractoriness(one, other).Q > 0.5  # independent neurons: no dip


def spike_table(trains):
    """st3 rows (sample, template, amplitude, score, batch rank) sorted by time."""
    rows = [np.column_stack([np.round(t * FS), np.full(len(t), k), np.full(len(t), 20.0), np.full(len(t), 12.0),
                             np.zeros(len(t))]) for k, t in enumerate(trains)]
    st3 = np.concatenate(rows)
    return st3[np.argsort(st3[:, 0], kind="stable")]


def test_merges_a_refractory_pair_and_keeps_independent_units():
    rng = np.random.default_rng(2)
    one = refractory_train(rng)
    trains = [one[::3], one[np.mod(np.arange(len(one)), 3) != 0], refractory_train(rng)]
    sim = np.array([[1.0, 0.8, 0.8], [0.8, 1.0, 0.8], [0.8, 0.8, 1.0]])
    st3, merges = find_merges(spike_table(trains), sim, FS)
    assert merges == [(0, 1)]  # the smaller piece joins the larger one
    assert set(np.unique(st3[:, 1]).astype(int)) == {1, 2}
    # dissimilar templates are never tested
    _, merges = find_merges(spike_table(trains), np.eye(3), FS)
    assert merges == []


def test_split_separates_two_units_and_gives_each_its_own_template():
    rng = np.random.default_rng(3)
    nt0, n_near, n_pcs = 61, 4, 3
    wPCA = np.linalg.qr(rng.normal(size=(nt0, n_pcs)))[0]
    a, b = refractory_train(rng, 15), refractory_train(rng, 15)
    st3 = spike_table([np.concatenate([a, b])])
    labels_true = np.isin(st3[:, 0], np.round(b * FS))
    centre_a = np.zeros((n_pcs, n_near)); centre_a[0, 0] = 30
    centre_b = np.zeros((n_pcs, n_near)); centre_b[0, 0] = 14; centre_b[1, 1] = 6
    features = np.where(labels_true[:, None, None], centre_b, centre_a) + rng.normal(size=(len(st3), n_pcs, n_near))
    iC = np.tile(np.arange(n_near), (n_near, 1))
    dWU = np.zeros((1, nt0, n_near))
    out = split_all_clusters(features.astype(np.float32), st3, dWU, np.zeros((1, nt0, 3)), np.ones((1, 1)),
                             np.zeros((1, 4), int), np.zeros((1, 4), int), np.arange(1), iC, np.zeros(1, int), wPCA,
                             FS, 0.9, from_mean=False)
    st3_s, dWU_s, n_splits = out[0], out[1], out[-1]
    assert n_splits == 1 and len(dWU_s) == 2
    new = st3_s[:, 1] == 1
    assert min(np.mean(new == labels_true), np.mean(new != labels_true)) < 0.01  # the split follows the units
    # each template is the mean waveform of the spikes that carry its label (Kilosort 2.0 swapped them)
    for k in (0, 1):
        mean_waveform = wPCA @ features[st3_s[:, 1] == k].mean(axis=0)
        np.testing.assert_allclose(dWU_s[k], mean_waveform, atol=1e-6)


def test_cutoff_keeps_clean_units_and_flags_contaminated_ones():
    rng = np.random.default_rng(4)
    clean = refractory_train(rng, 10)
    contaminated = np.sort(rng.uniform(0, 300, 3000))  # Poisson: refractory violations everywhere
    st3 = spike_table([clean, contaminated])
    st3[:, 3] = rng.uniform(3, 30, len(st3))  # scores
    keep, good, contamination, thresholds = set_cutoff(st3, 3, [10.0, 4.0], FS)
    assert good.tolist() == [True, False, False]
    assert thresholds[0] == 4.0 and contamination[0] < 0.1
    assert contamination[1] > 0.5 and thresholds[1] == 10.5
    assert np.isnan(thresholds[2])  # no spikes
    kept = st3[keep]
    assert np.all(kept[kept[:, 1] == 1, 3] > 10.5) and np.all(kept[kept[:, 1] == 0, 3] > 4.0)


def reference_cluster_cutoff(times, scores, th_high, th_low):
    """set_cutoff.m's walk as first written: every threshold rescored from the spikes above it."""
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
            contamination_bound = min(0.05, max(0.01, 2 * score.Q))
        good = True
        th -= 0.5
    th += 0.5
    above = times[scores > th]
    contamination = refractoriness(above, above).Q if len(above) else np.nan
    return th, good, 1.0 if not np.isfinite(contamination) else contamination


def reference_set_cutoff(st3, n_templates, Th, fs):
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
        th, good[j], contamination[j] = reference_cluster_cutoff(st3[rows, 0] / fs, st3[rows, 3], Th[0], Th[-1])
        thresholds[j] = th
        keep[rows[st3[rows, 3] <= th]] = False
    return np.flatnonzero(keep), good, contamination, thresholds


def bursty_train(rng, rate, duration=300.0):
    """Bursts of 2-5 spikes 3-8 ms apart: refractory, with a large central correlogram."""
    starts = np.cumsum(rng.exponential(3.5 / rate, int(rate * duration / 3.5) + 1))
    sizes = rng.integers(2, 6, len(starts))
    gaps = rng.uniform(0.003, 0.008, sizes.sum())
    elapsed = np.cumsum(gaps)
    burst_start = np.repeat(np.cumsum(sizes) - sizes, sizes)  # index of each spike's first spike in the burst
    return np.sort(np.repeat(starts, sizes) + elapsed - elapsed[burst_start])


def window_edge_train(rng, n):
    """Spikes on the sample grid, half of them exactly 15000 samples (the 0.5 s window) after another: where
    ``t2 - 0.5 < t1`` and ``t1 + 0.5 > t2`` can disagree by rounding."""
    base = rng.integers(0, 300 * int(FS) - 15000, n // 2)
    return np.concatenate([base, base + 15000]) / FS


def cutoff_test_table(rng):
    """st3 of 40 clusters (some empty, some of 1-3 spikes) mixing refractory, Poisson, bursty and window-edge
    trains, with random scores (some exactly on the thresholds)."""
    trains, n_templates = {}, 44
    for k in range(40):
        kind = k % 5
        if kind == 0:
            t = refractory_train(rng, rng.uniform(2, 40))
        elif kind == 1:
            t = np.sort(rng.uniform(0, 300, rng.integers(50, 6000)))
        elif kind == 2:
            t = bursty_train(rng, rng.uniform(2, 20))
        elif kind == 3:
            t = window_edge_train(rng, 4000)
        else:
            t = rng.uniform(0, 300, rng.integers(1, 4))
        trains[k] = t[t < 300]
    rows = []
    for k, t in trains.items():
        samples = np.round(t * FS)
        scores = rng.uniform(3, 14, len(t))
        on_threshold = rng.random(len(t)) < 0.2
        scores[on_threshold] = rng.choice(np.arange(3.5, 11.5, 0.5), on_threshold.sum())
        rows.append(np.column_stack([samples, np.full(len(t), k), np.full(len(t), 20.0), scores, np.zeros(len(t))]))
    st3 = np.concatenate(rows)
    return st3[rng.permutation(len(st3))], n_templates  # clusters 40..43 have no spikes


def test_autocorrelograms_by_level_equal_each_levels_correlogram():
    rng = np.random.default_rng(7)
    trains = [window_edge_train(rng, 3000), bursty_train(rng, 15), np.sort(rng.uniform(0, 300, 2000)), np.ones(3)]
    times = np.concatenate(trains)
    clusters = np.repeat(np.arange(len(trains)), [len(t) for t in trains])
    n_levels = 4
    levels = rng.integers(0, n_levels + 1, len(times))  # n_levels: in no level
    # the window-edge train has pairs whose two window tests disagree (the case the mirrored counts correct)
    t = np.sort(trains[0])
    assert np.any((t[:, None] > t[None, :] - 0.5) != (t[None, :] < t[:, None] + 0.5))
    for n_workers in (1, 3):
        counts = autocorrelograms_by_level(times, clusters, levels, len(trains) + 1, n_levels, n_workers)
        assert counts.shape == (len(trains) + 1, n_levels, 1001)
        for c in range(len(trains) + 1):
            for level in range(n_levels):
                s = times[(clusters == c) & (levels <= level)]
                expected = correlogram(s, s) if len(s) else np.zeros(1001, dtype=np.int64)
                np.testing.assert_array_equal(counts[c, level], expected)


def test_set_cutoff_equals_rescoring_every_threshold():
    """The one-pass cutoff gives bitwise the outputs of the walk that rescored the spikes above each threshold."""
    rng = np.random.default_rng(8)
    st3, n_templates = cutoff_test_table(rng)
    outcomes = set()
    for Th in ([10.0, 4.0], [8.3, 5.1], [6.0, 6.0], [4.0, 10.0]):  # the last: no threshold is tried
        expected = reference_set_cutoff(st3, n_templates, Th, FS)
        for n_workers in (1, 3):
            result = set_cutoff(st3, n_templates, Th, FS, n_workers)
            for got, want in zip(result, expected):
                assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
        keep, good, contamination, thresholds = expected
        outcomes |= {("good" if g else "mua", th) for g, th in zip(good, thresholds) if np.isfinite(th)}
    # the table exercises the walk's outcomes: stopped at once, part way and at the bottom
    assert ("mua", 10.5) in outcomes and ("good", 4.0) in outcomes
    assert any(label == "good" and 4.0 < th < 10.0 for label, th in outcomes)


def test_split_of_a_degenerate_cluster_is_skipped_not_a_crash():
    """Identical features (a zero-variance mixture) made Kilosort's split crash (MouseLand/Kilosort#85, #199)."""
    rng = np.random.default_rng(5)
    st3 = spike_table([refractory_train(rng, 15)])
    features = np.ones((len(st3), 3, 4), dtype=np.float32)
    iC = np.tile(np.arange(4), (4, 1))
    wPCA = np.linalg.qr(rng.normal(size=(61, 3)))[0]
    out = split_all_clusters(features, st3, np.zeros((1, 61, 4)), np.zeros((1, 61, 3)), np.ones((1, 1)),
                             np.zeros((1, 4), int), np.zeros((1, 4), int), np.arange(1), iC, np.zeros(1, int), wPCA,
                             FS, 0.9, from_mean=True)
    assert out[-1] == 0 and np.all(out[0][:, 1] == 0)


def test_clusters_split_together_get_the_ids_of_one_at_a_time(monkeypatch):
    """Three units merged in one cluster and one unit alone: pursued together (one group per round) the pieces are
    numbered as when every cluster is pursued alone, as Kilosort's loop numbers them."""
    from si_ks2py.stages import split

    rng = np.random.default_rng(6)
    nt0, n_near, n_pcs = 61, 4, 3
    wPCA = np.linalg.qr(rng.normal(size=(nt0, n_pcs)))[0]
    trains = [refractory_train(rng, 12) for _ in range(4)]
    st3 = spike_table([np.concatenate(trains[:3]), trains[3]])
    unit = np.select([np.isin(st3[:, 0], np.round(t * FS)) for t in trains], range(4))
    centres = np.zeros((4, n_pcs, n_near))
    centres[0, 0, 0], centres[1, 0, 1], centres[2, 0, 2], centres[3, 0, 3] = 30, 25, 20, 30
    features = (centres[unit] + rng.normal(size=(len(st3), n_pcs, n_near))).astype(np.float32)
    iC = np.tile(np.arange(n_near), (n_near, 1))
    args = (features, st3, np.zeros((2, nt0, n_near)), np.zeros((2, nt0, 3)), np.eye(2), np.zeros((2, 4), int),
            np.zeros((2, 4), int), np.arange(2), iC, np.zeros(2, int), wPCA, FS, 0.9)
    together = split_all_clusters(*args, from_mean=False, n_workers=4)
    monkeypatch.setattr(split, "GROUP_BYTES", 8 * n_pcs * n_near)  # every cluster in a group of its own
    alone = split_all_clusters(*args, from_mean=False, n_workers=1)
    assert alone[-1] == 2  # the merged cluster gave two new pieces
    np.testing.assert_array_equal(together[0], alone[0])
    np.testing.assert_array_equal(together[1], alone[1])
