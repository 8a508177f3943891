"""The drift stage (Kilosort 2.5's datashift2) on the CPU, against recordings with a known motion.

- A 2-shank recording: shank 0 drifts rigidly (SpikeInterface's zigzag, +-15 um), shank 1 is the static
  recording of other units: shank 0's estimate is within 2 um (RMS, after the first 10 s, one offset removed: the
  reference is arbitrary) of the true displacement of its units, shank 1's stays near zero: shanks are
  registered independently.
- A taller probe with non-rigid drift (the displacement falls with depth): within 2 um at every unit's depth.
- Kriging a smooth field by a known shift against the field shifted analytically.
- A SpikeInterface Motion given as ``motion`` is what gets applied; the estimate is saved as Motion folders that
  Motion.load reads, with SpikeInterface's sign.
"""

import numpy as np
import pytest

from si_ks2py.pipeline import run
from si_ks2py.stages import drift

pytestmark = pytest.mark.slow


def drifting(seed: int, n_rows: int, gradient, duration: float = 60.0, units: int = 30):
    """(static, drifting recordings on a 2-column probe of 2 * n_rows sites, true displacement [times, units] um at
    5 Hz, unit depths [units] um)."""
    from probeinterface import generate_multi_columns_probe
    from spikeinterface.generation import generate_drifting_recording

    probe = generate_multi_columns_probe(num_columns=2, num_contact_per_column=n_rows, xpitch=32, ypitch=20,
                                         contact_shapes="square", contact_shape_params={"width": 12})
    probe.set_device_channel_indices(np.arange(2 * n_rows))
    static, moving, _, extra = generate_drifting_recording(
        num_units=units, duration=duration, probe=probe, seed=seed, extra_outputs=True,
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0, 15], drift_stop_um=[0, -15], drift_step_um=1,
            motion_list=[dict(drift_mode="zigzag", amplitude_factor=1.0, non_rigid_gradient=gradient,
                              t_start_drift=5.0, t_end_drift=None, period_s=30)]))
    return static, moving, extra["unit_displacements"][:, :, 1], extra["unit_locations"][:, 1]


def batch_truth(truth, params) -> np.ndarray:
    """The true displacement [Nbatch, units] at the middle of each batch."""
    stride = params.NT - params.ntbuff
    centres = (stride * np.arange(params.Nbatch) + stride / 2) / params.fs
    times = np.arange(len(truth)) / 5.0
    return np.stack([np.interp(centres, times, truth[:, u]) for u in range(truth.shape[1])], axis=1)


def rms_error(ctx, shank: int, truth, depths, skip_batches: int = 5) -> float:
    """RMS (um) of the estimate, in SpikeInterface's sign, minus the true displacement at the units' depths."""
    ir = ctx.intermediate
    dshift, yblk = np.asarray(ir.dshift), np.asarray(ir.yblk)
    estimate = -drift.interpolate_shifts(yblk[shank], dshift[:, shank].T, depths).T  # [Nbatch, units]
    error = (estimate - batch_truth(truth, ctx.params))[skip_batches:]
    return float(np.sqrt(((error - np.median(error)) ** 2).mean()))


@pytest.fixture(scope="module")
def two_shanks(tmp_path_factory):
    """Shank 0 (x 0-32 um) drifts rigidly, shank 1 (x 300-332 um) holds other, static units; sorted up to the drift
    stage, then exported."""
    from probeinterface import ProbeGroup
    from spikeinterface.core import aggregate_channels

    _, moving, truth, depths = drifting(seed=3, n_rows=32, gradient=None)
    still, _, _, _ = drifting(seed=4, n_rows=32, gradient=None)
    recording = aggregate_channels([moving.astype("int16"), still.astype("int16")])
    group = ProbeGroup()
    for index, part in enumerate((moving, still)):
        probe = part.get_probe().copy()
        probe.move([300.0 * index, 0])
        probe.set_device_channel_indices(np.arange(64) + 64 * index)
        group.add_probe(probe)
    recording.set_probegroup(group)
    folder = tmp_path_factory.mktemp("drift") / "out"
    ctx = run(recording, folder, {"device": "cpu", "progress": False}, verbose=False, stop_after="drift")
    return ctx, truth, depths, folder


def test_rigid_drift_is_estimated_within_2_um_and_shanks_apart(two_shanks):
    ctx, truth, depths, _ = two_shanks
    dshift = np.asarray(ctx.intermediate.dshift)
    assert dshift.shape == (ctx.params.Nbatch, 2, 2 * 5 - 1)
    assert np.sqrt((truth - truth.mean()) ** 2).mean() > 5  # there is drift to find
    assert rms_error(ctx, 0, truth, depths) < 2.0
    still = dshift[5:, 1] - np.median(dshift[5:, 1])
    assert np.sqrt((still ** 2).mean()) < 1.0  # the static shank is left (nearly) where it is
    # each channel's shift comes from its own shank
    shifts, kcoords = np.asarray(ctx.intermediate.channel_shifts), np.asarray(ctx.intermediate.kcoords)
    assert np.ptp(shifts[:, kcoords == 0]) > 10 and np.ptp(shifts[:, kcoords == 1]) < 3


def test_non_rigid_drift_is_estimated_within_2_um(tmp_path):
    _, moving, truth, depths = drifting(seed=5, n_rows=48, gradient=0.6, units=40)
    ctx = run(moving.astype("int16"), tmp_path / "out", {"device": "cpu", "progress": False}, verbose=False,
              stop_after="drift")
    true = batch_truth(truth, ctx.params)
    by_depth = np.argsort(depths)
    spread = true[:, by_depth[-5:]].std(axis=0).mean() / true[:, by_depth[:5]].std(axis=0).mean()
    assert spread < 0.7 or spread > 1 / 0.7  # the drift differs along the probe
    assert np.asarray(ctx.intermediate.yblk).shape[1] > 1
    assert rms_error(ctx, 0, truth, depths) < 2.0


@pytest.mark.parametrize("kind, tolerance", [("gaussian", 0.01), ("exponential", 0.08)])
def test_kriging_matches_the_shifted_field(kind, tolerance):
    xc, yc = np.tile([0.0, 32.0], 48), np.repeat(np.arange(48) * 20.0, 2)
    shank = np.zeros(96)
    field = np.cos(2 * np.pi * yc / 300.0)
    inner = (yc > 100) & (yc < 840)  # away from the ends, where the kernel's zero prior mean attenuates
    sites = drift.kriging_kernel(np, xc, yc, xc, yc, shank, shank, 20.0, kind)
    inverse = np.linalg.inv(sites + drift.KRIGING_RIDGE * np.eye(96))
    for shift in (3.0, 7.0, 15.0):
        moved = drift.kriging_kernel(np, xc, yc - shift, xc, yc, shank, shank, 20.0, kind) @ inverse
        expected = np.cos(2 * np.pi * (yc - shift) / 300.0)
        error = np.abs(moved @ field - expected)[inner].max()
        assert error < tolerance
        assert error < 0.5 * np.abs(field - expected)[inner].max() or shift < 5


def test_a_given_motion_is_applied_and_the_estimate_is_saved_as_motion(two_shanks, tmp_path):
    from spikeinterface.core.motion import Motion

    from si_ks2py.export.motion import save_motion

    ctx, _, _, _ = two_shanks
    p, ir = ctx.params, ctx.intermediate
    times = drift.batch_times_s(ctx.raw_data, p)
    save_motion(tmp_path / "motion", np.asarray(ir.dshift), np.asarray(ir.yblk), times)
    shank0 = Motion.load(tmp_path / "motion" / "shank0")
    assert np.allclose(shank0.displacement[0], -np.asarray(ir.dshift)[:, 0])
    assert np.allclose(shank0.temporal_bins_s[0], times)
    # a rigid motion of +10 um at every time: every channel is shifted by -10 um (Kilosort's sign)
    given = Motion(displacement=[np.full((3, 1), 10.0)], temporal_bins_s=[np.array([0.0, 30.0, 60.0])],
                   spatial_bins_um=np.array([300.0]))
    yc, kcoords = np.asarray(ir.yc, dtype=float), np.asarray(ir.kcoords)
    dshift, yblk = drift.shifts_from_motion(given, ctx.raw_data, np.unique(kcoords), p)
    shifts = drift.channel_shifts_from(dshift, yblk, yc, kcoords, np.unique(kcoords))
    np.testing.assert_allclose(shifts, -10.0)
    # and through the params: the cache fingerprint follows the motion's content
    from si_ks2py.pipeline import stage_fingerprints
    from si_ks2py.params import default_params

    base = default_params()
    with_motion = stage_fingerprints("rec", {**base, "motion": given})
    other = Motion(displacement=[np.full((3, 1), 12.0)], temporal_bins_s=[np.array([0.0, 30.0, 60.0])],
                   spatial_bins_um=np.array([300.0]))
    assert with_motion["drift"] != stage_fingerprints("rec", {**base, "motion": other})["drift"]
    given.save(tmp_path / "given")
    assert with_motion == stage_fingerprints("rec", {**base, "motion": str(tmp_path / "given")})


@pytest.mark.parametrize("nblocks", [1, 3])
def test_registration_recovers_rolled_histograms_and_fills_empty_batches(nblocks):
    """Histograms of one batch moved up by k bins register at -k bins (the data at y must move down: Kilosort's
    sign), in every block; an empty batch takes its neighbours' shift instead of Kilosort 2.5's -15 x 9 bins."""
    rng = np.random.default_rng(0)
    n_bins, n_batch = 200, 12
    base = rng.poisson(2.0, size=(n_bins, drift.AMPLITUDE_BINS)).astype(np.float32)
    base = np.log2(1 + base)
    moves = np.array([0, 1, 2, 3, 2, 1, 0, -1, -2, -3, -2, -1])
    F = np.stack([np.roll(base, k, axis=0) for k in moves])
    imin, yblk = drift.register(F, np.arange(n_bins) * 5.0, nblocks)
    assert imin.shape == (n_batch, 2 * nblocks - 1) and len(yblk) == 2 * nblocks - 1
    reference = imin - imin[6]  # batch 6 is unmoved; the register's reference is one of the batches
    np.testing.assert_allclose(reference, -moves[:, None] * np.ones((1, 2 * nblocks - 1)), atol=0.15)
    counts = np.full(n_batch, 500)
    counts[4] = 0
    shifts = drift.fill_sparse_batches(imin * drift.BIN_UM, counts)
    assert shifts[4, 0] == pytest.approx((shifts[3, 0] + shifts[5, 0]) / 2)


def test_the_file_path_corrects_as_the_in_memory_copy(tmp_path, monkeypatch):
    """A recording whose whitened data does not fit in memory is corrected file to file (written beside the
    uncorrected one, then put in its place): the same corrected data as the in-memory correction, and a rerun
    skips every stage."""
    from si_ks2py.stages import preprocess

    _, moving, _, _ = drifting(seed=8, n_rows=24, gradient=None, duration=20.0, units=12)
    recording = moving.astype("int16").save(folder=tmp_path / "rec", verbose=False)
    params = {"device": "cpu", "progress": False}
    in_memory = run(recording, tmp_path / "memory", params, verbose=False, stop_after="drift")
    monkeypatch.setattr(preprocess, "whitened_fits_in_memory", lambda n_bytes: False)
    on_disk = run(recording, tmp_path / "disk", params, verbose=False, stop_after="drift")
    assert on_disk.whitened is None and np.abs(np.asarray(on_disk.intermediate.channel_shifts)).max() > 1
    shape = (on_disk.params.n_samples, len(on_disk.intermediate.chanMap))
    files = [np.fromfile(ctx.intermediate.file_path("temp_wh.dat"), dtype=np.int16).reshape(shape)
             for ctx in (in_memory, on_disk)]
    np.testing.assert_array_equal(files[0], files[1])
    assert run(recording, tmp_path / "disk", params, verbose=False, stop_after="drift").timings == {}


def test_a_motion_folder_given_as_param_is_applied(two_shanks, tmp_path):
    """run(..., motion=<a saved Motion folder>): the drift stage applies it (every channel of both shanks moved
    by minus its displacement), whatever its own estimate; a folder that holds no Motion is refused by name."""
    from spikeinterface.core.motion import Motion

    ctx, _, _, _ = two_shanks
    Motion(displacement=[np.full((2, 1), -6.0)], temporal_bins_s=[np.array([0.0, 60.0])],
           spatial_bins_um=np.array([300.0])).save(tmp_path / "motion")
    given = run(ctx.raw_data, tmp_path / "out", {"device": "cpu", "progress": False,
                                                 "motion": str(tmp_path / "motion")},
                verbose=False, stop_after="drift")
    np.testing.assert_allclose(np.asarray(given.intermediate.channel_shifts), 6.0)
    with pytest.raises(ValueError, match="not the folder of a saved SpikeInterface Motion"):
        run(ctx.raw_data, tmp_path / "bad", {"device": "cpu", "progress": False, "motion": str(tmp_path)},
            verbose=False, stop_after="drift")
