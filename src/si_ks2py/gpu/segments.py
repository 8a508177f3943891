"""The split's per-segment ops on the GPU (a segment: one cluster's rows of a matrix that holds several clusters
one after the other); part of the op table (si_ks2py.gpu.ops), NumPy twins in si_ks2py.cpu.ops."""

from __future__ import annotations

import functools

import cupy as cp
import numpy as np

from .kernels import blocks, i32, launch

_SPLIT_THREADS = 512  # SPLIT_THREADS in split.cu
_SEGMENT_CHUNK = 256  # rows per chunk of the segment sums and Gram matrices
_RUNNING_MEAN_BYTES = 2 ** 27  # FFT buffer of one group of columns in segment_running_mean


@functools.lru_cache(maxsize=8)
def _segment_layout(counts_bytes: bytes):
    """(row bounds [S + 1], chunk bounds [S + 1], destination of each row in the zero-padded chunk layout [N],
    chunk count), the first three on the device: each segment padded to whole chunks of _SEGMENT_CHUNK rows."""
    counts = np.frombuffer(counts_bytes, dtype=np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    chunk_bounds = np.concatenate([[0], np.cumsum((counts + _SEGMENT_CHUNK - 1) // _SEGMENT_CHUNK)])
    destination = np.arange(bounds[-1]) + np.repeat(chunk_bounds[:-1] * _SEGMENT_CHUNK - bounds[:-1], counts)
    return cp.asarray(bounds), cp.asarray(chunk_bounds), cp.asarray(destination), int(chunk_bounds[-1])


def _layout(counts):
    return _segment_layout(np.ascontiguousarray(counts, dtype=np.int64).tobytes())


def _chunked(x, counts):
    """x [N, ...] as [n_chunks, _SEGMENT_CHUNK, ...], each segment zero-padded to whole chunks."""
    _, _, destination, n_chunks = _layout(counts)
    padded = cp.zeros((n_chunks * _SEGMENT_CHUNK,) + x.shape[1:], dtype=x.dtype)
    padded[destination] = x
    return padded.reshape((n_chunks, _SEGMENT_CHUNK) + x.shape[1:])


def _sum_chunks(partial, counts):
    """[S, ...]: each segment's chunk partials [n_chunks, ...] summed in chunk order."""
    _, chunk_bounds, _, n_chunks = _layout(counts)
    S, E = len(counts), int(np.prod(partial.shape[1:]))
    out = cp.empty((S,) + partial.shape[1:], dtype=cp.float64)
    if out.size:
        launch("split", "sum_chunks", blocks(S * E, 256), (256,),
               (cp.ascontiguousarray(partial, dtype=cp.float64), chunk_bounds, out, i32(S), np.int64(E)))
    return out


def segment_sum(x, counts):
    """See si_ks2py.cpu.ops.segment_sum (chunk sums, then each segment's chunks added in order)."""
    x = cp.asarray(x, dtype=cp.float64)
    return _sum_chunks(_chunked(x, counts).sum(axis=1), counts)


def segment_gram(x, counts, weight):
    """See si_ks2py.cpu.ops.segment_gram (one batched cuBLAS product per chunk, then the chunks added in order)."""
    x = cp.asarray(x, dtype=cp.float64)
    weighted = _chunked(x * cp.asarray(weight, dtype=cp.float64)[:, None], counts)
    return _sum_chunks(cp.matmul(weighted.transpose(0, 2, 1), _chunked(x, counts)), counts)


def segment_running_mean(x, counts, sigma: float):
    """See si_ks2py.cpu.ops.segment_running_mean: one cuFFT convolution for all segments, laid out with `radius`
    zero rows between them so that none reaches into another; a group of columns at a time (bounded memory)."""
    x = cp.asarray(x, dtype=cp.float64)
    counts = np.asarray(counts, dtype=np.int64)
    N, d = x.shape
    radius = int(4 * sigma + 0.5)
    position = cp.asarray(np.arange(N) + np.repeat(radius * np.arange(1, len(counts) + 1), counts))
    length = N + radius * (len(counts) + 1)
    from scipy import fft  # here: the sort's import thread would wait for it (0.1 s); the split runs long after

    size = fft.next_fast_len(length + 2 * radius, real=True)
    kernel = cp.exp(-0.5 * (cp.arange(-radius, radius + 1, dtype=cp.float64) / sigma) ** 2)
    spectrum = cp.fft.rfft(kernel, size)

    def smoothed(columns):  # [length, c] -> its 'same' convolution at the rows' positions
        return cp.fft.irfft(cp.fft.rfft(columns, size, axis=0) * spectrum[:, None], size, axis=0)[position + radius]

    mask = cp.zeros((length, 1))
    mask[position] = 1
    weight = smoothed(mask)
    out = cp.empty_like(x)
    group = max(1, _RUNNING_MEAN_BYTES // (8 * size))
    for a in range(0, d, group):
        columns = cp.zeros((length, min(d, a + group) - a))
        columns[position] = x[:, a:a + group]
        out[:, a:a + group] = smoothed(columns) / weight
    return out


def segment_em_step(x, counts, params, rs, active):
    """See si_ks2py.cpu.ops.segment_em_step (one block per segment, sums in a fixed order)."""
    bounds = _layout(counts)[0]
    S = len(counts)
    out = cp.empty((S, 5), dtype=cp.float64)
    if S:
        launch("split", "segment_em_step", (S,), (_SPLIT_THREADS,),
               (x, bounds, cp.ascontiguousarray(params, dtype=cp.float64), cp.asarray(active, dtype=cp.uint8),
                rs, out))
    return out
