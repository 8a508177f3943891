"""Merges, splits, cutoff and their correlogram scores, on constructed spike trains and features."""

import numpy as np

from si_ks2py.correlograms import correlogram, refractoriness
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


def test_parallel_split_gives_the_ids_of_the_sequential_loop():
    """Three units merged in one cluster and one unit alone: splits in parallel threads number the pieces as the
    sequential loop does."""
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
    sequential = split_all_clusters(*args, from_mean=False, n_workers=1)
    parallel = split_all_clusters(*args, from_mean=False, n_workers=4)
    assert sequential[-1] == 2  # the merged cluster gave two new pieces
    np.testing.assert_array_equal(parallel[0], sequential[0])
    np.testing.assert_array_equal(parallel[1], sequential[1])
