"""What users of Kilosort 2 ports hit: spike holes at batch edges, degenerate inputs, wrong scaling."""

import numpy as np
import pytest
import spikeinterface.core as sc

import si_ks2py
from si_ks2py.demo import generate_demo_recording, score, summary
from si_ks2py.pipeline import run

pytestmark = pytest.mark.slow
CPU = {"device": "cpu", "progress": False}


def recall_near_and_far_from_edges(gt, sorting, stride: int, window: int, tolerance: int = 12):
    """Recall of the ground-truth spikes within +-window samples of a batch edge, and of the others (units that
    were found, each against its best match)."""
    comparison = score(gt, sorting)
    near, far = [], []
    for unit, match in comparison.best_match_12.items():
        if str(match) == "-1":
            continue
        truth = gt.get_unit_spike_train(unit)
        found = sorting.get_unit_spike_train(match)
        hit = np.abs(found[np.clip(np.searchsorted(found, truth), 1, len(found) - 1)[:, None] + [-1, 0]]
                     - truth[:, None]).min(axis=1) <= tolerance
        offset = np.abs((truth + stride // 2) % stride - stride // 2)  # distance to the nearest edge
        near.append(hit[offset <= window])
        far.append(hit[offset > window])
    return np.concatenate(near).mean(), np.concatenate(far).mean(), len(np.concatenate(near))


def test_no_spike_holes_at_default_batch_edges(demo_sort):
    stride = 64 * 1024  # NT - ntbuff
    near, far, n = recall_near_and_far_from_edges(demo_sort["gt"], demo_sort["sorting"], stride, 300)
    assert n > 50 and near >= far - 0.02, (near, far, n)


def test_no_spike_holes_at_odd_batch_edges(tmp_path):
    recording, gt = generate_demo_recording(duration=30.0, num_units=10, seed=11)
    NT, ntbuff = 159 * 32, 85  # an odd stride of 5003 samples: 179 edges (NT is a multiple of 32, as in kilosort2)
    sorting = si_ks2py.run(recording, tmp_path / "out", NT=NT, ntbuff=ntbuff, verbose=False, **CPU)
    near, far, n = recall_near_and_far_from_edges(gt, sorting, NT - ntbuff, 300)
    assert n > 300 and near >= far - 0.02 and far > 0.9, (near, far, n)


def with_traces(recording, traces):
    new = sc.NumpyRecording([traces], sampling_frequency=recording.sampling_frequency)
    new.set_probe(recording.get_probe())  # in place
    return new


def test_recording_without_spikes_is_a_clear_error(tmp_path):
    recording, _ = generate_demo_recording(duration=5.0, num_units=1)
    noise = np.random.default_rng(0).normal(0, 5, size=(150000, 32)).astype("float32")
    with pytest.raises(ValueError, match="no channel has threshold crossings"):
        run(with_traces(recording, noise), tmp_path / "out", CPU, verbose=False)


def test_silent_stretch_of_many_batches(tmp_path):
    recording, gt = generate_demo_recording(duration=30.0, num_units=8, seed=12)
    traces = recording.get_traces()
    silent = slice(8 * 30000, 22 * 30000)  # 14 s: 25 batches of NT below
    traces[silent] = np.random.default_rng(1).normal(0, 5, size=traces[silent].shape)
    gt = gt.frame_slice(0, 8 * 30000)  # truth outside the silent stretch is all we can score
    sorting = si_ks2py.run(with_traces(recording, traces), tmp_path / "out", NT=16384 + 64, verbose=False, **CPU)
    sorting = sorting.frame_slice(0, 8 * 30000)
    result = summary(score(gt, sorting))
    assert result["accuracy_0.8"] >= 0.8 * result["gt_units"], result


def test_dead_channels_are_dropped_and_units_still_found(tmp_path):
    recording, gt = generate_demo_recording(duration=20.0, num_units=8, seed=13)
    traces = recording.get_traces()
    traces[:, 3] = 0.0
    traces[:, 17] = 7.0
    ctx = run(with_traces(recording, traces), tmp_path / "out", CPU, verbose=False)
    kept = np.asarray(ctx.intermediate.chanMap)
    assert 3 not in kept and 17 not in kept and len(kept) == 30
    sorting = si_ks2py.run(with_traces(recording, traces), tmp_path / "out", verbose=False, **CPU)
    result = summary(score(gt, sorting))
    assert result["accuracy_0.8"] >= 0.8 * result["gt_units"], result


def test_recording_shorter_than_one_batch(tmp_path):
    recording, gt = generate_demo_recording(duration=1.5, num_units=4, seed=14)
    one_batch = {**CPU, "NT": 64 * 1024 + 64}  # NT=None would cut it into 6 batches (params.default_batch_length)
    ctx = run(recording, tmp_path / "out", one_batch, verbose=False)
    assert ctx.params.Nbatch == 1
    sorting = si_ks2py.run(recording, tmp_path / "out", verbose=False, **one_batch)
    result = summary(score(gt, sorting))
    assert result["accuracy_0.8"] >= 2, result  # 1.5 s is little data, but the large units are there


def test_single_channel_recording(tmp_path):
    import probeinterface as pi

    probe = pi.generate_linear_probe(num_elec=1)
    probe.set_device_channel_indices([0])
    recording, gt = sc.generate_ground_truth_recording(durations=[60.0], sampling_frequency=30000.0, num_units=2,
                                                       probe=probe, seed=15,
                                                       generate_unit_locations_kwargs=dict(margin_um=5.0,
                                                                                           minimum_z=5.0,
                                                                                           maximum_z=15.0))
    sorting = si_ks2py.run(recording, tmp_path / "out", verbose=False, **CPU)
    # on one channel the two units' shapes are alike: learning merges them, and the split (which needs 300
    # spikes on each side, hence 60 s) separates them by amplitude
    assert summary(score(gt, sorting))["accuracy_0.8"] == 2


def test_nan_is_refused_before_any_work(tmp_path):
    recording, _ = generate_demo_recording(duration=5.0, num_units=2)
    traces = recording.get_traces()
    traces[40000, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values"):
        run(with_traces(recording, traces), tmp_path / "out", CPU, verbose=False)
    traces[40000, 5] = 0
    traces[123456:123460, 2] = np.inf  # between the sampled windows: found when it is read
    with pytest.raises(ValueError, match=r"first at sample 123456, channel index 2"):
        run(with_traces(recording, traces), tmp_path / "out2", CPU, verbose=False)


def test_multi_segment_recording_is_a_clear_error(tmp_path):
    recording, _ = generate_demo_recording(duration=3.0, num_units=2)
    two = sc.append_recordings([recording, recording])
    with pytest.raises(ValueError, match="concatenate_recordings"):
        run(two, tmp_path / "out", CPU, verbose=False)


def test_other_sampling_rate_scales_the_templates(tmp_path):
    recording, gt = generate_demo_recording(duration=30.0, num_units=8, seed=16, sampling_frequency=20000.0)
    ctx = run(recording, tmp_path / "out", CPU, verbose=False)
    assert (ctx.params.nt0, ctx.params.nt0min) == (41, 14)
    sorting = si_ks2py.run(recording, tmp_path / "out", verbose=False, **CPU)
    result = summary(score(gt, sorting))
    assert result["accuracy_0.8"] >= 0.8 * result["gt_units"], result


@pytest.mark.parametrize("gain, message", [(1000.0, "clipped"), (0.01, "vanished")])
def test_int16_with_a_wrong_gain_is_a_clear_error(tmp_path, gain, message):
    recording, _ = generate_demo_recording(duration=5.0, num_units=4)
    traces = np.clip(np.rint(recording.get_traces() * gain), -32768, 32767).astype(np.int16)
    with pytest.raises(ValueError, match=message):
        run(with_traces(recording, traces), tmp_path / "out", CPU, verbose=False)
    assert not (tmp_path / "out" / "cache" / "temp_wh.dat").exists()  # refused before any work


class OutOfMemoryError(Exception):
    """Stands in for cupy.cuda.memory.OutOfMemoryError (matched by name, as CuPy may be absent)."""


def test_gpu_out_of_memory_names_the_param_to_lower(tmp_path, monkeypatch):
    from si_ks2py.stages import learn

    def exhausted(ctx):
        raise OutOfMemoryError("Out of memory allocating 1,073,741,824 bytes")

    recording, _ = generate_demo_recording(duration=4.0, num_channels=16, num_units=3, seed=2)
    monkeypatch.setattr(learn, "run", exhausted)
    with pytest.raises(MemoryError, match=r"'learn' stage.*smaller NT, e.g. NT=\d+") as caught:
        run(recording, tmp_path / "out", CPU, verbose=False)
    assert isinstance(caught.value.__cause__, OutOfMemoryError)
    monkeypatch.undo()
    again = run(recording, tmp_path / "out", CPU, verbose=False)  # the stages before it were kept
    assert "preprocess" not in again.timings and "reorder" not in again.timings and "learn" in again.timings


@pytest.mark.gpu
def test_real_gpu_out_of_memory_is_re_raised_with_advice(tmp_path):
    import cupy

    recording, _ = generate_demo_recording(duration=4.0, num_channels=16, num_units=3, seed=2)
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    pool.set_limit(size=8 * 2 ** 20)  # 8 MiB: less than one batch
    try:
        with pytest.raises(MemoryError, match=r"smaller NT"):
            run(recording, tmp_path / "out", {"device": "cuda", "progress": False}, verbose=False)
    finally:
        pool.set_limit(size=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_detector_finds_more_spikes_per_batch_than_kilosorts_cap(device):
    """mexThSpkPC kept at most 10000 spikes per batch (MouseLand/Kilosort#394): no cap here. The spikes are
    large (projection norm 46): a float32 peak test lost every spike above 32."""
    from si_ks2py.backend import get_ops

    ops = get_ops(device)

    nt0, n_chan, spacing, period = 61, 384, 16, 70
    waveform = -np.exp(-0.5 * ((np.arange(nt0) - 20) / 3.0) ** 2)
    wPCA = (waveform / np.linalg.norm(waveform))[:, None].astype(np.float32)
    n = 40000
    data = np.zeros((n, n_chan), np.float32)
    starts = np.arange(100, n - 2 * nt0, period)
    channels = np.arange(0, n_chan, spacing)
    for t in starts:
        data[t:t + nt0, channels] += 20 * waveform[:, None]
    iC = np.clip(np.arange(n_chan)[:, None] + np.array([0, -1, 1, -2, 2, -3, 3, -4])[None], 0, n_chan - 1)
    times, chans, _ = (ops.to_host(a) for a in ops.pc_threshold_spikes(ops.asarray(data), ops.asarray(wPCA),
                                                                        ops.asarray(iC), threshold=5.0, nt0min=20))
    assert len(starts) * len(channels) > 10000
    assert len(times) == len(starts) * len(channels)
    np.testing.assert_array_equal(np.unique(chans), channels)


def test_batch_distances_in_blocks_of_batches_equal_all_at_once(monkeypatch):
    """Reordering's batch distances take the batches in blocks (GPU memory independent of the recording's
    length): the same distances as with all batches in one block."""
    from si_ks2py.stages import reorder

    rng = np.random.default_rng(9)
    n_batch, T, n_chan, n_near, n_pcs = 7, 5, 12, 4, 3
    iC = np.stack([(c + np.arange(n_near)) % n_chan for c in range(n_chan)])
    neighbours = np.zeros((n_chan, n_chan), dtype=bool)
    neighbours[np.arange(n_chan)[:, None], iC] = True
    Ws = rng.normal(size=(n_batch, T, n_near, n_pcs)).astype(np.float32)
    mus, ns = rng.uniform(5, 20, (n_batch, T)).astype(np.float32), rng.integers(1, 50, (n_batch, T)).astype(np.float32)
    Whs = rng.integers(0, n_chan, (n_batch, T))
    args = (np, Ws, mus, ns, Whs, iC, neighbours)
    monkeypatch.setattr(reorder, "DISTANCE_BLOCK_BYTES", 2 ** 40)
    whole = reorder.batch_distances(*args)
    monkeypatch.setattr(reorder, "DISTANCE_BLOCK_BYTES", 2 * 4 * T * n_chan * n_pcs)  # two batches per block
    np.testing.assert_allclose(reorder.batch_distances(*args), whole, rtol=1e-6)
    assert np.isfinite(whole).all() and (whole > 0).any()
