"""Preprocessing (preprocessDataSub.m): good channels, filtering, whitening, the whitened int16 file.

Per chunk of the recording: channel selection, per-channel mean removal, common median reference, 3rd-order
Butterworth high-pass (or band-pass with ``fslow``) applied forward then backward with zero initial state, the
local whitening matrix ``Wrot`` (already times ``scaleproc``), rounding with saturation to int16. The recording is
streamed; only the in-memory copy of the whitened data below grows with its length.

Outputs: ``igood`` (bool per probe channel), ``chanMap``, ``xc``, ``yc``, ``kcoords`` of the kept channels,
``Wrot`` [Nchan, Nchan] float64, and the file ``temp_wh.dat`` (int16 [n_samples, Nchan], see io.py). When it fits
in half of the free host memory, the whitened data is also kept in memory (``ctx.whitened``) for the later stages
of the same run, which then read no file, and the file is written from it by a background thread while they run.
On the GPU that copy is page-locked (pinned) once its pages are faulted in, so that the main pass's chunks and the
later stages' batches move between it and the device by DMA, without a staging copy on the host.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import threadpool_limits

from ..io import (RecordingReader, chunk_digest, chunk_windows, combined_digest, is_pinned, large_host_array,
                  on_own_streams, pin_when_populated, prefetch, whitened_fits_in_memory, write_rows)
from ..progress import progress_bar

logger = logging.getLogger("si_ks2py")

STORE_WORKERS = 4  # threads copying chunks into the in-memory copy until it is page-locked
GPU_WORKERS = 3  # chunks filtered side by side, each on a stream of its own (~0.4 GB of GPU memory at 384 ch)

OUTPUTS = ("igood", "chanMap", "xc", "yc", "kcoords", "Wrot")
FILES = ("temp_wh.dat",)
FILE_INPUTS = ()


def butterworth(order: int, band: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Digital Butterworth filter (b, a) float64, as scipy.signal.butter: high-pass at band = (low,), band-pass at
    (low, high), frequencies relative to Nyquist. The analog prototype's poles go through the high-pass or
    band-pass transform at the pre-warped frequencies, then the bilinear transform. Written out because importing
    scipy.signal takes close to a second, a noticeable part of a GPU sort.
    """
    poles = -np.exp(1j * np.pi * np.arange(-order + 1, order, 2) / (2 * order))  # unit cut-off low-pass
    warped = 4 * np.tan(np.pi * np.asarray(band, dtype=np.float64) / 2)
    if len(band) == 1:  # low-pass -> high-pass: p -> w / p, zeros at 0
        gain = np.real(1 / np.prod(-poles))
        poles = warped[0] / poles
    else:  # low-pass -> band-pass around w0 = sqrt(w1 w2) with width w2 - w1, zeros at 0
        w0, width = np.sqrt(warped[0] * warped[1]), warped[1] - warped[0]
        scaled = poles * width / 2
        root = np.sqrt(scaled ** 2 - w0 ** 2)
        poles = np.concatenate([scaled + root, scaled - root])
        gain = width ** order
    # bilinear transform at fs = 2 (4 = 2 fs): the order zeros at s = 0 map to z = 1, the band-pass's other
    # order (at infinity) to z = -1
    gain = gain * np.real(4.0 ** order / np.prod(4 - poles))
    zeros_z = np.concatenate([np.ones(order), -np.ones(len(poles) - order)])
    poles_z = (4 + poles) / (4 - poles)
    return np.real(gain * np.poly(zeros_z)), np.real(np.poly(poles_z))


def filter_coefficients(params) -> tuple[np.ndarray, np.ndarray]:
    """3rd-order Butterworth high-pass at fshigh, or band-pass [fshigh, fslow] (b, a float64)."""
    nyquist = params.fs / 2
    if params.fslow is not None and params.fslow < nyquist:
        return butterworth(3, (params.fshigh / nyquist, params.fslow / nyquist))
    return butterworth(3, (params.fshigh / nyquist,))


def passband_width(params) -> float:
    """Hz where the filter of ``params`` (forward-backward, as the passes filter) passes at least half of its
    peak power, from its impulse response over 2 s (0.25 Hz resolution)."""
    from ..cpu import ops as host_ops

    n = int(2 * params.fs)
    impulse = np.zeros((n, 1), np.float32)
    impulse[n // 2] = 1
    response = host_ops.filtfilt_zero_state(impulse, *filter_coefficients(params))[:, 0].astype(np.float64)
    gain = np.abs(np.fft.rfft(response, 2 * n))  # filtfilt: the power gain of one pass
    return float(np.count_nonzero(gain >= 0.5 * gain.max()) * params.fs / (2 * n))


#: narrower than this, a filter band leaves spikes (about 1 ms wide: most of their power between 300 and 5000 Hz)
#: unrecognisable; blamed only when no channel has crossings
SPIKE_BAND_HZ = 500.0


def filter_traces(ops, traces, params, coefficients):
    """gpufilter.m: traces [n, Nchan] (any dtype, selected channels, host or device) -> filtered float32
    [n, Nchan] on the device.

    The common median reference needs at least 3 channels: it is skipped for fewer (Kilosort would subtract the
    signal from itself).
    """
    xp = ops.xp
    x = ops.asarray(traces).astype(xp.float32)
    x -= ops.column_sums(x) / xp.float32(max(len(x), 1))
    if params.CAR and x.shape[1] >= 3:  # the median of one or two channels is (half) the signal itself
        x -= ops.row_median(x)
    return ops.filtfilt_zero_state(x, *coefficients)


def chunk_crossings(ops, reader: RecordingReader, params, coefficients, window) -> tuple:
    """One chunk of get_good_channels, on the host: (non-constant channels [Nchan0] bool, threshold crossings per
    channel [Nchan0] int64 or None when not counted, samples counted)."""
    return crossings(ops, reader.to_device(ops, reader.read_staged(ops, *window)), params, coefficients)


def crossings(ops, raw, params, coefficients) -> tuple:
    """The counts of chunk_crossings from its raw traces [n, Nchan0] (any dtype, on the device)."""
    xp = ops.xp
    alive = ops.column_sums(raw != raw[:1])[0] > 0
    if raw.shape[0] <= 2 * params.nt0 or params.minfr_goodchannels == 0:
        return ops.to_host(alive), None, 0
    x = filter_traces(ops, raw, params, coefficients)
    n = xp.float32(len(x))
    std = xp.sqrt(xp.maximum(ops.column_sums(x * x) / n - (ops.column_sums(x) / n) ** 2, 0))
    x /= xp.where(std > 0, std, xp.inf)  # a constant channel becomes zeros: no crossings
    is_min = (x < ops.running_min(x, 30, axis=0) + 1e-3) & (x < params.spkTh)
    counts = ops.column_sums(is_min[params.nt0 - 1:x.shape[0] - params.nt0])[0].astype(xp.int64)
    return ops.to_host(alive), ops.to_host(counts), x.shape[0]


def get_good_channels(ops, reader: RecordingReader, params) -> np.ndarray:
    """get_good_channels.m: bool [Nchan0], channels with at least minfr_goodchannels threshold crossings per second.

    About 100 batches spread over the recording are filtered and z-scored per channel; a crossing is a local
    minimum over +-30 samples below spkTh, away from the batch edges (filter transients). Channels that are
    constant in the raw data are dropped even when minfr_goodchannels is 0: after the common median reference
    they would only carry the other channels' median, and they break whitening.
    """
    n_chan = len(reader.channel_ids)
    L = params.NT - params.ntbuff
    step = int(math.ceil(params.Nbatch / 100))
    chunk = functools.partial(chunk_crossings, ops, reader, params, filter_coefficients(params))
    counts = np.zeros(n_chan, dtype=np.int64)
    alive = np.zeros(n_chan, dtype=bool)
    samples = 0
    ranges = [(L * k, L * k + params.NT) for k in range(0, params.Nbatch, step)]
    for _, (alive_k, counts_k, samples_k) in prefetch(on_own_streams(ops, chunk), ranges, GPU_WORKERS):
        alive |= alive_k
        if counts_k is not None:
            counts += counts_k
            samples += samples_k
    if params.minfr_goodchannels == 0:
        igood = alive
    else:
        igood = alive & (counts / max(samples / params.fs, 1e-12) >= params.minfr_goodchannels)
    logger.info("good channels: %d of %d kept (%d constant; minfr_goodchannels=%g Hz)", igood.sum(), n_chan,
                (~alive).sum(), params.minfr_goodchannels)
    return igood


def whitening_from_covariance(cc: np.ndarray) -> np.ndarray:
    """whiteningFromCovariance.m: symmetric ZCA whitener E diag(1/sqrt(d + eps)) E' of a covariance (float64);
    cc may be a stack [..., n, n] of covariances.

    Kilosort's eps is 1e-6, an absolute value: for float data of a small scale (volts: eigenvalues about 1e-10)
    it swamped the covariance and the whitened data vanished in the int16 conversion. eps is 1e-6 times the mean
    eigenvalue where that is smaller, so the whitening no longer depends on the data's scale there; data whose
    mean eigenvalue is 1 or more (integer data, microvolts) keeps 1e-6 exactly, and its results."""
    d, e = np.linalg.eigh(cc)
    d = np.maximum(d, 0)
    eps = np.minimum(1e-6, 1e-6 * d.mean(axis=-1, keepdims=True))
    return (e / np.sqrt(d + eps)[..., None, :]) @ np.swapaxes(e, -1, -2)


def whitening_local(cc: np.ndarray, xc: np.ndarray, yc: np.ndarray, n_range: int) -> np.ndarray:
    """whiteningLocal.m: column j of Wrot whitens channel j using its n_range nearest channels, [Nchan, Nchan].

    Output channel j = sum_i data[:, i] * Wrot[i, j]; Wrot is zero outside j's neighbourhood and not symmetric.
    The channels' local whiteners come from one batched eigendecomposition.
    """
    n_chan = len(xc)
    n_range = min(n_range, n_chan)
    distance = (xc[None, :] - xc[:, None]) ** 2 + (yc[None, :] - yc[:, None]) ** 2  # [j, i]
    np.fill_diagonal(distance, -1)  # the channel itself first, even if another one shares its position
    local = np.argsort(distance, axis=1, kind="stable")[:, :n_range]  # [Nchan, n_range]
    with threadpool_limits(limits=1, user_api="blas"):  # small matrices: BLAS threads only contend
        whiteners = whitening_from_covariance(cc[local[:, :, None], local[:, None, :]])
    wrot = np.zeros((n_chan, n_chan))
    wrot[local, np.arange(n_chan)[:, None]] = whiteners[:, :, 0]
    return wrot


def chunk_covariance(ops, reader: RecordingReader, params, coefficients, window) -> tuple[np.ndarray, int]:
    """One chunk of get_whitening_matrix: (x' x of its own samples, filtered with their context, [Nchan, Nchan]
    float64 on the host; their count)."""
    read, out = window
    raw = reader.to_device(ops, reader.read_staged(ops, *read))
    return covariance(ops, raw, slice(out[0] - read[0], out[1] - read[0]), params, coefficients)


def covariance(ops, raw, own: slice, params, coefficients) -> tuple[np.ndarray, int]:
    """The result of chunk_covariance from its raw traces [n, Nchan] (any dtype, on the device) and the rows of
    its own samples."""
    x = filter_traces(ops, raw, params, coefficients)[own].astype(ops.xp.float64)
    return ops.to_host(x.T @ x), x.shape[0]


def get_whitening_matrix(ops, reader: RecordingReader, xc, yc, params) -> np.ndarray:
    """get_whitening_matrix.m: Wrot [Nchan, Nchan] float64, times scaleproc.

    The covariance comes from every nSkipCov-th chunk, each filtered with its context and cropped to its own
    samples (GPU_WORKERS chunks side by side); it is summed in float64 in chunk order and divided by the number
    of samples used (Kilosort 2.0 divided by ceil((Nbatch-1)/nSkipCov), which mis-scales it and is zero for one
    batch).
    """
    n_chan = len(reader.channel_ids)
    chunk = functools.partial(chunk_covariance, ops, reader, params, filter_coefficients(params))
    windows = [chunk_windows(k, params.NT, params.ntbuff, params.n_samples)
               for k in range(0, params.Nbatch, params.nSkipCov)]
    cc = np.zeros((n_chan, n_chan))
    n_used = 0
    for _, (cc_chunk, n_chunk) in prefetch(on_own_streams(ops, chunk), windows, GPU_WORKERS):
        cc += cc_chunk
        n_used += n_chunk
    cc /= n_used
    if params.whiteningRange < n_chan:
        wrot = whitening_local(cc, xc, yc, params.whiteningRange)
    else:
        wrot = whitening_from_covariance(cc)
    return wrot * params.scaleproc


def to_int16(ops, x):
    """Round to nearest and saturate (MATLAB's int16()), not NumPy's truncating, wrapping astype."""
    xp = ops.xp
    return xp.clip(xp.rint(x), -32768, 32767).astype(xp.int16)


def whiten_chunk(ops, reader: RecordingReader, wrot_dev, params, coefficients, pinned_copy, window):
    """One chunk of the main pass: filtered with its context, whitened, scaled to int16 [n_out, Nchan]. Copied by
    DMA straight into its rows of ``pinned_copy()`` (the in-memory copy [n_samples, Nchan] once page-locked, else
    None) and None returned; otherwise returned on the host. Returns (that, io.chunk_digest of the raw traces of
    the chunk's own samples, every channel: hashed on the host buffer read, while the device works)."""
    read, out = window
    own = slice(out[0] - read[0], out[1] - read[0])
    host = reader.read_staged(ops, *read)
    raw = reader.to_device(ops, host)
    x = whitened_int16(ops, raw, own, wrot_dev, params, coefficients)
    digest = chunk_digest(host[own])
    destination = pinned_copy()
    if destination is None:
        return np.ascontiguousarray(ops.to_host(x)), digest
    ops.copy_to_host(x, destination[out[0]:out[1]])
    return None, digest


def whitened_int16(ops, raw, own: slice, wrot_dev, params, coefficients):
    """The rows ``own`` of raw traces [n, Nchan] (any dtype, on the device) filtered with their context,
    whitened by ``wrot_dev`` [Nchan, Nchan] float32 and scaled: int16 on the device."""
    if params.skip_preprocessing:
        return to_int16(ops, raw[own].astype(ops.xp.float32))
    return to_int16(ops, filter_traces(ops, raw, params, coefficients)[own] @ wrot_dev)


def load_kernels(ops, params, n_channels: int) -> threading.Thread | None:
    """One chunk of each pass on zeros [NT + 4 ntbuff, n_channels], in a background thread (returned), on the GPU
    only: the first call of a kernel in a process loads it (cuBLAS's products 46 to 109 ms each on an H200, CuPy's
    elementwise kernels from their cache), which would otherwise delay the first chunks of each pass. Started
    while the recording is checked; sizes as when every channel is kept, the usual case."""
    if ops.name == "cpu":
        return None

    read, out = chunk_windows(1, params.NT, params.ntbuff, params.n_samples)  # a chunk inside the recording

    def run():
        # an error here comes again, with its message, in the pass
        with contextlib.suppress(Exception), ops.worker_stream():
            coefficients = filter_coefficients(params)
            raw = ops.xp.zeros((read[1] - read[0], n_channels), dtype=ops.xp.int16)
            own = slice(out[0] - read[0], out[1] - read[0])
            crossings(ops, raw[:params.NT], params, coefficients)
            covariance(ops, raw, own, params, coefficients)
            ops.to_host(whitened_int16(ops, raw, own, ops.xp.eye(n_channels, dtype=ops.xp.float32), params,
                                       coefficients))

    thread = threading.Thread(target=run, name="ks2py-load-kernels", daemon=True)
    thread.start()
    return thread


def write_whitened(ops, reader: RecordingReader, wrot: np.ndarray, params, store, show_progress: bool,
                   store_workers: int = 1, pinned_copy=lambda: None):
    """The main pass: every chunk filtered with its context, whitened, scaled, int16 [n_out, Nchan], by
    GPU_WORKERS threads side by side. A chunk goes straight into ``pinned_copy()`` where that gives the in-memory
    copy (page-locked); otherwise ``store(block, out)`` is called for it by writer threads while the next ones are
    processed (in order with one writer; several may store chunks side by side). Returns the raw chunks'
    digests in order (io.chunk_digest)."""
    windows = [chunk_windows(k, params.NT, params.ntbuff, params.n_samples) for k in range(params.Nbatch)]
    chunk = functools.partial(whiten_chunk, ops, reader, ops.asarray(wrot, dtype=ops.xp.float32), params,
                              filter_coefficients(params), pinned_copy)
    bar = progress_bar(total=len(windows), desc="preprocess", unit="batch", enabled=show_progress)
    with ThreadPoolExecutor(max_workers=store_workers) as writer:
        stored, digests = collections.deque(), []
        for (_, out), (block, digest) in prefetch(on_own_streams(ops, chunk), windows, GPU_WORKERS):
            digests.append(digest)
            while len(stored) > store_workers:  # bounded: each waiting block holds a page-locked buffer
                stored.popleft().result()
            if block is not None:
                stored.append(writer.submit(store, block, out))
            bar.update()
        for future in stored:
            future.result()
    bar.close()
    return digests


def run(ctx):
    params, probe, ops, ir = ctx.params, ctx.probe, ctx.ops, ctx.intermediate
    reader = RecordingReader(ctx.raw_data, params.t_start, params.t_stop, probe.chanMap)
    # the in-memory copy is allocated first, so that its pages are faulted in (in the background) during the
    # good-channel and whitening passes: the first writes to fresh pages would cost about as much as the pass.
    # The faulting waits for the kernels to be loaded, which it would hold up (as it would the first chunks)
    size = params.n_samples * len(probe.chanMap)  # every channel: the kept ones use its start
    memory = None
    if whitened_fits_in_memory(2 * size):
        memory, populating = large_host_array((size,), np.int16, after=ctx.get("kernels_loading"))
        # page-locked once populated, during the first two passes (or the main pass): the chunks finished then,
        # and the later stages' batches, move between it and the device without staging
        ctx.whitened_pinning = pin_when_populated(ops, memory, populating)
    if params.skip_preprocessing:
        igood = np.ones(len(probe.chanMap), dtype=bool)
    else:
        igood = get_good_channels(ops, reader, params)
        # each pass's worker threads have streams of their own, and CuPy's pool keeps freed blocks per stream:
        # released after each pass, the passes' blocks do not add up
        ops.release_memory()
    if not igood.any():
        width = passband_width(params)
        if width < SPIKE_BAND_HZ:
            band = f"fslow={params.fslow:g} Hz, " if params.fslow is not None else ""
            raise ValueError(
                f"no channel has threshold crossings at {params.minfr_goodchannels} Hz or more: the filter "
                f"(freq_min={params.fshigh:g} Hz, {band}{params.fs:g} Hz sampling) passes a band of only "
                f"{width:.3g} Hz, where spikes need about 300 to 5000 Hz. Widen it: lower freq_min (default 150), "
                "or raise fslow (or leave it None)"
            )
        raise ValueError(
            f"no channel has threshold crossings at {params.minfr_goodchannels} Hz or more (detect_threshold="
            f"{-params.spkTh}): the recording may hold no spikes, or its scaling may be wrong. Set "
            "minfr_goodchannels=0 to keep every channel."
        )
    chan_map, xc, yc, kcoords = (np.asarray(probe[k])[igood] for k in ("chanMap", "xc", "yc", "kcoords"))
    reader = RecordingReader(ctx.raw_data, params.t_start, params.t_stop, chan_map)
    shape = (params.n_samples, len(chan_map))
    whitened = None if memory is None else memory[:shape[0] * shape[1]].reshape(shape)
    if params.skip_preprocessing:
        wrot = np.eye(len(chan_map))
    else:
        wrot = get_whitening_matrix(ops, reader, xc, yc, params)
        ops.release_memory()
    if whitened is not None:
        # later stages of this run read the copy in memory; the file (for reruns and Phy) is written meanwhile
        def keep(block, out):
            whitened[out[0]:out[1]] = block

        pinning = ctx.whitened_pinning

        def pinned_copy():  # the chunks finished once the copy is page-locked go straight into it
            return whitened if is_pinned(pinning) else None

        digests = write_whitened(ops, reader, wrot, params, keep, ctx.show_progress, STORE_WORKERS, pinned_copy)
        if not ctx.get("whitened_file_by_drift"):  # else the drift stage corrects the copy, then writes the file
            ir.write_file_in_background("temp_wh.dat", lambda f: write_rows(f, whitened))
        ctx.whitened = whitened
    else:
        with ir.write_file("temp_wh.dat") as tmp, open(tmp, "wb") as f:
            digests = write_whitened(ops, reader, wrot, params, lambda block, out: f.write(memoryview(block)),
                                     ctx.show_progress)
    ir.igood, ir.chanMap, ir.xc, ir.yc, ir.kcoords, ir.Wrot = igood, chan_map, xc, yc, kcoords, wrot
    # what a rerun checks the recording against before it skips any stage (pipeline.check_recording_content)
    ir.record_recording(ctx.get("recording_identity"), combined_digest(digests))
