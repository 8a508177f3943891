"""The template model and the detection / pursuit ops (NumPy twins) on constructed data."""

import numpy as np
import pytest

from si_ks2py import templates as tm
from si_ks2py.cpu import ops
from si_ks2py.probe import nearest_channels

NT0, NT0MIN = 61, 20


def spike_waveform(nt0=NT0, trough=NT0MIN, width=2.0):
    t = np.arange(nt0) - trough
    return -np.exp(-t ** 2 / (2 * width ** 2)) + 0.3 * np.exp(-(t - 6) ** 2 / 18)


def grid_probe(n_chan=16):
    xc = np.tile([0.0, 20.0], n_chan // 2)
    yc = np.repeat(np.arange(n_chan // 2) * 20.0, 2)
    return xc, yc, np.zeros(n_chan, dtype=int)


def template_set(n_chan=16, channels=(3, 10), amplitudes=(12.0, 9.0)):
    """dWU [K, nt0, Nchan] of spatially decaying spikes centred on the given channels."""
    xc, yc, _ = grid_probe(n_chan)
    dwu = []
    for c, a in zip(channels, amplitudes):
        spatial = np.exp(-np.hypot(xc - xc[c], yc - yc[c]) / 25)
        dwu.append(a * spike_waveform()[:, None] * spatial[None, :])
    return np.array(dwu)


def factorise(dwu, n_chan=16):
    xc, yc, k = grid_probe(n_chan)
    iC = nearest_channels(xc, yc, k, 8)
    Ka, Kb = tm.alignment_kernels(NT0, NT0MIN)
    iW = tm.peak_channels(dwu, NT0MIN)
    W, U, mu = tm.svd_templates(dwu, np.zeros((len(dwu), NT0, 3)), iC, iW, Ka, Kb, NT0MIN)
    return W, U, mu, iC, iW


def test_svd_templates_normalises_and_keeps_an_aligned_template_in_place():
    dwu = template_set()
    W, U, mu, iC, iW = factorise(dwu)
    # unit norm up to the slight smoothing of the regularised sub-sample interpolation (as in Kilosort); the
    # templates are rank one (one waveform on every channel), their other factors 0
    np.testing.assert_allclose(np.linalg.norm(W[:, :, 0], axis=1), 1, atol=0.05)
    assert not W[:, :, 1:].any() and not U[:, :, 1:].any()
    np.testing.assert_allclose((U ** 2).sum(axis=(1, 2)), 1, atol=1e-6)
    assert np.all(W[:, NT0MIN, 0] < 0)
    # a template whose trough is on sample nt0min stays there, and is rebuilt to within 5% of its peak
    rebuilt = tm.dense_templates(W, U, mu)
    error = [np.abs(rebuilt[k, :, iW[k]] - dwu[k, :, iW[k]]).max() / np.abs(dwu[k]).max() for k in range(2)]
    assert [np.argmin(rebuilt[k, :, iW[k]]) for k in range(2)] == [NT0MIN, NT0MIN] and max(error) < 0.05
    # Kilosort 2.0's kernel (one sample early) moves it by a fraction of a sample: a 3x larger misfit
    xc, yc, kc = grid_probe()
    _, Kb = tm.alignment_kernels(NT0, NT0MIN)
    W2, U2, mu2 = tm.svd_templates(dwu, np.zeros((2, NT0, 3)), iC, iW, Kb[:, NT0MIN - 1, :], Kb, NT0MIN)
    shifted = tm.dense_templates(W2, U2, mu2)
    assert [np.argmin(shifted[k, :, iW[k]]) for k in range(2)] == [NT0MIN - 1, NT0MIN - 1]
    assert np.abs(shifted[0, :, iW[0]] - dwu[0, :, iW[0]]).max() / np.abs(dwu[0]).max() > 3 * max(error)


def test_svd_templates_factors_are_the_top_eigenvectors_of_the_temporal_covariance():
    rng = np.random.default_rng(5)
    dwu = template_set() + 0.3 * rng.normal(size=(2, NT0, 16))  # full rank
    W, U, mu, iC, iW = factorise(dwu)
    # the factors before alignment (which U keeps), from each neighbourhood's temporal covariance [nt0, nt0]
    blanked = dwu * tm.neighbourhood_mask(iC, iW, 16)[:, None, :]
    top = np.linalg.eigh(blanked @ blanked.transpose(0, 2, 1))[1][:, :, ::-1][:, :, :3]
    U_direct = blanked.transpose(0, 2, 1) @ top  # [K, Nchan, 3], the factors' signs aside
    np.testing.assert_allclose(mu, np.sqrt(1e-7 + (U_direct ** 2).sum(axis=(1, 2))), rtol=1e-12)
    for r in range(3):
        np.testing.assert_allclose(np.abs(U[:, :, r]) * mu[:, None], np.abs(U_direct[:, :, r]),
                                   atol=1e-9 * np.abs(U_direct).max())


def test_template_xcorr_matches_direct_correlation():
    W, U, mu, iC, iW = factorise(template_set())
    T = tm.dense_templates(W, U)
    X = tm.template_xcorr(W.astype(np.float32), U.astype(np.float32), np.array([0, 1]), np.array([1, 0]))
    for p, (a, b) in enumerate([(0, 1), (1, 0)]):
        for j in range(2 * NT0 - 1):
            d = j - (NT0 - 1)
            direct = sum(T[a, t] @ T[b, t - d] for t in range(NT0) if 0 <= t - d < NT0)
            assert X[p, j] == pytest.approx(direct, abs=1e-5)
    sim = tm.similarity(ops, W.astype(np.float32), U.astype(np.float32), iC, iW, 16, 2)
    assert np.all(np.diag(sim["simScore"]) > 0.95)  # ||T||^2: 1 up to the interpolation's smoothing
    assert sim["iList"][:, 0].tolist() == [0, 1]


def test_triage_drops_rare_templates_and_the_weaker_twin():
    dwu = np.concatenate([template_set(), template_set()[:1] * 1.05])  # template 2 is a twin of 0
    W, U, mu, _, _ = factorise(dwu)
    keep = tm.triage(W, U, mu, np.array([5.0, 0.01, 2.0]), m0=0.1)
    assert keep.tolist() == [True, False, False]


@pytest.fixture
def synthetic_batch():
    """Noise plus spikes of two known templates at known times (some overlapping)."""
    rng = np.random.default_rng(0)
    dwu = template_set()
    W, U, mu, iC, iW = factorise(dwu)
    T = tm.dense_templates(W, U, mu).astype(np.float32)
    n = 6000
    data = rng.normal(size=(n, 16)).astype(np.float32)
    truth = [(200, 0), (900, 1), (930, 0), (2500, 1), (4100, 0), (4140, 1), (5800 - NT0, 0)]
    for start, k in truth:
        data[start:start + NT0] += T[k]
    W, U = W.astype(np.float32), U.astype(np.float32)
    sim = tm.similarity(ops, W, U, iC, iW, 16, 2)
    sim["neighbors"] = tm.overlap_neighbors(iC, iW, 16)
    sim["xcorr"] = tm.neighbor_xcorr(W, U, sim["neighbors"])
    return data, W, U, mu.astype(np.float32), sim, truth


def test_match_pursuit_recovers_known_spikes_including_overlaps(synthetic_batch):
    data, W, U, mu, sim, truth = synthetic_batch
    st, ids, y, x, residual, feat = ops.match_pursuit(data, W, U, mu, sim["neighbors"], sim["xcorr"], 4.0, 10.0,
                                                      60, sim["iList"])
    assert sorted(zip(st.tolist(), ids.tolist())) == sorted(truth)
    np.testing.assert_allclose(y, mu[ids], rtol=0.15)  # amplitudes near the templates'
    assert residual.std() < 1.05  # only noise is left
    assert feat.shape == (len(st), 2) and np.all(feat[:, 0] > feat[:, 1])  # own template first


def test_match_pursuit_projection_update_equals_recomputation(synthetic_batch):
    """The B update through xcorr (linearity) gives the projections of the residual."""
    data, W, U, mu, sim, _ = synthetic_batch
    st, ids, y, x, residual, _ = ops.match_pursuit(data, W, U, mu, sim["neighbors"], sim["xcorr"], 4.0, 10.0, 1)
    again = ops.match_pursuit(residual, W, U, mu, sim["neighbors"], sim["xcorr"], 4.0, 10.0, 60)
    first_pass_left = set(zip(again[0].tolist(), again[1].tolist()))
    full = ops.match_pursuit(data, W, U, mu, sim["neighbors"], sim["xcorr"], 4.0, 10.0, 60)
    assert set(zip(full[0].tolist(), full[1].tolist())) == set(zip(st.tolist(), ids.tolist())) | first_pass_left


def test_accumulate_templates_and_pc_features_match_direct_sums(synthetic_batch):
    data, W, U, mu, sim, truth = synthetic_batch
    st = np.array([t for t, _ in truth])
    ids = np.array([k for _, k in truth])
    y = mu[ids] * 0.9
    dwu, counts = ops.accumulate_templates(data, st, ids, y, W, U, 2)
    T = tm.dense_templates(W, U)
    for k in (0, 1):
        expected = sum(data[s:s + NT0] + yy * T[k] for s, i, yy in zip(st, ids, y) if i == k)
        np.testing.assert_allclose(dwu[k], expected, rtol=1e-5, atol=1e-4)
    assert counts.tolist() == [4, 3]
    wPCA = np.linalg.qr(np.random.default_rng(1).normal(size=(NT0, 3)))[0].astype(np.float32)
    channels = np.tile(np.arange(4), (2, 1))
    pcs = ops.pc_features(data, st, ids, y, W, U, channels, wPCA)
    s = 2
    clean = data[st[s]:st[s] + NT0, :4] + y[s] * T[ids[s]][:, :4]
    np.testing.assert_allclose(pcs[s], wPCA.T @ clean, rtol=1e-4, atol=1e-4)


def test_detectors_find_isolated_spikes(synthetic_batch):
    data, *_, truth = synthetic_batch
    xc, yc, k = grid_probe()
    iC = nearest_channels(xc, yc, k, 8)
    wave = spike_waveform()
    prototypes = np.stack([wave / np.linalg.norm(wave)] * 6, axis=1).astype(np.float32)
    t, c = ops.prototype_spikes(data, prototypes, iC, 7, 10.0)
    starts = np.array([start for start, _ in truth])
    # seeds sit on true spikes; at most one per 5-channel stretch per batch (cleanup_heights)
    assert len(t) >= 1 and np.all(np.abs(t[:, None] - starts).min(axis=1) <= 3)
    wPCA = np.linalg.svd(np.stack([np.roll(wave, s) for s in range(-3, 4)]), full_matrices=False)[2][:3].T
    t, c, features = ops.pc_threshold_spikes(data, wPCA.astype(np.float32), iC, 8.0, NT0MIN)
    assert features.shape == (len(t), 8, 3)
    assert any(abs(tt - 200) <= 3 and cc in (2, 3, 4, 5) for tt, cc in zip(t, c))
