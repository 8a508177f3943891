"""Batched reads of the SpikeInterface recording and of the whitened data file.

Batch geometry: batches advance by ``L = NT - ntbuff`` samples (Kilosort 2.0's stride) and batch ``k`` owns the
samples ``[L*k, L*(k+1))``. Preprocessing computes them from a read with ``2*ntbuff`` samples of filter context
before and ``3*ntbuff`` after (Kilosort's read window); the whitened file holds each sample once: int16
``[n_samples, Nchan]``, time rows, the sorted range only. Later stages read batch ``k`` with a margin on each side
and keep only the spikes whose time falls in the batch's own samples, so every sample is searched exactly once
and spikes at batch edges are found like any other (Kilosort 2.0's batches left ~60 samples unsearched at each
edge, MouseLand/Kilosort#594).
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import hashlib
import itertools
import mmap
import os
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .checks import check_finite


def binary_source(recording):
    """(path, dtype name, offset) of the recording's own file (time rows, every channel) when it can be read
    directly, else None."""
    try:
        if recording.binary_compatible_with(time_axis=0, file_paths_length=1, file_offset=None):
            d = recording.get_binary_description()
            return Path(d["file_paths"][0]).absolute(), np.dtype(d["dtype"]).name, int(d["file_offset"])
    except Exception:  # recordings without a binary description
        pass
    return None


def whole_rows(recording, channel_indices=None):
    """(recording, channel indices in it) to read ``channel_indices`` of ``recording`` (all channels when None) from:
    for a channel slice of a binary recording (a probe set on a file with channels outside the probe, such as a
    sync channel, gives one), the binary recording and the indices of the channels in its rows, so that batches
    stay whole rows of the file; else ``recording`` itself."""
    from spikeinterface.core.channelslice import ChannelSliceRecording

    asked = np.arange(recording.get_num_channels()) if channel_indices is None else np.asarray(channel_indices)
    source, indices = recording, asked
    while isinstance(source, ChannelSliceRecording):
        source, indices = source._parent, np.asarray(source._parent_channel_indices)[indices]
    if source is recording or binary_source(source) is None:
        return recording, asked
    return source, indices


DIGEST_BLOCK = 4096  # 64-bit words summed per block by chunk_digest


@functools.lru_cache(maxsize=1)
def digest_keys() -> np.ndarray:
    """DIGEST_BLOCK odd 64-bit keys (splitmix64 of 1, 2, ...: fixed, whatever NumPy's generators do)."""
    z = np.arange(1, DIGEST_BLOCK + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return (z ^ (z >> np.uint64(31))) | np.uint64(1)


def chunk_digest(rows: np.ndarray) -> bytes:
    """A 16-byte digest of every byte of ``rows`` (raw traces [n, C], any dtype): the bytes as 64-bit words, each
    block of DIGEST_BLOCK words summed times fixed odd keys (mod 2**64; one word changed always changes its
    block's sum), then blake2b of the block sums, the tail and the shape. About 11 GB/s on one core (blake2b of
    the bytes: 0.8 GB/s), with the GIL released: cheap beside the reads it follows."""
    data = np.ascontiguousarray(rows)
    flat = data.reshape(-1).view(np.uint8)
    n_blocks = len(flat) // (8 * DIGEST_BLOCK)
    words = flat[:n_blocks * 8 * DIGEST_BLOCK].view(np.uint64).reshape(n_blocks, DIGEST_BLOCK)
    h = hashlib.blake2b(np.einsum("ij,j->i", words, digest_keys()).tobytes(), digest_size=16)
    h.update(flat[n_blocks * 8 * DIGEST_BLOCK:].tobytes())
    h.update(f"{data.dtype.str}{data.shape}".encode())
    return h.digest()


def combined_digest(digests) -> str:
    """The recording's content digest (hex) from the chunk digests of its main preprocessing pass, in order."""
    return hashlib.blake2b(b"".join(digests), digest_size=16).hexdigest()


def content_digest(recording, t_start: int, t_stop: int, stride: int, workers: int = 4) -> str:
    """What preprocessing's main pass computes (combined_digest of the chunks [stride*k, stride*(k+1)) of the
    sorted range, every channel, raw values) in one read of the range, ``workers`` chunks read side by side."""
    reader = RecordingReader(recording, t_start, t_stop, np.arange(recording.get_num_channels()))
    ranges = [(a, min(a + stride, reader.n_samples)) for a in range(0, reader.n_samples, stride)]
    return combined_digest(digest for _, digest in prefetch(lambda r: chunk_digest(reader.read(*r)), ranges, workers))


def read_rows(path, out: np.ndarray, offset: int, first_row: int):
    """Fill ``out`` [n, C] with rows first_row.. of a file of C-column time rows starting at byte ``offset``, by
    one preadv straight into ``out`` (no memory map); OSError when the file is short."""
    fd = os.open(path, os.O_RDONLY)
    try:
        n_read = os.preadv(fd, [memoryview(out).cast("B")], offset + first_row * out.itemsize * out.shape[1])
    finally:
        os.close(fd)
    if n_read != out.nbytes:
        raise OSError(f"{path}: read {n_read} bytes at sample {first_row}, expected {out.nbytes}")


class RecordingReader:
    """Reads ranges of the sorted part ``[t_start, t_stop)`` of one recording segment.

    ``channel_indices`` selects recording channels (0-based); ranges are relative to ``t_start`` and clipped to
    the sorted range. ``read`` returns every channel of the recording in its dtype, [n, num_channels] (a
    binary recording's rows are then a view of the file, where a column selection would be a slow strided
    gather; a channel slice of a binary recording gives every channel of its file, see ``whole_rows``);
    ``to_device`` moves them to the device and keeps the selected channels, [n, len(channel_indices)].
    """

    def __init__(self, recording, t_start: int, t_stop: int, channel_indices):
        # a channel slice of a binary file is read as the file's whole rows (``recording`` is then that file's)
        recording, channel_indices = whole_rows(recording, channel_indices)
        self.recording = recording
        self.t_start = int(t_start)
        self.n_samples = int(t_stop) - int(t_start)
        self.channel_ids = recording.get_channel_ids()[channel_indices]
        every_channel = np.array_equal(channel_indices, np.arange(recording.get_num_channels()))
        self.columns = None if every_channel else channel_indices
        self.may_hold_nan = np.dtype(recording.get_dtype()).kind == "f"
        # a binary file is read straight into page-locked buffers (no page faults of a memory map, and threads
        # reading in parallel do not contend for them)
        self.binary = binary_source(recording) if hasattr(os, "preadv") else None

    def clip(self, start: int, stop: int) -> tuple[int, int]:
        return max(0, start), min(self.n_samples, stop)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Traces of [start, stop), all channels; ValueError naming the first NaN or inf of a selected channel
        of a float recording."""
        start, stop = self.clip(start, stop)
        traces = self.recording.get_traces(
            segment_index=0,
            start_frame=self.t_start + start,
            end_frame=self.t_start + stop,
            return_in_uV=False,
        )
        return self.checked(traces, start)

    def checked(self, traces: np.ndarray, start: int) -> np.ndarray:
        """``traces`` (read from ``start``); ValueError naming the first NaN or inf of a selected channel of a
        float recording."""
        if self.may_hold_nan:
            check_finite(traces if self.columns is None else traces[:, self.columns], self.t_start + start)
        return traces

    def read_staged(self, ops, start: int, stop: int) -> np.ndarray:
        """``read`` into a host buffer ready for a fast transfer to the device (``ops.staged``)."""
        if self.binary is None:
            return ops.staged(self.read(start, stop))
        start, stop = self.clip(start, stop)
        path, dtype, offset = self.binary
        traces = ops.empty_staged((stop - start, self.recording.get_num_channels()), dtype)
        read_rows(path, traces, offset, self.t_start + start)
        return self.checked(traces, start)

    def to_device(self, ops, traces):
        """Traces from ``read`` on the device, selected channels only: [n, len(channel_indices)]."""
        x = ops.asarray(traces)
        return x if self.columns is None else x[:, ops.asarray(self.columns)]


def chunk_windows(k: int, NT: int, ntbuff: int, n_samples: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Preprocessing chunk ``k``: (read range, unique output range), both relative to the sorted range."""
    L = NT - ntbuff
    out = (L * k, min(L * (k + 1), n_samples))
    read = (max(0, out[0] - 2 * ntbuff), min(n_samples, out[1] + 3 * ntbuff))
    return read, out


def prefetch(function, items, workers: int = 1):
    """Yield ``(item, function(item))`` in order while ``workers`` background threads already compute the next
    ones (IO overlap)."""
    items = iter(items)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque((item, pool.submit(function, item)) for item in itertools.islice(items, workers))
        while pending:
            item, future = pending.popleft()
            result = future.result()
            for following in itertools.islice(items, 1):
                pending.append((following, pool.submit(function, following)))
            yield item, result


def on_own_streams(ops, function):
    """``function`` run, in each thread that calls it, on a device stream of that thread's own (``ops.worker_stream``).
    With ``prefetch(on_own_streams(ops, f), items, workers)`` several batches are processed side by side: the
    stages are bound by the host's work per kernel launch and by its waits for results, which other threads fill.
    ``function`` must return host data, or synchronise its stream before returning device arrays. The work queued
    so far on the caller's stream (e.g. the arrays the function reads) is completed here, before any worker runs.
    """
    ops.synchronize()
    local = threading.local()

    def run(*args):
        if not hasattr(local, "stream"):
            local.stream = ops.worker_stream()
        with local.stream:
            return function(*args)

    return run


MADV_DONTNEED = 4  # Linux: give pages back (the range reads as zeros after)
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault pages in, writable, without changing their contents
# threads faulting in a large array (one thread zeroes about 3 GB of fresh pages a second), half the cores at most
POPULATE_WORKERS = max(1, min(8, (os.cpu_count() or 2) // 2))
HUGE_PAGE = 2 ** 21
RELEASE_SLICE = 2 ** 28  # bytes of a large array given back to the system per madvise call
# bytes faulted in per madvise call: the call holds the process's memory map (for reading) throughout, and a thread
# that maps memory (a new thread's stack, a library, a page-locked buffer) waits for every call in progress. One call
# per thread held up a sort's main thread until the whole copy was faulted in; with 64 MiB calls CUDA's first module
# loads still ended only when the faulting did; 8 MiB calls fault the copy in as fast as 64 MiB ones
POPULATE_SLICE = 2 ** 23


@functools.lru_cache(maxsize=None)
def libc_madvise():
    """libc's madvise(address, length, advice) through ctypes (which releases the GIL during the call), or None
    where there is none (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def large_host_array(shape, dtype, after: threading.Thread | None = None) -> tuple[np.ndarray, list[threading.Thread]]:
    """An uninitialised host array of many GB whose pages background threads fault in ahead of use: (the array,
    those threads).

    The first write to a fresh page otherwise costs about as much as the copy itself (the kernel zeroes it). The
    array is mapped with transparent huge pages where the system offers them (one fault per 2 MB instead of per
    4 kB), and MADV_POPULATE_WRITE faults them in, POPULATE_WORKERS ranges side by side, POPULATE_SLICE bytes per
    call, without touching what was already written; where the kernel lacks either, the array is an ordinary
    one. The threads start faulting once the thread ``after`` (if any) has ended: work that maps much memory
    (loading CUDA's libraries and modules) is held up by every madvise call in progress.
    """
    count = int(np.prod(shape))
    nbytes = max(1, count * np.dtype(dtype).itemsize)
    # private anonymous memory: a shared mapping (mmap's default) is backed by shmem, for which the system may
    # grant no huge pages and gives no pages back before the last unmapping
    private = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}
    buffer = mmap.mmap(-1, nbytes, **private)
    with contextlib.suppress(AttributeError, OSError):
        buffer.madvise(mmap.MADV_HUGEPAGE)
    array = np.frombuffer(buffer, dtype=dtype, count=count).reshape(shape)
    threads = []
    madvise = libc_madvise()
    if madvise is None:
        return array, threads
    address = ctypes.addressof(ctypes.c_char.from_buffer(buffer))

    def populate(start, stop):
        if after is not None:
            after.join()
        for offset in range(start, stop, POPULATE_SLICE):
            madvise(address + offset, min(POPULATE_SLICE, stop - offset), MADV_POPULATE_WRITE)

    # ranges of whole huge pages (the mapping starts on a page boundary), the last one up to the end
    bounds = [min(nbytes, -(-nbytes * i // POPULATE_WORKERS // HUGE_PAGE) * HUGE_PAGE)
              for i in range(POPULATE_WORKERS + 1)]
    for start, stop in itertools.pairwise(bounds):
        if stop > start:
            threads.append(threading.Thread(target=populate, args=(start, stop), daemon=True))
            threads[-1].start()
    return array, threads


def pin_when_populated(ops, array: np.ndarray, populating: list[threading.Thread]) -> Future:
    """Page-lock ``array`` (``ops.pin_host``) in a background thread once the ``populating`` threads have faulted
    its pages in: the copies between it and the device then run by DMA, with no staging copy on the host (about
    8 ms a batch of 384 channels on an H200 host, against under 1 ms). The future gives the function that unpins
    it (None where nothing was pinned); copies made before it is done are correct, only slower."""

    def pin():
        for thread in populating:
            thread.join()
        return ops.pin_host(array)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ks2py-pin")
    future = executor.submit(pin)
    executor.shutdown(wait=False)
    return future


class WhitenedData:
    """The whitened int16 data ``[n_samples, Nchan]``.

    ``source`` is the path of the whitened file or an in-memory int16 array of the same shape. The file is read
    with preadv into the caller's buffers, not memory-mapped: its pages stay in the page cache, which the system
    reclaims, and never count in the process's memory.
    """

    def __init__(self, source, n_samples: int, n_channels: int, scaleproc: float):
        self.path = Path(source) if isinstance(source, (str, Path)) else None
        self.data = None if self.path is not None else source
        self.n_samples = n_samples
        self.n_channels = n_channels
        self.scaleproc = float(scaleproc)

    def _copy_rows(self, out: np.ndarray, start: int):
        """Rows [start, start + len(out)) of the data (inside it) into ``out`` [n, Nchan] int16."""
        if self.data is not None:
            out[:] = self.data[start:start + len(out)]
            return
        read_rows(self.path, out, 0, start)

    def read(self, ops, start: int, stop: int) -> np.ndarray:
        """int16 rows [start, stop) with zeros where the range leaves the data, [stop - start, Nchan], ready for a
        fast transfer to the device of ``ops``: a read-only view of the in-memory copy (page-locked once
        preprocessing has pinned it) where the range lies inside it, else a host buffer (``ops.empty_staged``)."""
        if self.data is not None and 0 <= start <= stop <= self.n_samples:
            view = self.data[start:stop]
            view.flags.writeable = False
            return view
        out = ops.empty_staged((stop - start, self.n_channels), np.int16)
        a, b = max(0, start), min(self.n_samples, stop)
        if a > start or b < stop:
            out[:] = 0
        if b > a:
            self._copy_rows(out[a - start:b - start], a)
        return out

    def batch(self, ops, k: int, stride: int, margin: int) -> np.ndarray:
        """int16 samples ``[stride*k - margin, stride*(k+1) + margin)``, [stride + 2*margin, Nchan]."""
        return self.read(ops, stride * k - margin, stride * (k + 1) + margin)


def write_rows(f, data: np.ndarray, rows: int = 2 ** 16):
    """Write the rows of ``data`` to the open file ``f``, 2**16 rows at a time (no copy of the whole array)."""
    for start in range(0, len(data), rows):
        f.write(memoryview(data[start:start + rows]))


def whitened_fits_in_memory(n_bytes: int) -> bool:
    """Whether the whitened data may be held in host memory: at most half of the memory available now."""
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not a POSIX system that says: use the file
        return False
    return n_bytes <= available // 2


def is_pinned(pinning: Future | None) -> bool:
    """Whether the page-locking ``pinning`` (from pin_when_populated) is done and took."""
    return pinning is not None and pinning.done() and pinning.exception() is None and pinning.result() is not None


def unpin_whitened(ctx):
    """Unpin the in-memory whitened copy once its pinning is done, in a background thread (about 0.1 s for 7 GB):
    page-locked memory is not given back to the system until it is unpinned."""
    pinning, ctx.whitened_pinning = ctx.whitened_pinning, None

    def unpin(done: Future):
        if is_pinned(done):
            threading.Thread(target=done.result(), name="ks2py-unpin", daemon=True).start()

    if pinning is not None:
        pinning.add_done_callback(unpin)


def release_whitened(ctx):
    """Let go of the in-memory whitened copy (later reads go to its file) in a background thread, which gives its
    pages back to the system RELEASE_SLICE bytes at a time (MADV_DONTNEED) before dropping it. Unmapping 7 GB (of
    the shared mapping used before) at once took about 1 s in a sort's process on an H200 host, holding the
    process's memory map for writing all along: done during the export it slowed the export's file writes by
    about 0.5 s, and right after the sort the caller's own frees waited 0.4 s for it. Slice by slice the map is
    held briefly, and for reading. Pages still page-locked go back once unpinned."""
    holder, ctx.whitened = [ctx.whitened], None

    def release():
        whitened, madvise = holder.pop(), libc_madvise()
        if whitened is None or madvise is None or whitened.ctypes.data % mmap.PAGESIZE:
            return  # not a copy of large_host_array: it is simply dropped
        size = whitened.nbytes // mmap.PAGESIZE * mmap.PAGESIZE
        for start in range(0, size, RELEASE_SLICE):
            madvise(whitened.ctypes.data + start, min(RELEASE_SLICE, size - start), MADV_DONTNEED)

    threading.Thread(target=release, name="ks2py-release", daemon=True).start()


def open_whitened(ctx) -> WhitenedData:
    """The whitened data of this run: the copy preprocessing kept in memory, or else its file in the cache."""
    ir = ctx.intermediate
    source = ctx.whitened if ctx.whitened is not None else ir.file_path("temp_wh.dat")
    return WhitenedData(source, ctx.params.n_samples, len(ir.chanMap), ctx.params.scaleproc)


def batch_margin(params) -> int:
    """Samples read beyond each side of a batch's own samples: room for the windows and lockouts of the
    spikes near its edges (3 template lengths)."""
    return 3 * params.nt0


def owned_spikes(times, params, k: int):
    """bool mask of the spikes (times: samples in batch k read with its margins) that belong to batch k: in its own
    samples and inside the sorted range."""
    stride, margin = params.NT - params.ntbuff, batch_margin(params)
    return (times >= margin) & (times < margin + stride) & (times - margin + stride * k < params.n_samples)


def noise_units(ctx, raw):
    """An int16 whitened batch as float32 on the device, divided by scaleproc (unit noise)."""
    xp = ctx.ops.xp
    return ctx.ops.asarray(raw).astype(xp.float32) / xp.float32(ctx.params.scaleproc)


def read_batch(ctx, data: WhitenedData, k: int) -> np.ndarray:
    """int16 batch k with its margins, staged for the device."""
    p = ctx.params
    return data.batch(ctx.ops, k, p.NT - p.ntbuff, batch_margin(p))


def batch_prefetch(ctx, data: WhitenedData, batches):
    """Yield (k, int16 batch k with margins on the device, valid until the next batch is asked for) with the next
    batches read and copied to the device in the background (ops.prefetch_to_device)."""
    return ctx.ops.prefetch_to_device(lambda k: read_batch(ctx, data, k), batches)
