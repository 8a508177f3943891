"""CuPy ops (same names, signatures and outputs as the NumPy twins in si_ks2py.cpu.ops).

Kernels live in the .cu files of this package and are compiled once per process with cupy.RawModule (CuPy also
caches the binaries on disk).
"""

from __future__ import annotations

import functools
from importlib import resources

import cupy as cp
import numpy as np

xp = cp
name = "cuda"


@functools.lru_cache(maxsize=None)
def _module(file: str):
    source = resources.files("si_ks2py.gpu").joinpath(f"{file}.cu").read_text()
    return cp.RawModule(code=source, options=("--std=c++17",))


def _kernel(file: str, function: str):
    return _module(file).get_function(function)


def _blocks(n: int, threads: int) -> tuple[int]:
    return ((n + threads - 1) // threads,)


def asarray(a, dtype=None):
    return cp.asarray(a, dtype=dtype)


def to_host(a):
    return cp.asnumpy(a)


def synchronize():
    cp.cuda.get_current_stream().synchronize()


def filtfilt_zero_state(x, b, a):
    """See si_ks2py.cpu.ops.filtfilt_zero_state."""
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b, a = b / a[0], a / a[0]
    order = len(a) - 1
    if len(b) != len(a) or not 1 <= order <= 6:
        raise ValueError("filtfilt_zero_state needs b and a of equal length between 2 and 7")
    n, C = x.shape
    y = cp.empty_like(x)
    _kernel("preprocess", "filtfilt_zero_state")(
        _blocks(C, 64), (64,), (x, y, cp.asarray(b), cp.asarray(a), np.int32(order), np.int32(n), np.int32(C))
    )
    return y


def _running_window(x, half_width: int, axis: int, use_min: bool):
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    n = x.shape[axis]
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    y = cp.empty_like(x)
    _kernel("preprocess", "running_window")(
        _blocks(x.size, 256), (256,),
        (x, y, np.int32(outer), np.int32(n), np.int32(inner), np.int32(half_width), np.int32(use_min)),
    )
    return y


def running_min(x, half_width: int, axis: int):
    """See si_ks2py.cpu.ops.running_min."""
    return _running_window(x, half_width, axis, True)


def running_sum(x, half_width: int, axis: int):
    """See si_ks2py.cpu.ops.running_sum."""
    return _running_window(x, half_width, axis, False)
