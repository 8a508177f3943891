"""Loading and launching the package's CUDA kernels (the .cu files beside this module), shared by the GPU op
table's modules."""

from __future__ import annotations

import functools
from importlib import resources

import cupy as cp
import numpy as np

DEFAULT_SHARED_BYTES = 48 * 1024


@functools.lru_cache(maxsize=None)
def module(file: str):
    """The compiled module of ``file``.cu (CuPy caches the binary on disk)."""
    source = resources.files("si_ks2py.gpu").joinpath(f"{file}.cu").read_text()
    return cp.RawModule(code=source, options=("--std=c++17",))


@functools.lru_cache(maxsize=None)
def kernel(file: str, function: str):
    return module(file).get_function(function)  # looked up once: a lookup costs about as much as a launch


@functools.lru_cache(maxsize=None)
def _shared_bytes_optin(device: int) -> int:
    return cp.cuda.Device(device).attributes["MaxSharedMemoryPerBlockOptin"]


def max_shared_bytes() -> int:
    """The most dynamic shared memory a block of the current GPU may ask for (227 KiB on an H100, 99 KiB on
    compute capability 8.6 and 8.9)."""
    return _shared_bytes_optin(cp.cuda.Device().id)


def blocks(n: int, threads: int) -> tuple[int]:
    return ((n + threads - 1) // threads,)


def launch(file: str, function: str, grid, block, args, shared_mem: int = 0):
    compiled = kernel(file, function)
    if shared_mem > DEFAULT_SHARED_BYTES:
        compiled.max_dynamic_shared_size_bytes = shared_mem
    compiled(tuple(int(g) for g in grid), tuple(block), args, shared_mem=shared_mem)


def f32(a):
    return cp.ascontiguousarray(cp.asarray(a, dtype=cp.float32))


def i64(a):
    return cp.ascontiguousarray(cp.asarray(a, dtype=cp.int64))


def i32(v) -> np.int32:
    return np.int32(v)
