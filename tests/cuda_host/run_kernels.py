"""Run the kernels of detect.cu, templates.cu, drift.cu and pursuit.cu's template projections on the host (prelude.h,
launch.h, kernels.cpp) for tests on machines without a GPU:

    python run_kernels.py KERNEL INPUTS.npz OUTPUTS.npz

KERNEL is correlate_valid (inputs x [n, C], filters [nt0, F] float32; output out [n, C, F]), prototype_scores
(filtered [n, C, R] float32, iC [C, n_near] int64, n_sum, nt0, tile, threads; outputs err [n], channel [n]),
neighbourhood_gram (dWU [K, nt0, C] float64, iC [C, n_near], iW [K] int64; output gram [K, n_near, n_near]),
align_templates (vectors [K, n_near, n_near], dWU, iC, iW, Ka [nup, nt0], Kb [nup, nt0, nt0] float64, rank,
nt0min, rank_tolerance; outputs W, U, mu) or template_projections (data [n, C], W [K, nt0, R], U [K, C, R]
float32, starts: 16 or 8; outputs B [n, K], window) or grid_amplitudes (filtered [n, C, 6], iC [G, J] int64, weights
[G, J, 5] float32, tile, threads, threshold; output amp [n, G]).
It runs in a process of its own: forking a process that holds thread pools (scipy's FFT workers) can deadlock in
their fork handlers.
"""

import ctypes
import sys
import tempfile
from pathlib import Path

import numpy as np

from emulation import GPU_SOURCES, build, pointer, shared

# the part of pursuit.cu with the template projections
PROJECTIONS = ("#define PJ_TEMPLATES", "// Cost of row t, computed by one warp")


def run(library, kernel: str, given: dict) -> dict:
    keep = []
    a = {name: shared(value, keep) for name, value in given.items() if value.ndim}
    if kernel == "correlate_valid":
        (n, C), (nt0, F) = a["x"].shape, a["filters"].shape
        out = shared(np.zeros((n, C, F), np.float32), keep)
        failed = library.run_correlate_valid(pointer(a["x"]), pointer(a["filters"]), pointer(out), n, C, nt0, F)
        result = {"out": out}
    elif kernel == "prototype_scores":
        n, C, R = a["filtered"].shape
        n_sum = int(given["n_sum"])
        table = shared(np.zeros((n_sum * (n_sum + 1) // 2, C), np.int32), keep)
        err, channel = shared(np.zeros(n, np.float32), keep), shared(np.zeros(n, np.int64), keep)
        failed = library.run_prototype_scores(
            pointer(a["filtered"]), pointer(a["iC"]), pointer(table), pointer(err), pointer(channel), n, C, R,
            a["iC"].shape[1], n_sum, int(given["nt0"]), int(given["tile"]), int(given["threads"]))
        result = {"err": err, "channel": channel}
    elif kernel == "neighbourhood_gram":
        K, nt0, C = a["dWU"].shape
        n_near = a["iC"].shape[1]
        gram = shared(np.zeros((K, n_near, n_near)), keep)
        failed = library.run_neighbourhood_gram(pointer(a["dWU"]), pointer(a["iC"]), pointer(a["iW"]), pointer(gram),
                                                K, nt0, C, a["iC"].shape[1])
        result = {"gram": gram}
    elif kernel == "align_templates":
        K, nt0, C = a["dWU"].shape
        R = int(given["rank"])
        W, U, mu = (shared(np.zeros(shape), keep) for shape in ((K, nt0, R), (K, C, R), (K,)))
        failed = library.run_align_templates(
            pointer(a["vectors"]), pointer(a["dWU"]), pointer(a["iC"]), pointer(a["iW"]), pointer(a["Ka"]),
            pointer(a["Kb"]), pointer(W), pointer(U), pointer(mu), K, nt0, C, a["iC"].shape[1], R,
            a["Ka"].shape[0], int(given["nt0min"]), ctypes.c_double(float(given["rank_tolerance"])))
        result = {"W": W, "U": U, "mu": mu}
    elif kernel == "template_projections":
        (n, C), (K, nt0, R) = a["data"].shape, a["W"].shape
        Wt = shared(a["W"].transpose(1, 2, 0), keep)
        window = shared(np.zeros(2 * (-(-K // 32)), np.int32), keep)
        B = shared(np.zeros((n, K), np.float32), keep)
        failed = library.run_template_projections(pointer(a["data"]), pointer(a["U"]), pointer(Wt), pointer(window),
                                                  pointer(B), n, C, K, nt0, R, int(given["starts"]))
        result = {"B": B, "window": window}
    elif kernel == "grid_amplitudes":
        n, C, R = a["filtered"].shape
        G, J, S = a["weights"].shape
        amp = shared(np.zeros((n, G), np.float32), keep)
        failed = library.run_grid_amplitudes(pointer(a["filtered"]), pointer(a["iC"]), pointer(a["weights"]),
                                             pointer(amp), n, C, G, J, int(given["tile"]), int(given["threads"]),
                                             ctypes.c_float(float(given["threshold"])))
        result = {"amp": amp}
    else:
        raise ValueError(f"no emulation of {kernel}")
    if failed:
        raise RuntimeError(f"a block of the emulated {kernel} did not finish")
    return {name: np.array(value) for name, value in result.items()}


def main(kernel: str, inputs: str, outputs: str):
    source = "\n".join((GPU_SOURCES / name).read_text() for name in ("detect.cu", "templates.cu", "drift.cu"))
    pursuit = (GPU_SOURCES / "pursuit.cu").read_text()
    source += "\n" + pursuit[pursuit.index(PROJECTIONS[0]):pursuit.index(PROJECTIONS[1])]
    with tempfile.TemporaryDirectory() as folder:
        library = build(Path(folder), source, "kernels.cpp", "kernels")
        np.savez(outputs, **run(library, kernel, dict(np.load(inputs))))


if __name__ == "__main__":
    main(*sys.argv[1:4])
