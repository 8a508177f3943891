"""Run pursuit.cu's pursuit_loop on the host (prelude.h, driver.cpp) for tests on machines without a GPU:

    python run_pursuit_loop.py INPUTS.npz OUTPUTS.npz GRID THREADS

INPUTS holds the kernel's arrays under its argument names (B [n, K], err, ftype, residual, T, lam_mu, lmm, mu,
neighbors, xcorr, ftemp) and the scalars n_iter, thr2, lam, denom; OUTPUTS gets st_all, ids_all, y_all, x_all,
feat_all, counts, residual and sync. It runs in a process of its own: forking a process that holds thread pools
(scipy's FFT workers) can deadlock in their fork handlers.
"""

import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

from emulation import GPU_SOURCES, build, shared

# the part of pursuit.cu that pursuit_loop needs: from cost_row to the end of pursuit_loop
SECTION = ("// Cost of row t, computed by one warp", "// dwu[k, i, c] = sum over the spikes")
GIVEN = ("B", "err", "ftype", "residual", "T", "lam_mu", "lmm", "mu", "neighbors", "xcorr", "ftemp")
POINTERS = GIVEN + ("flags", "block_count", "sync", "st_all", "ids_all", "y_all", "x_all", "feat_all", "counts")
INTS = ("n", "C", "K", "nt0", "M", "n_near", "n_iter", "capacity")
FLOATS = ("thr2", "lam", "denom")


class LoopArgs(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in POINTERS] + [(name, ctypes.c_int) for name in INTS]
                + [(name, ctypes.c_float) for name in FLOATS])


def pursuit_loop_source(threads: int) -> str:
    source = (GPU_SOURCES / "pursuit.cu").read_text()
    start, end = (source.index(marker) for marker in SECTION)
    section = source[start:end]
    if "#define LOOP_THREADS 1024" not in section:
        raise RuntimeError("pursuit.cu no longer defines LOOP_THREADS as this emulation expects")
    return section.replace("#define LOOP_THREADS 1024", f"#define LOOP_THREADS {threads}")


def main(inputs: str, outputs: str, grid: int, threads: int):
    given = dict(np.load(inputs))
    n, K = given["B"].shape
    nt0, n_near, n_iter = given["T"].shape[1], given["ftemp"].shape[1], int(given["n_iter"])
    capacity = (n - nt0) // nt0 + 1
    keep = []
    arrays = {name: shared(given[name], keep) for name in GIVEN}
    arrays.update(flags=shared(np.zeros(n, np.uint8), keep), block_count=shared(np.zeros(grid, np.int32), keep),
                  sync=shared(np.zeros(2, np.uint32), keep),
                  st_all=shared(np.zeros((n_iter, capacity), np.int64), keep),
                  ids_all=shared(np.zeros((n_iter, capacity), np.int64), keep),
                  y_all=shared(np.zeros((n_iter, capacity), np.float32), keep),
                  x_all=shared(np.zeros((n_iter, capacity), np.float32), keep),
                  feat_all=shared(np.zeros((n_iter, capacity, n_near), np.float32), keep),
                  counts=shared(np.zeros(n_iter, np.int32), keep))
    sizes = dict(n=n, C=given["residual"].shape[1], K=K, nt0=nt0, M=given["neighbors"].shape[1], n_near=n_near,
                 n_iter=n_iter, capacity=capacity)
    args = LoopArgs(**{name: a.ctypes.data for name, a in arrays.items()}, **sizes,
                    **{name: float(given[name]) for name in FLOATS})
    with tempfile.TemporaryDirectory() as folder:
        library = build(Path(folder), pursuit_loop_source(threads), "driver.cpp", "pursuit_loop")
        if library.run_pursuit_loop(grid, threads, ctypes.byref(args)):
            raise RuntimeError("a block of the emulated pursuit_loop did not finish")
    np.savez(outputs, **{name: np.array(arrays[name]) for name in
                         ("st_all", "ids_all", "y_all", "x_all", "feat_all", "counts", "residual", "sync")})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
