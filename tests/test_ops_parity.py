"""Every GPU op against its NumPy twin (marked gpu: run on the device machine).

Tolerances: float32 ops that sum the same terms in another order agree to rtol 1e-4 / atol 1e-4 of the data
scale; window min/sum ops are exact up to float32 summation order.

Detection and matching pursuit (inputs: random noise, and recording-like batches of noise plus known templates
placed at known times, with the W/U/mu shapes of the stages and neighbours/xcorr from templates.similarity):

- correlate_valid: the NumPy twin correlates by float32 FFT, the GPU by a direct float32 sum, so they agree to
  atol DENSE_ATOL of the output's largest magnitude (FFT errors scale with the whole signal, not each value).
- Spike lists (pc_threshold_spikes, prototype_spikes, match_pursuit) are compared as multisets of (time,
  channel or template) pairs. Recording-like batches must give the same pairs. On pure noise (thousands of
  threshold crossings, each taken over near-equal neighbours) at most NOISE_MISMATCH of the pairs may differ:
  projections that differ in their last float32 bits can flip which of two near-equal samples is the local
  maximum, and in matching pursuit such a flip changes the residual, so later iterations may differ locally.
- prototype_spikes scores channels by sums over their nearest channels; where two channels' nearest sets
  coincide the scores tie exactly in both twins (sums in ascending channel order) and both take the first channel:
  seeds found at the same time must be on the same channel.
- Values of matched spikes (amplitudes y, scores x, template features, PC features) agree to rtol VALUE_RTOL
  plus atol VALUE_RTOL of their largest magnitude; residuals to atol DENSE_ATOL of the data's largest magnitude
  away from the windows of unmatched spikes.
- accumulate_templates sums in float64 in the same spike order: rtol 1e-6 (the float32 templates W U' that
  it adds may round differently in their last bit); counts are equal. pc_features: VALUE_RTOL.
- svd_templates (float64, the GPU's Gram matrices over the neighbourhood only and its eigenvectors from
  cuSOLVER): the first factor of W, mu and the rank-3 templates W U' to 1e-9 (the other factors' signs are
  arbitrary).
- Template projections (match_pursuit's first step): the NumPy twin correlates by float32 FFT, the GPU sums
  directly over each chunk's channel window: atol DENSE_ATOL of the largest projection.
- neighbor_xcorr: the NumPy twin correlates by float64 FFT, the GPU by a direct float64 sum: atol 1e-5 of
  the largest correlation.
- row_median is exact (it sorts the same float32 values); column_sums (the GPU sums slabs of 256 samples, then
  the slabs, BLAS another order) to rtol 1e-5 plus 1e-6 of the largest column's sum of magnitudes, exact for
  counts and small integers.
- Every new GPU op is deterministic: two calls give bitwise equal outputs.
- End to end (preprocess to extract, 20 s, 32 channels, 8 units) the GPU run's spike count is within 2% of the
  CPU run's and both find the same number of ground-truth units at accuracy >= 0.8.
"""

from collections import Counter

import numpy as np
import pytest
from scipy import signal

from si_ks2py import templates as tm
from si_ks2py.cpu import ops as cpu
from si_ks2py.probe import nearest_channels

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from si_ks2py.gpu import ops

    return ops


def test_every_cpu_op_has_a_gpu_twin(gpu):
    names = {n for n in dir(cpu) if not n.startswith("_") and callable(getattr(cpu, n))}
    missing = [n for n in names if not hasattr(gpu, n)]
    assert not missing


def test_copies_to_and_from_pinned_host_memory(gpu):
    """The in-memory whitened copy is pinned (pin_host) while it is being filled: chunks copied into its rows on a
    worker stream (copy_to_host) and batches read back from views of it are exact, before and after unpinning."""
    from si_ks2py.io import large_host_array, pin_when_populated

    rng = np.random.default_rng(5)
    rows, C = 40000, 61
    memory, populating = large_host_array((rows * C,), np.int16)
    pinning = pin_when_populated(gpu, memory, populating)
    whitened = memory.reshape(rows, C)
    data = rng.integers(-2 ** 15, 2 ** 15, (rows, C), dtype=np.int16)
    with gpu.worker_stream():
        for start in range(0, rows, 7000):
            gpu.copy_to_host(gpu.asarray(data[start:start + 7000]) + 0, whitened[start:start + 7000])
    unpin = pinning.result()
    assert unpin is not None
    with gpu.worker_stream():
        gpu.copy_to_host(gpu.asarray(data[:100]) * 0, whitened[:100])
    np.testing.assert_array_equal(whitened[:100], 0)
    whitened[:100] = data[:100]
    np.testing.assert_array_equal(whitened, data)
    view = whitened[123:31234]
    np.testing.assert_array_equal(gpu.to_host(gpu.asarray(view)), data[123:31234])
    for k, batch in gpu.prefetch_to_device(lambda k: whitened[k * 9000:(k + 1) * 9000 + 77], range(4)):
        np.testing.assert_array_equal(gpu.to_host(batch), data[k * 9000:(k + 1) * 9000 + 77])
    unpin()
    np.testing.assert_array_equal(gpu.to_host(gpu.asarray(whitened[5:6000])), data[5:6000])


@pytest.mark.parametrize("band", [None, 6000.0])
def test_filtfilt_zero_state(gpu, band):
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(65856, 37)).cumsum(axis=0) * 0.1 + rng.normal(size=(65856, 37))).astype(np.float32)
    b, a = (signal.butter(3, 150 / 15000, "high") if band is None
            else signal.butter(3, [150 / 15000, band / 15000], "bandpass"))
    expected = cpu.filtfilt_zero_state(x, b, a)
    got = gpu.to_host(gpu.filtfilt_zero_state(gpu.asarray(x), b, a))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


@pytest.mark.parametrize("C", [1, 2, 3, 32, 383, 384, 1000])
def test_row_median(gpu, C):
    rng = np.random.default_rng(C)
    x = rng.normal(size=(3000, C)).astype(np.float32)
    x[::7] = np.round(x[::7])  # rows with ties
    np.testing.assert_array_equal(gpu.to_host(gpu.row_median(gpu.asarray(x))), cpu.row_median(x))


@pytest.mark.parametrize("n, C", [(65600, 384), (1000, 37), (255, 130), (1, 3)])
def test_column_sums(gpu, n, C):
    rng = np.random.default_rng(n + C)
    x = (rng.normal(size=(n, C)) * 50 + 10).astype(np.float32)
    got = gpu.to_host(gpu.column_sums(gpu.asarray(x)))
    assert got.shape == (1, C) and got.dtype == np.float32
    scale = np.abs(x).sum(axis=0).max()
    np.testing.assert_allclose(got, cpu.column_sums(x), rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_array_equal(gpu.to_host(gpu.column_sums(gpu.asarray(x))), got)  # deterministic
    for counted in (x > 40, rng.integers(-3, 4, size=(n, C), dtype=np.int16)):  # counts and integers: exact
        np.testing.assert_array_equal(gpu.to_host(gpu.column_sums(gpu.asarray(counted))), cpu.column_sums(counted))


@pytest.mark.parametrize("axis, hw", [(0, 30), (0, 5), (1, 4), (1, 6)])
def test_running_windows(gpu, axis, hw):
    x = np.random.default_rng(1).normal(size=(4096, 48)).astype(np.float32)
    np.testing.assert_array_equal(gpu.to_host(gpu.running_min(gpu.asarray(x), hw, axis)), cpu.running_min(x, hw, axis))
    np.testing.assert_allclose(gpu.to_host(gpu.running_sum(gpu.asarray(x), hw, axis)), cpu.running_sum(x, hw, axis),
                               atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# detection and matching pursuit

DENSE_ATOL = 1e-4
VALUE_RTOL = 1e-4
NOISE_MISMATCH = 0.01
NT0, NT0MIN = 61, 20
BATCH = 65536 + 6 * NT0  # a batch as the stages read it: NT - ntbuff samples plus margins of 3 * nt0


def _to_host(a):
    return a if a is None else np.asarray(a.get() if hasattr(a, "get") else a)


def probe_iC(n_chan: int, n_near: int = 32):
    """Nearest channels of a 2-column probe (20 um rows, 32 um columns), itself first."""
    xc = np.tile([0.0, 32.0], n_chan // 2 + 1)[:n_chan]
    yc = (np.arange(n_chan) // 2) * 20.0
    return nearest_channels(xc, yc, np.zeros(n_chan), min(n_chan, n_near))


def synthetic_templates(n_chan: int, K: int, rng, mu_range=(8.0, 25.0), spread: int = 12):
    """Unit-norm rank-3 templates as the stages hold them: W [K, nt0, 3] orthonormal columns (first negative at
    the trough), U [K, Nchan, 3] zero outside the spread nearest channels of the peak channel, mu [K]; float32.
    Returns (W, U, mu, iC, iW)."""
    iC = probe_iC(n_chan)
    iW = rng.permutation(np.arange(K) % n_chan)
    t = np.arange(NT0, dtype=np.float64)[None, :]
    width = rng.uniform(2.0, 5.0, size=(K, 1))
    lag = rng.uniform(6.0, 14.0, size=(K, 1))
    shape = -np.exp(-((t - NT0MIN) / width) ** 2) + rng.uniform(0.2, 0.6, (K, 1)) * np.exp(
        -((t - NT0MIN - lag) / (2 * width)) ** 2)
    basis = np.stack([shape, np.gradient(shape, axis=1), rng.normal(size=shape.shape) * np.exp(
        -((t - NT0MIN) / 15.0) ** 2)], axis=2)  # [K, nt0, 3]
    W, _ = np.linalg.qr(basis)
    W[:, :, 0] *= -np.sign(W[:, NT0MIN, 0])[:, None]
    U = np.zeros((K, n_chan, 3))
    near = iC[iW][:, :min(spread, iC.shape[1])]  # [K, spread]
    decay = np.exp(-np.arange(near.shape[1]) / 4.0)
    amplitude = decay[None, :, None] * np.array([1.0, 0.3, 0.15])[None, None, :] * rng.normal(
        size=(K, near.shape[1], 3))
    amplitude[:, 0, 0] = np.abs(amplitude[:, 0, 0]) + 1.0
    U[np.arange(K)[:, None], near] = amplitude
    U /= np.sqrt((U ** 2).sum(axis=(1, 2)))[:, None, None]
    mu = rng.uniform(*mu_range, size=K)
    return W.astype(np.float32), U.astype(np.float32), mu.astype(np.float32), iC, iW


def place_spikes(n: int, W, U, mu, n_spikes: int, rng, noise: float = 1.0):
    """Noise plus n_spikes template waveforms (amplitude ~ mu) at random window starts: (data, st, ids)."""
    K, nt0, _ = W.shape
    data = (noise * rng.normal(size=(n, U.shape[1]))).astype(np.float32)
    st = np.sort(rng.integers(nt0, n - 2 * nt0, size=n_spikes))
    ids = rng.integers(0, K, size=n_spikes)
    T = np.einsum("ktr,kcr->ktc", W, U)
    amp = mu[ids] * rng.uniform(0.8, 1.2, size=n_spikes)
    for s, k, a in zip(st, ids, amp):  # test data only
        data[s:s + nt0] += (a * T[k]).astype(np.float32)
    return data, st, ids


def pursuit_inputs(n_chan, K, rng, n_spikes, mu_range=(8.0, 25.0), noise_only=False):
    W, U, mu, iC, iW = synthetic_templates(n_chan, K, rng, mu_range)
    if noise_only:
        data = rng.normal(size=(BATCH, n_chan)).astype(np.float32)
    else:
        data, _, _ = place_spikes(BATCH, W, U, mu, n_spikes, rng)
    sim = tm.similarity(cpu, W, U, iC, iW, n_chan, min(K, 32))
    sim["neighbors"] = tm.overlap_neighbors(iC, iW, n_chan)
    sim["xcorr"] = tm.neighbor_xcorr(W, U, sim["neighbors"])
    return data, W, U, mu, sim, iC


@pytest.mark.parametrize("K", [1, 7, 60])
def test_neighbor_xcorr(gpu, K):
    rng = np.random.default_rng(K)
    W, U, mu, iC, iW = synthetic_templates(64, K, rng, (8.0, 25.0))
    neighbors = tm.overlap_neighbors(iC, iW, 64)
    expected = cpu.neighbor_xcorr(W, U, neighbors)
    got = gpu.to_host(gpu.neighbor_xcorr(gpu.asarray(W), gpu.asarray(U), gpu.asarray(neighbors)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    assert (got[neighbors == K] == 0).all()


@pytest.mark.parametrize("order", ["by peak channel", "unsorted"])
def test_template_projections(gpu, order):
    rng = np.random.default_rng(11)
    W, U, mu, iC, iW = synthetic_templates(384, 400, rng)
    if order == "by peak channel":  # as the stages hold them: each chunk of templates spans a short window
        by_channel = np.argsort(iW, kind="stable")
        W, U = W[by_channel], U[by_channel]
    data = rng.normal(size=(BATCH, 384)).astype(np.float32)
    expected = cpu._template_projections(data, W, U)[:BATCH, :len(W)]
    got = gpu.to_host(gpu._template_projections(gpu.asarray(data), gpu.asarray(W), gpu.asarray(U)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=DENSE_ATOL * np.abs(expected).max())
    assert_bitwise_equal([got], [gpu.to_host(gpu._template_projections(gpu.asarray(data), gpu.asarray(W),
                                                                       gpu.asarray(U)))])


def multiset_mismatch(a_t, a_k, b_t, b_k):
    """(number of pairs in one list only, total pairs of the larger list)."""
    a = Counter(zip(np.asarray(a_t).tolist(), np.asarray(a_k).tolist()))
    b = Counter(zip(np.asarray(b_t).tolist(), np.asarray(b_k).tolist()))
    return sum(((a - b) + (b - a)).values()), max(sum(a.values()), sum(b.values()))


def matched_rows(a_t, a_k, b_t, b_k):
    """Row indices (ia, ib) of the (time, id) pairs found once in both lists."""
    a = Counter(zip(np.asarray(a_t).tolist(), np.asarray(a_k).tolist()))
    b = Counter(zip(np.asarray(b_t).tolist(), np.asarray(b_k).tolist()))
    pos_b = {p: i for i, p in enumerate(zip(np.asarray(b_t).tolist(), np.asarray(b_k).tolist())) if b[p] == 1}
    ia, ib = [], []
    for i, p in enumerate(zip(np.asarray(a_t).tolist(), np.asarray(a_k).tolist())):
        if a[p] == 1 and p in pos_b:
            ia.append(i)
            ib.append(pos_b[p])
    return np.array(ia, dtype=np.int64), np.array(ib, dtype=np.int64)


def assert_values_close(got, expected, what, rtol=VALUE_RTOL):
    got, expected = np.asarray(got, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    scale = np.abs(expected).max() if expected.size else 1.0
    err = np.abs(got - expected).max() if expected.size else 0.0
    print(f"[diag] {what}: max abs err {err:.3g} (scale {scale:.3g})")
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


def assert_bitwise_equal(first, second):
    for a, b in zip(first, second):
        if a is None:
            assert b is None
        else:
            np.testing.assert_array_equal(_to_host(a), _to_host(b))


def test_correlate_valid(gpu):
    rng = np.random.default_rng(2)
    x = (rng.normal(size=(BATCH, 37)) * rng.uniform(0.5, 20, size=37)).astype(np.float32)
    for F in (3, 6, 11):
        filters = rng.normal(size=(NT0, F)).astype(np.float32)
        expected = cpu.correlate_valid(x, filters)
        got = gpu.to_host(gpu.correlate_valid(gpu.asarray(x), gpu.asarray(filters)))
        assert got.shape == expected.shape and got.dtype == np.float32
        err = np.abs(got - expected).max()
        print(f"[diag] correlate_valid F={F}: max abs err {err:.3g} (scale {np.abs(expected).max():.3g})")
        np.testing.assert_allclose(got, expected, rtol=0, atol=DENSE_ATOL * np.abs(expected).max())
        assert not got[BATCH - NT0 + 1:].any()


def waveform_pcs(W, n_pcs):
    """Temporal PCs of the templates' first factors, like the stages' wPCA / wTEMP: [nt0, n_pcs] float32."""
    _, _, vt = np.linalg.svd(W[:, :, 0].astype(np.float64), full_matrices=False)
    return np.ascontiguousarray(vt[:n_pcs].T).astype(np.float32)


@pytest.mark.parametrize("kind", ["noise", "recording"])
def test_pc_threshold_spikes(gpu, kind):
    rng = np.random.default_rng(3)
    n_chan = 48
    W, U, mu, iC, _ = synthetic_templates(n_chan, 64, rng)
    wPCA = waveform_pcs(W, 3)
    iC = probe_iC(n_chan, 17)
    if kind == "noise":
        data, threshold = rng.normal(size=(BATCH // 2, n_chan)).astype(np.float32), 3.2
    else:
        data, _, _ = place_spikes(BATCH, W, U, mu, 1500, rng)
        threshold = 8.0
    expected = cpu.pc_threshold_spikes(data, wPCA, iC, threshold, NT0MIN)
    got = [gpu.to_host(a) for a in gpu.pc_threshold_spikes(gpu.asarray(data), gpu.asarray(wPCA),
                                                            gpu.asarray(iC), threshold, NT0MIN)]
    assert got[0].dtype == np.int64 and got[1].dtype == np.int64 and got[2].dtype == np.float32
    assert np.all(np.diff(got[0]) >= 0)
    diff, total = multiset_mismatch(expected[0], expected[1], got[0], got[1])
    print(f"[diag] pc_threshold_spikes {kind}: {diff} of {total} differ")
    assert total > 100
    assert diff <= (NOISE_MISMATCH * total if kind == "noise" else 0)
    ia, ib = matched_rows(expected[0], expected[1], got[0], got[1])
    assert_values_close(got[2][ib], expected[2][ia], f"pc_threshold_spikes {kind} features")
    again = gpu.pc_threshold_spikes(gpu.asarray(data), gpu.asarray(wPCA), gpu.asarray(iC), threshold, NT0MIN)
    assert_bitwise_equal(got, again)


@pytest.mark.parametrize("kind", ["noise", "recording"])
@pytest.mark.parametrize("spacing", [0, 5])
def test_prototype_spikes(gpu, kind, spacing):
    """spacing 0 keeps every peak of err (no cleanup), so the peaks themselves are compared in bulk; the
    default cleanup keeps one seed per few channels of the whole batch."""
    rng = np.random.default_rng(4)
    n_chan = 64
    W, U, mu, iC, _ = synthetic_templates(n_chan, 96, rng)
    wTEMP = waveform_pcs(W, 6)
    if kind == "noise":
        data, threshold = rng.normal(size=(BATCH, n_chan)).astype(np.float32), 4.0
    else:
        data, _, _ = place_spikes(BATCH, W, U, mu, 800, rng)
        threshold = 10.0
    expected = cpu.prototype_spikes(data, wTEMP, iC, 7, threshold, spacing)
    got = [gpu.to_host(a) for a in gpu.prototype_spikes(gpu.asarray(data), gpu.asarray(wTEMP), gpu.asarray(iC), 7,
                                                         threshold, spacing)]
    assert got[0].dtype == np.int64 and got[1].dtype == np.int64
    assert np.all(np.diff(got[0]) > 0)
    diff, total = multiset_mismatch(expected[0], expected[1], got[0], got[1])
    print(f"[diag] prototype_spikes {kind} spacing {spacing}: {diff} of {total} differ")
    assert total > (200 if spacing == 0 else 4)
    assert diff <= (NOISE_MISMATCH * total if kind == "noise" else 0)
    # a seed found at the same time by both is on the same channel: channels whose nearest sets coincide (a few
    # percent of the samples here) score exact ties in both twins, which both give to the first channel
    channel_at = dict(zip(expected[0].tolist(), expected[1].tolist()))
    assert all(channel_at[t] == c for t, c in zip(got[0].tolist(), got[1].tolist()) if t in channel_at)
    again = gpu.prototype_spikes(gpu.asarray(data), gpu.asarray(wTEMP), gpu.asarray(iC), 7, threshold, spacing)
    assert_bitwise_equal(got, again)


PURSUIT_CASES = {
    # name: (Nchan, K, spikes placed, mu range, lam, threshold, noise only)
    "recording": (96, 384, 2500, (8.0, 25.0), 10.0, 6.0, False),  # a dozen chunks of 32 templates
    "recording-extract": (32, 64, 1200, (8.0, 25.0), 10.0, 4.0, False),
    "noise-no-prior": (32, 48, 0, (8.0, 25.0), 0.0, 3.0, True),
    "noise-prior": (32, 48, 0, (1.0, 3.0), 10.0, 3.0, True),
}


def run_pursuit(ops, inputs, lam, threshold, features):
    data, W, U, mu, sim, _ = inputs
    a = ops.asarray
    out = ops.match_pursuit(a(data), a(W), a(U), a(mu), a(sim["neighbors"]), a(sim["xcorr"]), threshold, lam, 60,
                            a(sim["iList"]) if features else None)
    return [None if o is None else ops.to_host(o) for o in out]


@pytest.mark.parametrize("case", list(PURSUIT_CASES))
def test_match_pursuit(gpu, case):
    n_chan, K, n_spikes, mu_range, lam, threshold, noise_only = PURSUIT_CASES[case]
    rng = np.random.default_rng(5)
    inputs = pursuit_inputs(n_chan, K, rng, n_spikes, mu_range, noise_only)
    expected = run_pursuit(cpu, inputs, lam, threshold, True)
    got = run_pursuit(gpu, inputs, lam, threshold, True)
    st, ids, y, x, residual, feat = got
    assert st.dtype == np.int64 and ids.dtype == np.int64
    assert y.dtype == x.dtype == residual.dtype == feat.dtype == np.float32
    assert np.all(np.diff(st) >= 0)
    diff, total = multiset_mismatch(expected[0], expected[1], st, ids)
    print(f"[diag] match_pursuit {case}: {diff} of {total} differ")
    assert total > 200
    assert diff <= (NOISE_MISMATCH * total if noise_only else 0)
    ia, ib = matched_rows(expected[0], expected[1], st, ids)
    assert len(ia) >= total - 2 * diff - 10
    assert_values_close(y[ib], expected[2][ia], f"match_pursuit {case} y")
    assert_values_close(x[ib], expected[3][ia], f"match_pursuit {case} x")
    assert_values_close(feat[ib], expected[5][ia], f"match_pursuit {case} features")
    # residuals agree away from the windows of unmatched spikes
    near = np.zeros(len(residual), dtype=bool)
    for times, rows in ((expected[0], ia), (st, ib)):
        alone = np.setdiff1d(np.arange(len(times)), rows)
        for t in times[alone]:  # test only: few unmatched spikes
            near[max(0, t - NT0):t + 2 * NT0] = True
    data = inputs[0]
    err = np.abs(residual[~near] - expected[4][~near]).max()
    print(f"[diag] match_pursuit {case} residual: max abs err {err:.3g} (scale {np.abs(data).max():.3g})")
    assert err <= DENSE_ATOL * np.abs(data).max()
    if not noise_only:  # the placed spikes are found (a check of the twins themselves)
        assert total >= 0.9 * n_spikes
    assert_bitwise_equal(got, run_pursuit(gpu, inputs, lam, threshold, True))
    no_features = run_pursuit(gpu, inputs, lam, threshold, False)
    assert no_features[5] is None
    assert_bitwise_equal(got[:5], no_features[:5])


def test_match_pursuit_without_templates(gpu):
    data = np.random.default_rng(6).normal(size=(4096, 8)).astype(np.float32)
    W, U = np.zeros((0, NT0, 3), np.float32), np.zeros((0, 8, 3), np.float32)
    out = gpu.match_pursuit(gpu.asarray(data), gpu.asarray(W), gpu.asarray(U), gpu.asarray(np.zeros(0, np.float32)),
                            gpu.asarray(np.zeros((0, 0), np.int64)), gpu.asarray(np.zeros((0, 0, 2 * NT0 - 1),
                                                                                         np.float32)),
                            6.0, 10.0, 60)
    assert len(out[0]) == 0 and out[5] is None
    np.testing.assert_array_equal(gpu.to_host(out[4]), data)


def spikes_of_a_pursuit():
    rng = np.random.default_rng(7)
    inputs = pursuit_inputs(64, 128, rng, 1500)
    data, W, U, mu, sim, iC = inputs
    st, ids, y, _, residual, _ = run_pursuit(cpu, inputs, 10.0, 6.0, False)
    return residual, st, ids, y, W, U, iC


def random_spikes(seed, n_spikes):
    """Random spikes of 90 synthetic templates on 40 channels over a noise residual of 20000 samples."""
    rng = np.random.default_rng(seed)
    W, U, _, iC, iW = synthetic_templates(40, 90, rng)
    residual = rng.normal(size=(20000, 40)).astype(np.float32)
    st = rng.integers(0, 20000 - NT0, size=n_spikes)
    ids = rng.integers(0, 90, size=n_spikes)
    y = rng.normal(10, 3, size=n_spikes).astype(np.float32)
    return residual, st, ids, y, W, U, iC, iW


@pytest.mark.parametrize("kind", ["random", "pursuit"])
def test_accumulate_templates(gpu, kind):
    if kind == "random":
        residual, st, ids, y, W, U, _, _ = random_spikes(8, 5000)
        st[:50] = st[50:100]  # repeated times
        ids %= 80  # templates 80..89 without spikes
    else:
        residual, st, ids, y, W, U, _ = spikes_of_a_pursuit()
    K = len(W)
    expected = cpu.accumulate_templates(residual, st, ids, y, W, U, K)
    a = gpu.asarray
    got = gpu.accumulate_templates(a(residual), a(st), a(ids), a(y), a(W), a(U), K)
    dwu, counts = (gpu.to_host(g) for g in got)
    assert dwu.dtype == np.float64 and counts.dtype == np.int64
    np.testing.assert_array_equal(counts, expected[1])
    assert_values_close(dwu, expected[0], f"accumulate_templates {kind}", rtol=1e-6)
    assert_bitwise_equal(got, gpu.accumulate_templates(a(residual), a(st), a(ids), a(y), a(W), a(U), K))
    empty = gpu.accumulate_templates(a(residual), a(st[:0]), a(ids[:0]), a(y[:0]), a(W), a(U), K)
    assert not gpu.to_host(empty[0]).any() and not gpu.to_host(empty[1]).any()
    selected = np.random.default_rng(1).random(len(st)) < 0.6
    expected = cpu.accumulate_templates(residual, st, ids, y, W, U, K, selected)
    dwu, counts = (gpu.to_host(g) for g in gpu.accumulate_templates(a(residual), a(st), a(ids), a(y), a(W), a(U), K,
                                                                     a(selected)))
    np.testing.assert_array_equal(counts, np.bincount(ids[selected], minlength=K))
    assert_values_close(dwu, expected[0], f"accumulate_templates {kind}, selected spikes", rtol=1e-6)
    none = gpu.accumulate_templates(a(residual), a(st), a(ids), a(y), a(W), a(U), K, a(np.zeros(len(st), bool)))
    assert not gpu.to_host(none[0]).any() and not gpu.to_host(none[1]).any()


@pytest.mark.parametrize("kind", ["random", "templates"])
def test_svd_templates(gpu, kind):
    rng = np.random.default_rng(12)
    n_chan, K = 64, 150
    W, U, mu, iC, iW = synthetic_templates(n_chan, K, rng)
    if kind == "random":
        dwu = rng.normal(size=(K, NT0, n_chan))
    else:  # running averages: the templates (shifted by up to 3 samples) plus some noise
        dwu = tm.dense_templates(W.astype(np.float64), U.astype(np.float64), mu.astype(np.float64))
        dwu = np.stack([np.roll(d, s, axis=0) for d, s in zip(dwu, rng.integers(-3, 4, K))])
        dwu += 0.05 * rng.normal(size=dwu.shape)
    iW = tm.peak_channels(dwu, NT0MIN) if kind == "templates" else iW
    Ka, Kb = tm.alignment_kernels(NT0, NT0MIN)
    W0 = np.zeros((K, NT0, 3))
    expected = cpu.svd_templates(dwu, W0, iC, iW, Ka, Kb, NT0MIN)
    a = gpu.asarray
    got = gpu.svd_templates(a(dwu), a(W0), a(iC), a(iW), a(Ka), a(Kb), NT0MIN)
    W_got, U_got, mu_got = (gpu.to_host(g) for g in got)
    assert W_got.shape == (K, NT0, 3) and U_got.shape == (K, n_chan, 3) and mu_got.dtype == np.float64
    # the first factor's sign is fixed, the others' are not: compare W_0, mu and the rank-3 templates W U'
    np.testing.assert_allclose(mu_got, expected[2], rtol=1e-9)
    np.testing.assert_allclose(W_got[:, :, 0], expected[0][:, :, 0], atol=1e-9)
    np.testing.assert_allclose(tm.dense_templates(W_got, U_got), tm.dense_templates(expected[0], expected[1]),
                               atol=1e-9)
    assert not U_got[~tm.neighbourhood_mask(iC, iW, n_chan)].any()
    assert_bitwise_equal(got, gpu.svd_templates(a(dwu), a(W0), a(iC), a(iW), a(Ka), a(Kb), NT0MIN))


@pytest.mark.parametrize("kind", ["random", "pursuit"])
def test_pc_features(gpu, kind):
    if kind == "random":
        residual, st, ids, y, W, U, iC, iW = random_spikes(9, 3000)
    else:
        residual, st, ids, y, W, U, iC = spikes_of_a_pursuit()
        iW = np.abs(np.einsum("ktr,kcr->ktc", W, U)[:, NT0MIN - 1]).argmax(axis=1)
    channels = iC[iW]
    wPCA = waveform_pcs(W, 3)
    expected = cpu.pc_features(residual, st, ids, y, W, U, channels, wPCA)
    a = gpu.asarray
    got = gpu.pc_features(a(residual), a(st), a(ids), a(y), a(W), a(U), a(channels), a(wPCA))
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert_values_close(gpu.to_host(got), expected, f"pc_features {kind}")
    assert_bitwise_equal([got], [gpu.pc_features(a(residual), a(st), a(ids), a(y), a(W), a(U), a(channels),
                                                 a(wPCA))])


def ground_truth_units(st3, gt_sorting, fs):
    import spikeinterface.comparison as scmp
    from spikeinterface.core import NumpySorting

    sorting = NumpySorting.from_samples_and_labels([st3[:, 0].astype(np.int64)], [st3[:, 1].astype(np.int64)], fs)
    accuracy = scmp.compare_sorter_to_ground_truth(gt_sorting, sorting, exhaustive_gt=True).get_performance()[
        "accuracy"].to_numpy(dtype=np.float64)
    return int((accuracy >= 0.8).sum()), accuracy


def test_pipeline_on_the_gpu_matches_the_cpu(tmp_path):
    import time

    from conftest import generate_recording
    from si_ks2py.pipeline import run

    recording, gt = generate_recording(duration=20.0, num_channels=32, num_units=8, seed=0)
    results = {}
    for device in ("cpu", "cuda"):
        t0 = time.perf_counter()
        ctx = run(recording, tmp_path / device, {"device": device, "progress": False}, verbose=False,
                  stop_after="extract")
        elapsed = time.perf_counter() - t0
        st3 = np.asarray(ctx.intermediate.st3)
        good, accuracy = ground_truth_units(st3, gt, recording.get_sampling_frequency())
        timings = {k: round(v, 2) for k, v in ctx.timings.items()}
        print(f"[diag] pipeline {device}: {len(st3)} spikes, {len(np.unique(st3[:, 1]))} templates, {good} units at "
              f"accuracy >= 0.8 ({np.round(accuracy, 3).tolist()}), {elapsed:.1f} s {timings}")
        results[device] = (len(st3), good)
    assert ctx.ops.name == "cuda"
    assert abs(results["cuda"][0] - results["cpu"][0]) <= 0.02 * results["cpu"][0]
    assert results["cuda"][1] == results["cpu"][1]


# ---------------------------------------------------------------------------------------------------------------
# splits: the segment ops in float64 (rtol 1e-9: only the order of the sums and libm's exp/log differ), on segments
# shorter and longer than the running mean's +-1000 spikes and than a chunk, and whole pursuits of several clusters
# at once: the same splits as on the host.

SEGMENT_COUNTS = np.array([5000, 700, 300, 1, 2600])


def test_segment_sum_and_gram(gpu):
    rng = np.random.default_rng(19)
    x = rng.normal(size=(SEGMENT_COUNTS.sum(), 12)) + 3
    weight = rng.random(len(x))
    np.testing.assert_allclose(gpu.to_host(gpu.segment_sum(gpu.asarray(x), SEGMENT_COUNTS)),
                               cpu.segment_sum(x, SEGMENT_COUNTS), rtol=1e-9)
    np.testing.assert_allclose(gpu.to_host(gpu.segment_sum(gpu.asarray(x[:, 0]), SEGMENT_COUNTS)),
                               cpu.segment_sum(x[:, 0], SEGMENT_COUNTS), rtol=1e-9)
    np.testing.assert_allclose(gpu.to_host(gpu.segment_gram(gpu.asarray(x), SEGMENT_COUNTS, gpu.asarray(weight))),
                               cpu.segment_gram(x, SEGMENT_COUNTS, weight), rtol=1e-9)


def test_segment_running_mean(gpu):
    x = np.random.default_rng(20).normal(size=(SEGMENT_COUNTS.sum(), 12)).cumsum(axis=0)
    np.testing.assert_allclose(gpu.to_host(gpu.segment_running_mean(gpu.asarray(x), SEGMENT_COUNTS, 250.0)),
                               cpu.segment_running_mean(x, SEGMENT_COUNTS, 250.0), rtol=1e-9,
                               atol=1e-9 * np.abs(x).max())


def test_segment_em_step(gpu):
    rng = np.random.default_rng(21)
    counts = np.array([4000, 600, 2000])
    x = np.concatenate([rng.normal(-2, 1, 3000), rng.normal(3, 0.5, 1000), rng.normal(0, 1, 600),
                        rng.normal(0, 1, 1000), rng.normal(5, 2, 1000)])
    params = np.array([[0.5, 1.0, -1.0, 2.0, 2.0], [0.3, 0.5, -0.5, 1.0, 1.0], [0.5, 4.0, 0.0, 1.0, 1.0]])
    active = np.array([True, False, True])
    rs_cpu, rs_gpu = np.zeros((len(x), 2)), gpu.xp.zeros((len(x), 2))
    for _ in range(5):
        new_cpu = cpu.segment_em_step(x, counts, params, rs_cpu, active)
        new_gpu = gpu.to_host(gpu.segment_em_step(gpu.asarray(x), counts, gpu.asarray(params), rs_gpu,
                                                  gpu.asarray(active)))
        np.testing.assert_allclose(new_gpu, new_cpu, rtol=1e-9)
        np.testing.assert_allclose(gpu.to_host(rs_gpu), rs_cpu, rtol=1e-9, atol=1e-12)
        params = new_cpu
    np.testing.assert_array_equal(params[1], [0.3, 0.5, -0.5, 1.0, 1.0])  # inactive: untouched
    assert not rs_cpu[4000:4600].any()


def test_split_pursuits_on_gpu_match_host(gpu):
    from si_ks2py.stages.split import try_splits

    rng = np.random.default_rng(22)
    counts = np.array([8000, 400, 3000, 12000])
    d = 12
    clp0, labels = [], []
    for n, shift in zip(counts, (8.0, 0.0, 6.0, 0.0)):  # two bimodal clusters, two not
        side = rng.random(n) < 0.4
        clp0.append(rng.normal(size=(n, d)) + np.where(side[:, None], shift, 0.0) * np.eye(d)[1])
        labels.append(side)
    clp0 = np.concatenate(clp0).astype(np.float32)
    times = [np.sort(rng.uniform(0, 300, n)) for n in counts]
    wPCA = np.linalg.qr(rng.normal(size=(61, 3)))[0]
    for from_mean in (False, True):
        on_host = try_splits(cpu, clp0, counts, times, wPCA, from_mean, 0.9)
        on_gpu = try_splits(gpu, clp0, counts, times, wPCA, from_mean, 0.9)
        for h, g in zip(on_host, on_gpu):
            assert (h is None) == (g is None)
            if h is not None:
                np.testing.assert_array_equal(g[0], h[0])
                np.testing.assert_allclose(g[1], h[1], rtol=1e-9)
        assert [r is not None for r in on_host] == [True, False, True, False]
        for result, side in zip(on_host[::2], labels[::2]):
            assert min(np.mean(result[0] == side), np.mean(result[0] != side)) < 0.01


def drift_grid(n_chan: int):
    """The drift detector's grid on a 2-column probe of n_chan channels (20 um pitch, columns 32 um apart)."""
    from si_ks2py.stages.drift import detector_grid

    xc = np.tile([0.0, 32.0], n_chan // 2)
    yc = np.repeat(np.arange(n_chan // 2) * 20.0, 2)
    return detector_grid(xc, yc, np.zeros(n_chan, dtype=np.int64))


@pytest.mark.parametrize("kind", ["noise", "recording"])
def test_grid_amplitudes_and_their_peaks(gpu, kind):
    rng = np.random.default_rng(11)
    n_chan = 64
    grid = drift_grid(n_chan)
    W, U, mu, _, _ = synthetic_templates(n_chan, 32, rng)
    wTEMP = waveform_pcs(W, 6)
    if kind == "noise":
        data, threshold = rng.normal(size=(BATCH // 4, n_chan)).astype(np.float32), 4.0
    else:
        data, _, _ = place_spikes(BATCH // 2, W, U, mu, 800, rng)
        threshold = 8.0
    filtered = cpu.correlate_valid(data, wTEMP)
    expected = cpu.grid_amplitudes(filtered, grid.iC, grid.weights, threshold)
    got = gpu.to_host(gpu.grid_amplitudes(gpu.asarray(filtered), gpu.asarray(grid.iC), gpu.asarray(grid.weights),
                                          threshold))
    assert got.shape == (len(data), len(grid.x)) and got.dtype == np.float32 and (got >= 0).all()
    assert (expected > 0).sum() > 100
    # values within rounding of the threshold may be kept by one twin and not the other
    close = np.abs(np.maximum(got, expected) - threshold) < 1e-4 * threshold
    np.testing.assert_allclose(got[~close], expected[~close], rtol=0, atol=1e-5 * np.abs(expected).max())
    peaks = cpu.local_peaks(expected, grid.neighbours, threshold, NT0, NT0MIN)
    got_peaks = [gpu.to_host(a) for a in gpu.local_peaks(gpu.asarray(expected), gpu.asarray(grid.neighbours),
                                                         threshold, NT0, NT0MIN)]
    diff, total = multiset_mismatch(peaks[0], peaks[1], got_peaks[0], got_peaks[1])
    print(f"[diag] grid peaks {kind}: {diff} of {total} differ")
    assert total > 50 and diff == 0  # same input: the same peaks
    again = gpu.grid_amplitudes(gpu.asarray(filtered), gpu.asarray(grid.iC), gpu.asarray(grid.weights), threshold)
    assert_bitwise_equal([got], [gpu.to_host(again)])
