"""The GPU's detection kernels (detect.cu: correlate_valid, prototype scoring) and template factorisation kernels
(templates.cu) run on the host by an emulation of their CUDA constructs (tests/cuda_host), against the NumPy
twins, on machines without a GPU; the parity tests marked gpu run the compiled kernels.

- correlate_valid: a direct float32 sum against a float64 one, to 1e-5 of the output's scale.
- Prototype scores: the twin sums each channel's nearest channels by a matrix product, the kernel in ascending
  channel order; the scores agree to 1e-5 of their scale and every window start has the same best channel.
- neighbourhood_gram and align_templates (given the twin's own eigenvectors): float64, to 1e-10; rank-one
  templates' other factors are 0 in both.
- Template projections (pursuit.cu): a float32 sum over each chunk's channel window against a float64 direct sum,
  to 1e-5 of the largest projection, and the NumPy twin's (a float32 FFT) to 1e-4; every chunk's window is the
  range of channels where its templates' U is non-zero.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from si_ks2py import templates as tm
from si_ks2py.cpu import ops as cpu
from test_ops_parity import NT0, NT0MIN, probe_iC, synthetic_templates

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the host emulation")
RUNNER = Path(__file__).parent / "cuda_host" / "run_kernels.py"


def emulate(tmp_path, kernel: str, **given) -> dict:
    np.savez(tmp_path / "in.npz", **given)
    subprocess.run([sys.executable, str(RUNNER), kernel, str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                   check=True, timeout=600)
    return dict(np.load(tmp_path / "out.npz"))


def direct_correlation(x, filters):
    """[n, C, F] float64: out[t, c, f] = sum_i filters[i, f] x[t + i, c], 0 beyond the last window start."""
    n, nt0 = len(x), len(filters)
    out = np.zeros((n,) + x.shape[1:] + filters.shape[1:])
    for t in range(n - nt0 + 1):
        out[t] = x[t:t + nt0].astype(np.float64).T @ filters.astype(np.float64)
    return out


@pytest.mark.parametrize("n, n_chan, F", [(200, 40, 3), (150, 70, 6), (130, 33, 9)])
def test_correlate_valid_matches_a_direct_sum(tmp_path, n, n_chan, F):
    rng = np.random.default_rng(F)
    x = rng.normal(size=(n, n_chan)).astype(np.float32)
    filters = rng.normal(size=(NT0, F)).astype(np.float32)
    out = emulate(tmp_path, "correlate_valid", x=x, filters=filters)["out"]
    expected = direct_correlation(x, filters)
    np.testing.assert_allclose(out, expected, atol=1e-5 * np.abs(expected).max())
    assert not out[n - NT0 + 1:].any()


def twin_scores(filtered, iC, n_sum):
    """The NumPy twin's prototype scores (cpu.ops.prototype_spikes): best[t, i] over sums of nearest channels."""
    n, C, R = filtered.shape
    rows = filtered.transpose(0, 2, 1).reshape(n * R, C)
    best = np.zeros((n, C), dtype=np.float32)
    for j in range(n_sum):
        nearest = np.zeros((C, C), dtype=np.float32)
        nearest[iC[:, :j + 1], np.arange(C)[:, None]] = 1
        np.maximum(best, ((rows @ nearest).reshape(n, R, C) ** 2).max(axis=1) / np.float32(j + 1), out=best)
    return best


@pytest.mark.parametrize("n_chan, R, tile, threads", [(40, 6, 4, 64), (70, 6, 3, 64), (20, 3, 1, 32)])
def test_prototype_scores_match_the_numpy_twin(tmp_path, n_chan, R, tile, threads):
    rng = np.random.default_rng(n_chan)
    n = 200
    data = 0.3 * rng.normal(size=(n, n_chan)).astype(np.float32)
    data[::37] += 3  # events on every channel: scores with a clear best channel
    filtered = direct_correlation(data, rng.normal(size=(NT0, R)).astype(np.float32)).astype(np.float32)
    iC = probe_iC(n_chan)
    out = emulate(tmp_path, "prototype_scores", filtered=filtered, iC=iC, n_sum=7, nt0=NT0, tile=tile,
                  threads=threads)
    best = twin_scores(filtered, iC, 7)
    err, channel = best.max(axis=1), best.argmax(axis=1)
    err[n - NT0 + 1:] = 0
    np.testing.assert_allclose(out["err"], err, atol=1e-5 * err.max())
    np.testing.assert_array_equal(out["channel"], channel)


@pytest.mark.parametrize("kind", ["templates", "random", "rank one"])
def test_template_factorisation_kernels_match_the_numpy_twin(tmp_path, kind):
    rng = np.random.default_rng(3)
    n_chan, K = 24, 12
    W, U, mu, iC, iW = synthetic_templates(n_chan, K, rng)
    if kind == "templates":  # running averages: templates shifted by up to 3 samples, plus noise
        dwu = tm.dense_templates(W.astype(np.float64), U.astype(np.float64), mu.astype(np.float64))
        dwu = np.stack([np.roll(d, s, axis=0) for d, s in zip(dwu, rng.integers(-3, 4, K))])
        dwu += 0.05 * rng.normal(size=dwu.shape)
    elif kind == "random":  # no template shape: peaks of either sign, anywhere
        dwu = rng.normal(size=(K, NT0, n_chan))
    else:  # one waveform on every channel: the factors beyond the first are 0
        dwu = tm.dense_templates(W[:, :, :1].astype(np.float64), U[:, :, :1].astype(np.float64), mu.astype(np.float64))
    iW = tm.peak_channels(dwu, NT0MIN)
    near = np.take_along_axis(dwu, iC[iW][:, None, :], axis=2)  # [K, nt0, n_near]: the neighbourhoods
    gram = emulate(tmp_path, "neighbourhood_gram", dWU=dwu, iC=iC, iW=iW)["gram"]
    np.testing.assert_allclose(gram, near.transpose(0, 2, 1) @ near, rtol=1e-10, atol=1e-10 * np.abs(gram).max())
    Ka, Kb = tm.alignment_kernels(NT0, NT0MIN)
    expected = tm.svd_templates(dwu, np.zeros((K, NT0, 3)), iC, iW, Ka, Kb, NT0MIN)
    vectors = np.linalg.eigh(near.transpose(0, 2, 1) @ near)[1]  # the twin's own eigenvectors
    got = emulate(tmp_path, "align_templates", vectors=np.ascontiguousarray(vectors), dWU=dwu, iC=iC, iW=iW, Ka=Ka,
                  Kb=Kb, rank=3, nt0min=NT0MIN, rank_tolerance=tm.RANK_TOLERANCE)
    for name, want in zip(("W", "U", "mu"), expected):
        np.testing.assert_allclose(got[name], want, rtol=1e-10, atol=1e-10, err_msg=name)
    assert (not got["W"][:, :, 1:].any()) == (kind == "rank one")


def direct_projections(data, W, U):
    """[n, K] float64: <W_k U_k', data[t:t+nt0]> for window starts t <= n - nt0, 0 beyond."""
    n, (K, nt0, _) = len(data), W.shape
    templates = tm.dense_templates(W.astype(np.float64), U.astype(np.float64))  # [K, nt0, C]
    B = np.zeros((n, K))
    for t in range(n - nt0 + 1):
        B[t] = np.einsum("kic,ic->k", templates, data[t:t + nt0].astype(np.float64))
    return B


@pytest.mark.parametrize("case, starts", [("sorted", 16), ("unsorted", 8), ("long", 16), ("long", 8),
                                          ("silent chunk", 8), ("rank two", 16)])
def test_template_projections_match_a_direct_sum(tmp_path, case, starts):
    rng = np.random.default_rng(len(case))
    n_chan, K = {"sorted": (96, 70), "unsorted": (40, 33), "long": (48, 20), "silent chunk": (64, 40),
                 "rank two": (40, 36)}[case]
    W, U, mu, iC, iW = synthetic_templates(n_chan, K, rng)
    if case == "sorted":  # as the stages hold them: by peak channel, so each chunk spans a short window
        order = np.argsort(iW, kind="stable")
        W, U = W[order], U[order]
    elif case == "unsorted":  # U on every channel: the window is the whole probe, two slabs, the second partial
        U = rng.normal(size=U.shape).astype(np.float32)
    elif case == "long":  # nt0 = 81: more rows than a thread's group of rows covers in one pass
        W = rng.normal(size=(K, 81, 3)).astype(np.float32)
    elif case == "rank two":
        W, U = np.ascontiguousarray(W[:, :, :2]), np.ascontiguousarray(U[:, :, :2])
    else:  # the second chunk of 32 templates has no spatial factors at all
        U[32:] = 0
    data = rng.normal(size=(150, n_chan)).astype(np.float32)
    out = emulate(tmp_path, "template_projections", data=data, W=W, U=U, starts=starts)
    expected = direct_projections(data, W, U)
    scale = np.abs(expected).max()
    np.testing.assert_allclose(out["B"], expected, atol=1e-5 * scale)
    np.testing.assert_allclose(out["B"], cpu._template_projections(data, W, U)[:len(data), :K], atol=1e-4 * scale)
    for j, (lo, hi) in enumerate(out["window"].reshape(-1, 2)):
        used = np.flatnonzero(U[32 * j:32 * (j + 1)].any(axis=(0, 2)))
        assert (lo, hi) == ((used[0], used[-1]) if len(used) else (n_chan, -1))
    if case == "sorted":
        assert (out["window"][1::2] - out["window"][::2]).max() < n_chan / 2


@pytest.mark.parametrize("tile, threads", [(8, 256), (3, 32)])
def test_grid_amplitudes_match_the_twin(tmp_path, tile, threads):
    """drift.cu's grid_amplitudes (the block's rows staged in shared memory, grid points strided by the block) against
    the NumPy twin, on a 2-column probe's grid: the same amplitudes to 1e-5 of their scale, zero where the twin
    skips a window start or the amplitude is under the threshold."""
    from si_ks2py.stages.drift import detector_grid

    rng = np.random.default_rng(tile)
    n_chan, n, threshold = 24, 90, 2.5
    xc, yc = np.tile([0.0, 32.0], n_chan // 2), np.repeat(np.arange(n_chan // 2) * 20.0, 2)
    grid = detector_grid(xc, yc, np.zeros(n_chan, dtype=np.int64))
    filtered = rng.normal(size=(n, n_chan, 6)).astype(np.float32)
    filtered[40:45, 8:14] *= 4  # a few window starts well above the threshold
    out = emulate(tmp_path, "grid_amplitudes", filtered=filtered, iC=grid.iC, weights=grid.weights, tile=tile,
                  threads=threads, threshold=threshold)["amp"]
    expected = cpu.grid_amplitudes(filtered, grid.iC, grid.weights, threshold)
    assert (expected > 0).sum() > 20 and (out > 0).sum() > 20
    close = np.abs(np.maximum(out, expected) - threshold) < 1e-5 * threshold
    np.testing.assert_allclose(out[~close], expected[~close], rtol=0, atol=1e-5 * np.abs(expected).max())
