import mmap
import threading
import weakref
from concurrent.futures import Future

import numpy as np
import pytest
from scipy import signal

import spikeinterface.core as sc
from si_ks2py import io
from si_ks2py.context import Bunch
from si_ks2py.cpu import ops
from si_ks2py.io import WhitenedData, large_host_array, release_whitened, unpin_whitened
from si_ks2py.pipeline import run
from si_ks2py.stages.preprocess import butterworth, to_int16
from conftest import generate_recording


def whitened(ctx) -> np.ndarray:
    ir = ctx.intermediate
    data = WhitenedData(ir.file_path("temp_wh.dat"), ctx.params.n_samples, len(ir.chanMap), ctx.params.scaleproc)
    return data.read(ops, 0, ctx.params.n_samples).astype(np.float64)


@pytest.mark.parametrize("order, band", [(3, (0.01,)), (3, (0.02, 0.4)), (3, (300 / 10000,)), (2, (0.1,)),
                                         (4, (0.1, 0.3)), (3, (150 / 12500, 6000 / 12500))])
def test_butterworth_matches_scipy(order, band):
    b, a = butterworth(order, band)
    expected = signal.butter(order, band[0] if len(band) == 1 else list(band), "high" if len(band) == 1 else "bandpass")
    np.testing.assert_allclose(b, expected[0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(a, expected[1], rtol=1e-12, atol=1e-15)


def test_filter_matches_scipy_filtfilt_away_from_edges():
    rng = np.random.default_rng(0)
    n = 20000
    x = rng.normal(size=(n, 3)).cumsum(axis=0).astype(np.float32)  # strong low frequencies
    x += rng.normal(size=(n, 3)).astype(np.float32)
    b, a = signal.butter(3, 150 / 15000, btype="high")
    y = ops.filtfilt_zero_state(x, b, a)
    reference = signal.filtfilt(b, a, x.astype(np.float64), axis=0)
    middle = slice(3000, n - 3000)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y[middle], reference[middle], atol=1e-3 * reference[middle].std())
    # the zero initial state is Kilosort's, not filtfilt's: the two differ at the edges
    assert np.abs(y[:50] - reference[:50]).max() > 1e-2 * reference.std()


def test_running_min_and_sum_match_direct_windows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 7)).astype(np.float32)
    for axis, hw in ((0, 5), (1, 2), (0, 30)):
        n = x.shape[axis]
        idx = [np.arange(max(0, i - hw), min(n, i + hw + 1)) for i in range(n)]
        mins = np.stack([np.take(x, ix, axis=axis).min(axis=axis) for ix in idx], axis=axis)
        sums = np.stack([np.take(x, ix, axis=axis).sum(axis=axis) for ix in idx], axis=axis)
        np.testing.assert_allclose(ops.running_min(x, hw, axis), mins)
        np.testing.assert_allclose(ops.running_sum(x, hw, axis), sums, atol=1e-5)


def test_large_host_array_keeps_what_is_written_while_its_pages_are_faulted_in():
    # 5 huge pages and a bit: slices of whole huge pages for the populating threads, a short last one
    data = np.random.default_rng(3).integers(-2 ** 15, 2 ** 15, 5 * 2 ** 20 + 12345, dtype=np.int16)
    array, populating = large_host_array(data.shape, np.int16)
    array[:] = data  # written while the threads fault the pages in
    for thread in populating:
        thread.join()
    np.testing.assert_array_equal(array, data)


@pytest.fixture
def madvise_calls(monkeypatch) -> list:
    """The (address, length, advice) of every madvise call made through io.libc_madvise, which still runs them."""
    calls = []
    madvise = io.libc_madvise()
    if madvise is None:
        pytest.skip("no madvise on this system")

    def recorded(address, length, advice):
        calls.append((address, length, advice))
        return madvise(address, length, advice)

    monkeypatch.setattr(io, "libc_madvise", lambda: recorded)
    return calls


def test_large_host_array_is_faulted_in_by_slices_that_cover_it(monkeypatch, madvise_calls):
    """One madvise call holds the process's memory map: each call covers at most POPULATE_SLICE bytes, and the
    calls together cover the array once."""
    monkeypatch.setattr(io, "POPULATE_SLICE", 2 ** 21)
    array, populating = large_host_array((5 * 2 ** 20 + 12345,), np.int16)  # 10 MiB and a bit
    for thread in populating:
        thread.join()
    calls = sorted(call for call in madvise_calls if call[2] == io.MADV_POPULATE_WRITE)
    assert all(length <= 2 ** 21 for _, length, _ in calls)
    start = array.ctypes.data
    for address, length, _ in calls:
        assert address == start
        start += length
    assert start == array.ctypes.data + array.nbytes


def test_large_host_array_is_faulted_in_only_after_the_thread_it_waits_for(madvise_calls):
    """Faulting holds up work that maps memory (CUDA's module loads): it starts once ``after`` has ended."""

    def populate_calls():
        return [call for call in madvise_calls if call[2] == io.MADV_POPULATE_WRITE]

    loaded = threading.Event()
    loading = threading.Thread(target=loaded.wait)
    loading.start()
    array, populating = large_host_array((2 ** 22,), np.int16, after=loading)
    loading.join(timeout=0.3)  # the faulting threads would be done by now if they did not wait
    assert not populate_calls() and all(thread.is_alive() for thread in populating)
    loaded.set()
    for thread in populating:
        thread.join()
    assert len(populate_calls()) >= len(populating) > 0


def test_in_memory_whitened_data_is_read_as_views_and_zero_padded_at_its_ends():
    data = np.arange(50 * 3, dtype=np.int16).reshape(50, 3)
    whitened = WhitenedData(data, 50, 3, scaleproc=200.0)
    inside = whitened.read(ops, 10, 20)
    assert np.shares_memory(inside, data) and not inside.flags.writeable  # no copy, and it cannot be changed
    np.testing.assert_array_equal(inside, data[10:20])
    for start, stop in [(-4, 6), (45, 55), (-2, 52)]:
        expected = np.zeros((stop - start, 3), np.int16)
        expected[max(0, -start):max(0, -start) + min(50, stop) - max(0, start)] = data[max(0, start):min(50, stop)]
        np.testing.assert_array_equal(whitened.read(ops, start, stop), expected)


def test_whitened_copy_is_unpinned_and_then_let_go_of_in_the_background():
    copy = np.zeros((1000, 4), np.int16)
    released, unpinned = threading.Event(), threading.Event()
    weakref.finalize(copy, released.set)  # called once the last reference to the copy is gone
    pinning = Future()
    pinning.set_result(lambda copy=copy: unpinned.set())  # the unpinning holds the copy, as ops.pin_host's does
    ctx = Bunch(whitened=copy, whitened_pinning=pinning)
    del copy, pinning
    unpin_whitened(ctx)
    assert unpinned.wait(5) and ctx.whitened_pinning is None
    assert ctx.whitened is not None and not released.is_set()  # still read by the stages of this context
    release_whitened(ctx)
    assert ctx.whitened is None  # later reads go to the file
    assert released.wait(5)


def test_release_whitened_gives_the_pages_of_a_large_host_array_back_slice_by_slice(monkeypatch):
    monkeypatch.setattr(io, "RELEASE_SLICE", 2 ** 20)
    copy, populating = large_host_array((5 * 2 ** 19 + 1000, 1), np.int16)  # 5 MiB and a bit
    for thread in populating:
        thread.join()
    copy[:] = 7
    view = copy[:]  # kept by the test only, to look at the pages once given back
    release_whitened(Bunch(whitened=copy, whitened_pinning=None))
    del copy
    for thread in [t for t in threading.enumerate() if t.name == "ks2py-release"]:
        thread.join(5)
    whole_pages = view.nbytes // mmap.PAGESIZE * mmap.PAGESIZE // 2
    assert not view[:whole_pages].any()  # given back: fresh zero pages
    assert (view[whole_pages:] == 7).all()  # the last part page is left to the unmapping


def test_int16_conversion_rounds_and_saturates():
    out = to_int16(ops, np.array([1.4, -0.6, 2.6, 40000.0, -40000.0], dtype=np.float32))
    np.testing.assert_array_equal(out, [1, -1, 3, 32767, -32768])


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    recording, _ = generate_recording(duration=12.0, seed=3)
    out = tmp_path_factory.mktemp("pre")
    ctx = run(recording, out / "global", {"nSkipCov": 1, "NT": 16384 + 64}, verbose=False, stop_after="preprocess")
    local = run(recording, out / "local", {"nSkipCov": 1, "whiteningRange": 8}, verbose=False,
                stop_after="preprocess")
    return recording, ctx, local


def test_whitened_file_matches_whole_signal_scipy_reference(preprocessed):
    """Batched, streamed preprocessing = filtering the whole recording at once, away from the recording edges."""
    recording, ctx, _ = preprocessed
    p, ir = ctx.params, ctx.intermediate
    traces = recording.get_traces().astype(np.float64)[:, ir.chanMap]
    traces -= traces.mean(axis=0)
    traces -= np.median(traces, axis=1, keepdims=True)
    b, a = signal.butter(3, 150 / 15000, btype="high")
    filtered = signal.filtfilt(b, a, traces, axis=0)
    reference = filtered @ ir.Wrot
    ours = whitened(ctx)
    middle = slice(3000, p.n_samples - 3000)
    error = ours[middle] - reference[middle]
    assert np.sqrt((error ** 2).mean()) < 0.01 * p.scaleproc  # 1% of the whitened noise level
    # the batch joins (every NT - ntbuff samples) leave no seam above 1% of the noise
    joins = np.arange(1, p.Nbatch) * (p.NT - p.ntbuff)
    seam = np.concatenate([error[j - 3000 - 5:j - 3000 + 5] for j in joins if 3005 < j < p.n_samples - 3005])
    assert np.sqrt((seam ** 2).mean()) < 0.01 * p.scaleproc


def test_whitened_covariance_is_scaleproc_squared_identity(preprocessed):
    _, ctx, local = preprocessed
    s2 = ctx.params.scaleproc ** 2
    cov = np.cov(whitened(ctx).T) / s2
    np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.03)
    assert np.abs(cov - np.diag(np.diag(cov))).max() < 0.03
    # local whitening: each channel is white with respect to its own neighbourhood
    ir = local.intermediate
    cov = np.cov(whitened(local).T) / s2
    np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.05)
    for j in range(len(ir.chanMap)):
        neighbours = np.flatnonzero(ir.Wrot[:, j])
        assert len(neighbours) == 8
        off = cov[j, neighbours[neighbours != j]]
        assert np.abs(off).max() < 0.15, (j, off)


def test_dead_channel_is_dropped_and_reading_is_streamed(tmp_path):
    recording, _ = generate_recording(duration=8.0, seed=4)
    traces = recording.get_traces()
    traces[:, 5] = 0.0
    traces[:, 9] = 3.0
    dead = sc.NumpyRecording([traces], sampling_frequency=30000.0)
    dead.set_probe(recording.get_probe())  # in place
    requested = []
    original = dead.get_traces

    def spy(*args, start_frame=None, end_frame=None, **kwargs):
        requested.append(end_frame - start_frame)
        return original(*args, start_frame=start_frame, end_frame=end_frame, **kwargs)

    dead.get_traces = spy
    ctx = run(dead, tmp_path / "out", {"NT": 8192 + 64}, verbose=False, stop_after="preprocess")
    ir = ctx.intermediate
    assert not ir.igood[5] and not ir.igood[9] and ir.igood.sum() == 30
    assert 5 not in ir.chanMap and ir.Wrot.shape == (30, 30)
    assert max(requested) <= ctx.params.NTbuff  # never more than one batch with its buffers in memory
    assert whitened(ctx).shape == (8 * 30000, 30)


def test_no_crossings_anywhere_is_a_clear_error(tmp_path):
    recording, _ = generate_recording(duration=3.0, num_units=1)
    quiet = sc.NumpyRecording([np.random.default_rng(0).normal(size=(90000, 32)).astype("float32")], 30000.0)
    quiet.set_probe(recording.get_probe())  # in place
    with pytest.raises(ValueError, match="no channel has threshold crossings"):
        run(quiet, tmp_path / "out", {"minfr_goodchannels": 5.0}, verbose=False, stop_after="preprocess")
