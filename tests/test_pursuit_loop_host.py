"""The GPU's whole-batch pursuit kernel (pursuit.cu's pursuit_loop) run on the host by an emulation of its CUDA
constructs (tests/cuda_host), against the NumPy twin: the same spikes, amplitudes, scores, features and residual,
bit for bit (the kernel starts from the twin's own projections, and its arithmetic rounds as the twin's does).
It checks the kernel's phases, its ordered collection of spikes across blocks and its grid barrier on machines
without a GPU; the parity tests marked gpu run the compiled kernel."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from si_ks2py import templates as tm
from si_ks2py.cpu import ops as cpu
from test_ops_parity import place_spikes, synthetic_templates

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++ to build the host emulation")
RUNNER = Path(__file__).parent / "cuda_host" / "run_pursuit_loop.py"
N_ITER = 60


def kernel_inputs(data, W, U, mu, neighbors, xcorr, ftemp, threshold, lam):
    """pursuit_loop's inputs as gpu.ops.match_pursuit prepares them, from the twin's projections."""
    K, nt0, _ = W.shape
    last = len(data) - nt0
    B = cpu._template_projections(data, W, U)[:len(data), :K]
    lam_mu = np.float32(lam) * mu
    cost = (np.maximum(B[:last + 1], 0) + lam_mu) ** 2 / np.float32(1 + lam) - lam_mu * mu
    err, ftype = np.zeros(len(data), np.float32), np.zeros(len(data), np.int32)
    err[:last + 1], ftype[:last + 1] = np.maximum(cost.max(axis=1), 0), cost.argmax(axis=1)
    return dict(B=B, err=err, ftype=ftype, residual=data, T=tm.dense_templates(W, U).astype(np.float32),
                lam_mu=lam_mu, lmm=lam_mu * mu, mu=mu, neighbors=neighbors, xcorr=xcorr, ftemp=ftemp,
                n_iter=N_ITER, thr2=np.float32(threshold * threshold), lam=np.float32(lam),
                denom=np.float32(1 + lam))


@pytest.mark.parametrize("grid, threads, spikes", [(3, 64, 80), (5, 32, 0), (2, 1024, 80)])
def test_pursuit_loop_matches_the_numpy_twin(tmp_path, grid, threads, spikes):
    rng = np.random.default_rng(grid)
    n_chan, K = 16, 24
    W, U, mu, iC, iW = synthetic_templates(n_chan, K, rng, (8.0, 25.0) if spikes else (1.0, 3.0))
    if spikes:
        data, _, _ = place_spikes(6000, W, U, mu, spikes, rng)
        threshold = 6.0
    else:
        data, threshold = rng.normal(size=(6000, n_chan)).astype(np.float32), 3.0
    neighbors = tm.overlap_neighbors(iC, iW, n_chan)
    xcorr = tm.neighbor_xcorr(W, U, neighbors)
    ftemp = tm.similarity(cpu, W, U, iC, iW, n_chan, 8)["iList"]
    np.savez(tmp_path / "in.npz", **kernel_inputs(data, W, U, mu, neighbors, xcorr, ftemp, threshold, 10.0))
    subprocess.run([sys.executable, str(RUNNER), str(tmp_path / "in.npz"), str(tmp_path / "out.npz"), str(grid),
                    str(threads)], check=True, timeout=600)
    out = np.load(tmp_path / "out.npz")
    counts = out["counts"].astype(np.int64)
    assert counts[0] > 10
    ran = np.flatnonzero(counts == 0)[0] + 1  # iterations run, the last finding nothing
    assert out["sync"][0] == 0 and out["sync"][1] == 5 * (ran - 1) + 1  # every barrier of every iteration passed
    capacity = out["st_all"].shape[1]
    index = np.concatenate([i * capacity + np.arange(c) for i, c in enumerate(counts)])
    got = [out[name].reshape(-1, *out[name].shape[2:])[index] for name in ("st_all", "ids_all", "y_all", "x_all",
                                                                         "feat_all")]
    order = np.argsort(got[0], kind="stable")
    st, ids, y, x, feat = (a[order] for a in got)
    expected = cpu.match_pursuit(data, W, U, mu, neighbors, xcorr, threshold, 10.0, N_ITER, ftemp)
    for name, mine, twin in zip(("st", "ids", "y", "x", "residual", "features"),
                                (st, ids, y, x, out["residual"], feat), expected):
        np.testing.assert_array_equal(mine, twin, err_msg=name)
