"""NumPy twins of the GPU ops (same names, signatures and outputs as si_ks2py.gpu.ops).

Arrays are C-ordered; a batch of traces is [n_samples, n_channels] (time rows).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, signal

xp = np
name = "cpu"


def asarray(a, dtype=None):
    return np.asarray(a, dtype=dtype)


def to_host(a):
    return np.asarray(a)


def synchronize():
    pass


def filtfilt_zero_state(x, b, a):
    """Forward then backward IIR filtering along time with zero initial state and no padding (gpufilter.m).

    x: [n, C] float32. b, a: 1-D float64 transfer-function coefficients of equal length <= 7.
    Returns [n, C] float32. Not scipy's filtfilt, which pads the edges: the zero state leaves transients at
    both ends, which is why batches are read with buffers.
    """
    y = signal.lfilter(b, a, np.asarray(x, dtype=np.float64), axis=0)
    y = signal.lfilter(b, a, y[::-1], axis=0)[::-1]
    return np.ascontiguousarray(y, dtype=np.float32)


def running_min(x, half_width: int, axis: int):
    """Minimum over a window of +-half_width along ``axis``, +inf beyond the edges (my_min.m). x: 2-D float32."""
    return ndimage.minimum_filter1d(x, 2 * half_width + 1, axis=axis, mode="constant", cval=np.inf)


def running_sum(x, half_width: int, axis: int):
    """Sum over a window of +-half_width along ``axis``, zero beyond the edges (my_sum.m). x: 2-D float32."""
    c = np.cumsum(np.asarray(x, dtype=np.float64), axis=axis)
    n = x.shape[axis]
    c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
    hi = np.minimum(np.arange(n) + half_width + 1, n)
    lo = np.maximum(np.arange(n) - half_width, 0)
    return (np.take(c, hi, axis=axis) - np.take(c, lo, axis=axis)).astype(np.float32)
