"""CuPy ops (same names, signatures and outputs as the NumPy twins in si_ks2py.cpu.ops).

Kernels live in the .cu files of this package (preprocess.cu, detect.cu, drift.cu, pursuit.cu, templates.cu, split.cu) and
are compiled once per process with cupy.RawModule (kernels.py; CuPy also caches the binaries on disk). Matrix
products go through cuBLAS (``@``). The split's per-segment ops are in segments.py and part of this table.

Memory depends on the batch size n, the channel count C and the template count K only: the largest buffers are
the projections B [n, K] float32 of match_pursuit, its dense templates [K, nt0, C] float32 and correlate_valid's
[n, C, F] output. Every op is deterministic: no float atomics, sums in a fixed order.
"""

from __future__ import annotations

import collections
import functools
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources

import cupy as cp
import cupyx
import numpy as np

from ..templates import RANK_TOLERANCE
from .kernels import blocks, f32, i32, i64, launch, max_shared_bytes, module
from .segments import segment_em_step, segment_gram, segment_running_mean, segment_sum  # noqa: F401 (op table)

xp = cp
name = "cuda"
logger = logging.getLogger("si_ks2py")


_CV_TT = 64  # window starts per block of correlate_valid (CV_TT in detect.cu)
_PS_MAXSUM, _PS_TILE = 8, 4  # PS_MAXSUM, PS_TILE in detect.cu
_PS_SHARED_BYTES = 64 * 1024  # staged rows of one prototype_scores block (a tile of window starts)

_PINNED_RANGE = (2 ** 20, 2 ** 28)  # bytes: transfers that gain from page-locked host memory, none that stay long


def asarray(a, dtype=None):
    return cp.asarray(a, dtype=dtype)


def staged(a):
    """A host array ready for a fast transfer to the device: a copy in page-locked memory (the copy is what a
    read-ahead thread should do, so that the transfer itself is quick)."""
    a = np.asarray(a)
    if not _PINNED_RANGE[0] <= a.nbytes <= _PINNED_RANGE[1]:
        return a
    out = cupyx.empty_pinned(a.shape, a.dtype)
    np.copyto(out, a)
    return out


def empty_staged(shape, dtype):
    """An uninitialised host array to read into, page-locked when its size gains from it (see staged)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if not _PINNED_RANGE[0] <= nbytes <= _PINNED_RANGE[1]:
        return np.empty(shape, dtype)
    return cupyx.empty_pinned(shape, dtype)


def to_host(a):
    """The array on the host; mid-sized ones through page-locked memory (several times faster)."""
    if not isinstance(a, cp.ndarray) or not _PINNED_RANGE[0] <= a.nbytes <= _PINNED_RANGE[1]:
        return cp.asnumpy(a)
    out = cupyx.empty_pinned(a.shape, a.dtype)
    a.get(out=out)
    return out


def copy_to_host(a, out: np.ndarray):
    """Copy the device array ``a`` into the host array ``out`` (same shape and dtype, C-contiguous) on the current
    stream and wait for it: a DMA where ``out`` is page-locked (``pin_host``)."""
    a.get(stream=cp.cuda.get_current_stream(), out=out)


def pin_host(array: np.ndarray):
    """Page-lock the memory of the C-contiguous host ``array`` (cudaHostRegister), so that copies between it and
    the device run by DMA; returns the function that unpins it (it holds the array until then), or None where the
    driver refused (the copies are then staged, only slower)."""
    pointer = array.ctypes.data
    try:
        cp.cuda.runtime.hostRegister(pointer, array.nbytes, 0)
    except cp.cuda.runtime.CUDARuntimeError as err:
        logger.info("the in-memory whitened data could not be page-locked (%s): its copies are staged", err)
        return None

    def unpin(array=array):
        cp.cuda.runtime.hostUnregister(pointer)

    return unpin


def prefetch_to_device(read, items, depth: int = 2):
    """Yield ``(item, read(item) on the device)`` in order. A background thread reads up to ``depth`` items ahead
    and copies each (a host array, page-locked for speed) into one of depth + 1 device buffers on a stream of its
    own, so that the copies overlap the caller's kernels. A yielded array is valid until the next one is asked
    for: a buffer is refilled only after the work that the caller had queued when it asked for the next item."""
    items = list(items)
    caller = cp.cuda.get_current_stream()
    copies = cp.cuda.Stream(non_blocking=True)
    buffers = [None] * (depth + 1)

    def upload(index, caller_done):
        host = read(items[index])
        slot = index % len(buffers)
        with copies:
            if caller_done is not None:
                copies.wait_event(caller_done)
            if buffers[slot] is None or buffers[slot].shape != host.shape or buffers[slot].dtype != host.dtype:
                buffers[slot] = cp.empty(host.shape, host.dtype)
            buffers[slot].set(host, stream=copies)
        copies.synchronize()  # the host buffer may be reused once its copy is done
        return buffers[slot]

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = collections.deque(pool.submit(upload, i, None) for i in range(min(depth, len(items))))
            for index, item in enumerate(items):
                yield item, pending.popleft().result()
                if index + depth < len(items):  # its buffer last held item index - 1, which the caller is done with
                    pending.append(pool.submit(upload, index + depth, caller.record()))
    finally:
        caller.synchronize()  # the buffers go back to the memory pool: nothing queued may still read them


@functools.lru_cache(maxsize=None)
def start_device() -> threading.Thread:
    """Create the CUDA context, load cuBLAS and load (or compile) the package's kernel modules in a background
    thread, once per process: started with the sort's imports, this runs while the recording is checked instead of
    delaying the first chunk of preprocessing (by about 0.2 s on an H200)."""
    def start():
        try:
            cp.cuda.runtime.free(0)  # the first runtime call creates the context
            cp.cuda.device.get_cublas_handle()
            for source in resources.files("si_ks2py.gpu").iterdir():
                if source.name.endswith(".cu"):
                    module(source.name.removesuffix(".cu")).compile()
        except Exception:  # noqa: BLE001 - the same error, with its message, comes where the sort first uses it
            pass

    thread = threading.Thread(target=start, name="ks2py-device-start", daemon=True)
    thread.start()
    return thread


def synchronize():
    cp.cuda.get_current_stream().synchronize()


def worker_stream():
    """A non-blocking CUDA stream (a context): threads that each queue their batches on a stream of their own run
    side by side, one thread's host work filling another's waits for the GPU."""
    return cp.cuda.Stream(non_blocking=True)


def release_memory():
    """Give the memory CuPy's pool keeps for reuse back to the GPU (between stages: each stage's buffers have
    other sizes, so what one stage kept would only add to the next one's peak)."""
    cp.get_default_memory_pool().free_all_blocks()


_IIR_SEGMENT = 256  # samples per segment of the block-parallel IIR filter


@functools.lru_cache(maxsize=16)
def _zero_input_response(b: tuple, a: tuple, L: int):
    """(h [order, L], Phi [order, order]) on the device, float64: the output and the final state of the direct
    form II transposed recursion run for L steps with zero input from each unit state (see preprocess.cu)."""
    order = len(a) - 1
    feedback = np.asarray(a[1:], dtype=np.float64)
    h, phi = np.zeros((order, L)), np.zeros((order, order))
    for k in range(order):
        z = np.eye(order)[k]
        for t in range(L):
            h[k, t] = z[0]
            z = np.append(z[1:], 0.0) - feedback * z[0]
        phi[:, k] = z
    h, phi = cp.asarray(h), cp.asarray(phi)
    synchronize()  # cached and then read from other threads' streams
    return h, phi


def filtfilt_zero_state(x, b, a):
    """See si_ks2py.cpu.ops.filtfilt_zero_state (here block-parallel over time, see preprocess.cu)."""
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    b = np.asarray(b, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    b, a = b / a[0], a / a[0]
    order = len(a) - 1
    if len(b) != len(a) or not 1 <= order <= 6:
        raise ValueError("filtfilt_zero_state needs b and a of equal length between 2 and 7")
    n, C = x.shape
    y = cp.empty_like(x)
    if y.size == 0:
        return y
    L = _IIR_SEGMENT
    n_seg = (n + L - 1) // L
    h, phi = _zero_input_response(tuple(b), tuple(a), L)
    b_d, a_d = cp.asarray(b), cp.asarray(a)
    z_end = cp.empty((n_seg, C, order), dtype=cp.float64)
    z_start = cp.empty_like(z_end)
    source = x
    for backward in (0, 1):
        args = (i32(order), i32(n), i32(C), i32(L), i32(backward))
        launch("preprocess", "iir_segments", blocks(n_seg * C, 256), (256,), (source, y, b_d, a_d, z_end) + args)
        launch("preprocess", "iir_carry", blocks(C, 64), (64,),
               (z_end, phi, z_start, i32(order), i32(n_seg), i32(C)))
        launch("preprocess", "iir_correct", blocks(n * C, 256), (256,), (y, z_start, h) + args)
        source = y
    return y


def _running_window(x, half_width: int, axis: int, use_min: bool):
    x = cp.ascontiguousarray(x, dtype=cp.float32)
    n = x.shape[axis]
    outer = int(np.prod(x.shape[:axis]))
    inner = int(np.prod(x.shape[axis + 1:]))
    y = cp.empty_like(x)
    launch("preprocess", "running_window", blocks(x.size, 256), (256,),
           (x, y, i32(outer), i32(n), i32(inner), i32(half_width), i32(use_min)))
    return y


def running_min(x, half_width: int, axis: int):
    """See si_ks2py.cpu.ops.running_min."""
    return _running_window(x, half_width, axis, True)


def running_sum(x, half_width: int, axis: int):
    """See si_ks2py.cpu.ops.running_sum."""
    return _running_window(x, half_width, axis, False)


_COLUMN_SLAB = 256  # samples a thread of column_partial_sums adds up


def column_sums(x):
    """See si_ks2py.cpu.ops.column_sums (here two kernels, partial sums over slabs of samples then their total in
    slab order, instead of a cuBLAS product, whose first call in a process takes 0.1 to 0.5 s to load)."""
    x = f32(x)
    n, C = x.shape
    total = cp.zeros((1, C), dtype=cp.float32)
    if n and C:
        n_slabs = (n + _COLUMN_SLAB - 1) // _COLUMN_SLAB
        partial = cp.empty((n_slabs, C), dtype=cp.float32)
        launch("preprocess", "column_partial_sums", (*blocks(C, 128), n_slabs), (128,),
               (x, partial, i32(n), i32(C), i32(_COLUMN_SLAB)))
        launch("preprocess", "column_total", blocks(C, 128), (128,), (partial, total, i32(n_slabs), i32(C)))
    return total


_MEDIAN_MAX_SORT = 8192  # values a block sorts in shared memory (32 kB); longer rows go to cupy.median


def row_median(x):
    """See si_ks2py.cpu.ops.row_median (one block per row sorts it in shared memory: CuPy's median sorts the whole
    batch with a global merge sort, several times slower)."""
    x = f32(x)
    n, C = x.shape
    P = 1 << max(0, (C - 1).bit_length())
    if P > _MEDIAN_MAX_SORT:
        return cp.median(x, axis=1, keepdims=True)
    med = cp.empty((n, 1), dtype=cp.float32)
    if n and C:
        launch("preprocess", "row_median", (n,), (128,), (x, med, i32(C), i32(P)), 4 * P)
    return med


def correlate_valid(x, filters):
    """See si_ks2py.cpu.ops.correlate_valid (here a direct sum over the nt0 taps, not an FFT)."""
    x, filters = f32(x), f32(filters)
    n, C = x.shape
    nt0, F = filters.shape
    out = cp.empty((n, C, F), dtype=cp.float32)
    if out.size == 0:
        return out
    shared = 4 * (nt0 * F + (_CV_TT + nt0 - 1) * 32)
    kernel = "correlate_valid4" if F <= 4 else "correlate_valid8"  # filters per pass
    launch("detect", kernel, ((n + _CV_TT - 1) // _CV_TT, (C + 31) // 32), (32, 8),
           (x, filters, out, i32(n), i32(C), i32(nt0), i32(F)), shared)
    return out


def _peaks(err, threshold, lockout):
    """See si_ks2py.cpu.ops._peaks: sorted int64 indices (one host synchronisation, for their count)."""
    n = err.shape[0]
    flags = cp.empty(n, dtype=cp.uint8)
    if n:
        launch("pursuit", "peak_flags", blocks(n, 256), (256,),
               (err, flags, i32(n), i32(lockout), np.float32(threshold * threshold)))
    return cp.flatnonzero(flags)


def local_peaks(norm, iC, threshold: float, nt0: int, nt0min: int):
    """See si_ks2py.cpu.ops.local_peaks."""
    norm, iC = f32(norm), i64(iC)
    n, C = norm.shape
    total = n * C
    wmax = cp.empty((n, C), dtype=cp.float32)
    flags = cp.zeros((n, C), dtype=cp.uint8)
    if total:
        grid = blocks(total, 256)
        launch("detect", "window_max_above", grid, (256,),
               (norm, wmax, i32(n), i32(C), i32(nt0), np.float32(threshold)))
        launch("detect", "pc_peak_flags", grid, (256,),
               (norm, wmax, iC, flags, i32(n), i32(C), i32(nt0), i32(nt0min), i32(iC.shape[1]),
                np.float32(threshold)))
    index = cp.flatnonzero(flags)  # row-major: sorted by (time, channel)
    return index // C, index % C


def pc_threshold_spikes(data, wPCA, iC, threshold: float, nt0min: int):
    """See si_ks2py.cpu.ops.pc_threshold_spikes."""
    data, wPCA, iC = f32(data), f32(wPCA), i64(iC)
    n, C = data.shape
    P = wPCA.shape[1]
    projections = correlate_valid(data, wPCA)  # [n, C, P]
    norm = cp.empty((n, C), dtype=cp.float32)
    if n * C:
        launch("detect", "projection_norm", blocks(n * C, 256), (256,), (projections, norm, np.int64(n * C), i32(P)))
    t, c = local_peaks(norm, iC, threshold, wPCA.shape[0], nt0min)
    features = projections[t[:, None], iC[c], :]
    return t, c, cp.ascontiguousarray(features)


_GA_SHAPES = ((6, 5),)  # (prototypes, footprints) with a grid_amplitudes kernel in drift.cu
_GA_MAX_J = 16  # GA_MAX_J in drift.cu
_GA_MAX_TILE = 8  # window starts a block of grid_amplitudes stages


def grid_amplitudes(filtered, iC, weights, threshold: float):
    """See si_ks2py.cpu.ops.grid_amplitudes."""
    filtered, iC, weights = f32(filtered), i64(iC), f32(weights)
    n, C, R = filtered.shape
    G, J, S = weights.shape
    if (R, S) not in _GA_SHAPES or J > _GA_MAX_J:
        raise ValueError(f"grid_amplitudes has kernels for (prototypes, footprints) in {_GA_SHAPES} and at most "
                         f"{_GA_MAX_J} channels a footprint, got ({R}, {S}) and {J}")
    row_bytes = 4 * C * R
    tile = min(_GA_MAX_TILE, max_shared_bytes() // row_bytes)
    if tile < 1:
        raise ValueError(f"grid_amplitudes: {C} channels x {R} prototypes exceed the GPU's shared memory")
    out = cp.empty((n, G), dtype=cp.float32)
    if out.size:
        launch("drift", f"grid_amplitudes_{R}x{S}", ((n + tile - 1) // tile,), (256,),
               (filtered, iC, weights, out, i32(n), i32(C), i32(G), i32(J), i32(tile), np.float32(threshold)),
               tile * row_bytes)
    return out


def prototype_spikes(data, wTEMP, iC, n_sum: int, threshold: float, channel_spacing: int = 5):
    """See si_ks2py.cpu.ops.prototype_spikes."""
    data, wTEMP, iC = f32(data), f32(wTEMP), i64(iC)
    n, C = data.shape
    nt0, R = wTEMP.shape
    if n_sum > _PS_MAXSUM:
        raise ValueError(f"prototype_spikes sums over at most {_PS_MAXSUM} nearest channels, got n_sum = {n_sum}")
    if n_sum > iC.shape[1]:
        raise ValueError(f"n_sum = {n_sum} exceeds the {iC.shape[1]} nearest channels of iC")
    err = cp.zeros(n, dtype=cp.float32)
    channel = cp.zeros(n, dtype=cp.int64)
    if n and C:
        filtered = correlate_valid(data, wTEMP)  # [n, C, R]
        table = cp.empty((n_sum * (n_sum + 1) // 2, C), dtype=cp.int32)
        launch("detect", "sorted_nearest", blocks(C, 128), (128,),
               (iC, table, i32(C), i32(iC.shape[1]), i32(n_sum)))
        row_bytes = 4 * R * (C + 1)
        tile = max(1, min(_PS_TILE, _PS_SHARED_BYTES // row_bytes))
        if tile * row_bytes > max_shared_bytes():
            raise ValueError(f"prototype_spikes: {C} channels x {R} prototypes exceed the GPU's shared memory")
        threads = min(512, (C + 31) // 32 * 32)
        launch("detect", "prototype_scores", ((n + tile - 1) // tile,), (threads,),
               (filtered, table, err, channel, i32(n), i32(C), i32(R), i32(n_sum), i32(nt0), i32(tile)),
               tile * row_bytes)
        del filtered
    t = _peaks(err, threshold, nt0 - 1)
    c, x = channel[t], err[t]
    keep = cp.ones(len(t), dtype=cp.uint8)
    if len(t):
        launch("detect", "cleanup_heights", blocks(len(t), 128), (128,),
               (c, x, keep, i32(len(t)), i32(channel_spacing)))
    keep = keep.astype(bool)
    return t[keep], c[keep]


def _dense_templates(W, U):
    """[K, nt0, C] float32 templates W_k U_k' (r summed in order, as the NumPy einsum)."""
    K, nt0, R = W.shape
    C = U.shape[1]
    T = cp.empty((K, nt0, C), dtype=cp.float32)
    if T.size:
        launch("pursuit", "dense_templates", blocks(T.size, 256), (256,),
               (W, U, T, i32(K), i32(nt0), i32(C), i32(R)))
    return T


_PJ_TEMPLATES, _PJ_SLAB, _PJ_MAX_RANK = 32, 32, 4  # PJ_* in pursuit.cu


def _projection_shared_bytes(starts: int, nt0: int, R: int) -> int:
    """Dynamic shared memory of template_projections{starts} (see pursuit.cu)."""
    rows = 8 * starts + (nt0 + starts - 1) // starts * starts - 1
    return 4 * (rows * _PJ_TEMPLATES * R + 4 * (starts + 8) * _PJ_SLAB + _PJ_TEMPLATES * (_PJ_SLAB * R + 4))


def _template_projections(data, W, U):
    """B [n, K] float32: <T_k, data[t:t+nt0]> for t <= n - nt0, 0 beyond. One kernel sums the spatial projections
    of each chunk of 32 templates over the channels where their U is non-zero (a short window when the templates
    are sorted by peak channel, as the stages hold them), keeps them in shared memory and sums them in time there,
    16 window starts a thread (8 where the GPU's shared memory is too small for that).
    data: [n, C] float32; W: [K, nt0, R] and U: [K, C, R] float32, contiguous."""
    n, C = data.shape
    K, nt0, R = W.shape
    if R > _PJ_MAX_RANK:
        raise ValueError(f"template projections take templates of rank <= {_PJ_MAX_RANK}, got {R}")
    starts = next((s for s in (16, 8) if _projection_shared_bytes(s, nt0, R) <= max_shared_bytes()), None)
    if starts is None:
        raise ValueError(f"template projections of {nt0} samples and rank {R} exceed the GPU's shared memory")
    B = cp.empty((n, K), dtype=cp.float32)
    chunks = (K + _PJ_TEMPLATES - 1) // _PJ_TEMPLATES
    window = cp.empty(2 * chunks, dtype=cp.int32)
    launch("pursuit", "projection_windows", (chunks,), (256,), (U, window, i32(K), i32(C), i32(R)))
    Wt = cp.ascontiguousarray(W.transpose(1, 2, 0))  # [nt0, R, K]
    tile = 8 * starts
    launch("pursuit", f"template_projections{starts}", ((n + tile - 1) // tile, chunks), (32, 8),
           (data, U, Wt, window, B, i32(n), i32(C), i32(K), i32(nt0), i32(R)),
           _projection_shared_bytes(starts, nt0, R))
    return B


_ALIGN_MAX_T, _ALIGN_MAX_R, _ALIGN_MAX_NUP = 128, 8, 32  # ALIGN_MAX_* in templates.cu


def svd_templates(dWU, W_prev, iC, iW, Ka, Kb, nt0min: int):
    """See si_ks2py.templates.svd_templates (here the neighbourhood Gram matrices and everything after the batched
    eigendecomposition are one kernel each: a handful of launches instead of about fifty array operations)."""
    dWU = cp.ascontiguousarray(dWU, dtype=cp.float64)
    K, nt0, C = dWU.shape
    R = W_prev.shape[2]
    nup = Ka.shape[0]
    if K == 0:
        return cp.zeros((0, nt0, R)), cp.zeros((0, C, R)), cp.zeros(0)
    if nt0 > _ALIGN_MAX_T or R > _ALIGN_MAX_R or nup > _ALIGN_MAX_NUP:
        raise ValueError(f"svd_templates takes nt0 <= {_ALIGN_MAX_T}, rank <= {_ALIGN_MAX_R} and <= {_ALIGN_MAX_NUP} "
                         f"sub-sample shifts, got {nt0}, {R} and {nup}")
    iC, iW = i64(iC), i64(iW)
    n_near = iC.shape[1]
    gram = cp.empty((K, n_near, n_near), dtype=cp.float64)
    launch("templates", "neighbourhood_gram", (K,), (256,), (dWU, iC, iW, gram, i32(nt0), i32(C), i32(n_near)),
           8 * nt0 * n_near)
    vectors = cp.ascontiguousarray(cp.linalg.eigh(gram)[1])  # [K, n_near, n_near], eigenvectors as columns
    W, U, mu = cp.empty((K, nt0, R)), cp.empty((K, C, R)), cp.empty(K)
    launch("templates", "align_templates", (K,), (128,),
           (vectors, dWU, iC, iW, cp.ascontiguousarray(Ka, dtype=cp.float64),
            cp.ascontiguousarray(Kb, dtype=cp.float64), W, U, mu, i32(nt0), i32(C), i32(n_near), i32(R),
            i32(nup), i32(nt0min), np.float64(RANK_TOLERANCE)))
    return W, U, mu


_XC_THREADS, _XC_MAX_RANK = 128, 8  # XC_THREADS, XC_MAX_RANK in pursuit.cu


def neighbor_xcorr(W, U, neighbors):
    """See si_ks2py.cpu.ops.neighbor_xcorr (here one kernel: a direct sum over the lags, not an FFT)."""
    W, U, neighbors = f32(W), f32(U), i64(neighbors)
    K, nt0, R = W.shape
    M = neighbors.shape[1] if neighbors.ndim == 2 else 0
    if R > _XC_MAX_RANK:
        raise ValueError(f"neighbor_xcorr takes templates of rank <= {_XC_MAX_RANK}, got {R}")
    X = cp.empty((K, M, 2 * nt0 - 1), dtype=cp.float32)
    if X.size:
        launch("pursuit", "neighbor_xcorr", (K * M,), (_XC_THREADS,),
               (W, U, neighbors, X, i32(K), i32(M), i32(nt0), i32(U.shape[1]), i32(R)), 8 * nt0 * R)
    return X


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return cp.cuda.Device(device).attributes["MultiProcessorCount"]


def match_pursuit(data, W, U, mu, neighbors, xcorr, threshold: float, lam: float, n_iter: int,
                  feature_templates=None):
    """See si_ks2py.cpu.ops.match_pursuit.

    The whole loop of iterations is one launch (pursuit_loop in pursuit.cu: one block per SM, phases separated by
    a barrier of the grid), so the host neither launches per iteration nor waits for a spike count. Each
    iteration's spikes go to a list of fixed capacity (peaks are more than nt0 - 1 apart) with its count on the
    device; one host synchronisation per call, at the end, reads the counts.
    """
    data = f32(data)
    n, C = data.shape
    W = f32(W)
    K, nt0, R = W.shape
    ftemp = None if feature_templates is None else i64(feature_templates)
    n_near = 0 if ftemp is None else ftemp.shape[1]
    last = n - nt0
    if K == 0 or last < 0 or n_iter <= 0:
        st = cp.zeros(0, dtype=cp.int64)
        return (st, st.copy(), cp.zeros(0, cp.float32), cp.zeros(0, cp.float32), data.copy(),
                None if ftemp is None else cp.zeros((0, n_near if K else 0), dtype=cp.float32))
    U, mu, neighbors, xcorr = f32(U), f32(mu), i64(neighbors), f32(xcorr)
    M = neighbors.shape[1]
    templates = _dense_templates(W, U)
    B = _template_projections(data, W, U)
    lam_mu = mu * np.float32(lam)  # float32, as np.float32(lam) * mu
    lmm = lam_mu * mu
    denom = np.float32(1 + lam)
    err = cp.zeros(n, dtype=cp.float32)
    ftype = cp.zeros(n, dtype=cp.int32)
    launch("pursuit", "cost_all", blocks((last + 1) * 32, 256), (256,),
           (B, lam_mu, lmm, err, ftype, i32(last), i32(K), denom))
    residual = data.copy()
    capacity = last // nt0 + 1
    st_all = cp.empty((n_iter, capacity), dtype=cp.int64)
    ids_all = cp.empty((n_iter, capacity), dtype=cp.int64)
    y_all = cp.empty((n_iter, capacity), dtype=cp.float32)
    x_all = cp.empty((n_iter, capacity), dtype=cp.float32)
    feat_all = cp.empty((n_iter, capacity, n_near), dtype=cp.float32)
    counts = cp.zeros(n_iter, dtype=cp.int32)
    grid = _sm_count(cp.cuda.Device().id)  # one block per SM: every block resident (the loop's barrier needs it)
    scratch = (cp.empty(n, dtype=cp.uint8), cp.empty(grid, dtype=cp.int32), cp.zeros(2, dtype=cp.uint32))
    launch("pursuit", "pursuit_loop", (grid,), (1024,),
           (B, err, ftype, residual, templates, lam_mu, lmm, mu, neighbors, xcorr,
            ftemp if ftemp is not None else neighbors) + scratch
           + (st_all, ids_all, y_all, x_all, feat_all, counts, i32(n), i32(C), i32(K), i32(nt0), i32(M),
              i32(n_near), i32(n_iter), i32(capacity), np.float32(threshold * threshold), np.float32(lam), denom))
    found = to_host(counts).astype(np.int64)
    total = int(found.sum())
    # the spikes of every iteration, one flat index into the [n_iter, capacity] lists
    index = cp.asarray(np.concatenate([i * capacity + np.arange(c) for i, c in enumerate(found)]))
    st, ids, y, x = (a.ravel()[index] for a in (st_all, ids_all, y_all, x_all))
    order = cp.argsort(st * max(total, 1) + cp.arange(total, dtype=cp.int64))  # by time, then iteration: stable
    feats = None if ftemp is None else feat_all.reshape(n_iter * capacity, n_near)[index][order]
    return st[order], ids[order], y[order], x[order], residual, feats


def accumulate_templates(residual, st, ids, y, W, U, n_templates: int, selected=None):
    """See si_ks2py.cpu.ops.accumulate_templates: each template's spikes summed in (template, time) order, in
    float64, one thread per output element (no atomics). Unselected spikes are sorted past the last template
    (no wait for their count)."""
    residual, st, ids, y, W, U = f32(residual), i64(st), i64(ids), f32(y), f32(W), f32(U)
    if selected is not None:
        ids = cp.where(cp.asarray(selected, dtype=bool), ids, n_templates)
    n, C = residual.shape
    K, nt0, R = W.shape
    dwu = cp.zeros((n_templates, nt0, C), dtype=cp.float64)
    S = int(st.size)
    if S == 0:
        return dwu, cp.zeros(n_templates, dtype=cp.int64)
    if n_templates != K:
        raise ValueError(f"accumulate_templates: n_templates = {n_templates} but W holds {K} templates")
    order = cp.argsort((ids * n + st) * S + cp.arange(S, dtype=cp.int64))  # (template, time, input order)
    st_sorted, y_sorted = st[order], y[order]
    starts = cp.searchsorted(ids[order], cp.arange(n_templates + 1, dtype=cp.int64), side="left")
    counts = cp.diff(starts)  # (bincount would wait for the largest id)
    if dwu.size:
        launch("pursuit", "accumulate_templates", blocks(dwu.size, 256), (256,),
               (residual, st_sorted, y_sorted, starts, W, U, dwu, i32(n_templates), i32(nt0), i32(C), i32(R)))
    return dwu, counts


def pc_features(residual, st, ids, y, W, U, channels, wPCA):
    """See si_ks2py.cpu.ops.pc_features."""
    residual, st, ids, y, W, U = f32(residual), i64(st), i64(ids), f32(y), f32(W), f32(U)
    channels, wPCA = i64(channels), f32(wPCA)
    nt0 = W.shape[1]
    P, J = wPCA.shape[1], channels.shape[1]
    C = residual.shape[1]
    if P > 16:
        raise ValueError(f"pc_features handles at most 16 PCs, got {P}")
    S = int(st.size)
    out = cp.empty((S, P, J), dtype=cp.float32)
    if out.size == 0:
        return out
    own = f32(cp.einsum("ktr,kjr,tp->kpj", W, cp.take_along_axis(U, channels[:, :, None], axis=1), wPCA))
    launch("pursuit", "pc_features", blocks(S * J, 128), (128,),
           (residual, st, ids, y, channels, wPCA, own, out, i32(S), i32(nt0), i32(C), i32(P), i32(J)))
    return out
