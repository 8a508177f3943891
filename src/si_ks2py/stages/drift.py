"""Drift correction (Kilosort 2.5's datashift2.m, standalone_detector.m, align_block2.m, shift_batch_on_disk2.m).

1. Spikes of every batch are detected on the whitened data with generic templates: six temporal prototypes
   (the waveforms of learning, extractTemplatesfromSnippets.m) times Gaussian spatial footprints of five sizes
   centred on a grid of points along each shank; a spike is a local maximum over time and neighbouring grid points
   of the matched-filter amplitude above ``drift_detect_threshold``. Its depth is the centre of mass of the
   prototype's positive responses on the 10 channels nearest its grid point.
2. Per shank and batch, a histogram of the spikes over depth (5 um bins) and log amplitude (20 bins), log2(1 + n).
3. Registration per shank: a rigid integer alignment of the histograms (lags of +-15 bins, 9 iterations, each
   against the mean of the aligned ones, starting from batch min(300, Nbatch/2)), then for each of 2 nblocks - 1
   overlapping vertical blocks the correlation at lags +-5 bins, smoothed (sigma 0.5 over lag, batch and block)
   and upsampled tenfold by a Gaussian kernel for a sub-bin shift. ``dshift`` (um) is positive where the data
   must move up: the corrected batch at depth y is the recorded one at y - dshift(y).
4. Each channel's shift is the makima interpolation of its shank's block shifts at its depth (extrapolated), and
   every batch's own samples are replaced by the kriging interpolation of the data at the shifted positions,
   ``M = K(shifted, sites) (K(sites, sites) + 0.01 I)^-1`` with Kilosort 4's Gaussian kernel ``exp(-d^2 / (2 sig^2))``
   by default (``drift_kernel``; Kilosort 2.5's ``exp(-|dx|/sig - |dy|/(1.5 sig))`` on request), cross-faded over
   the first ntbuff samples from the previous batch's matrix. The whitened data (in memory and
   ``temp_wh.dat``) is corrected in place, so every later stage and the Phy folder see corrected data.

With ``motion`` (a SpikeInterface Motion) the shifts come from it instead of the estimate (detection still runs:
its spikes draw the QC figure). Differences from Kilosort 2.5, each for a reason given in docs/stages.md: each
shank is registered on its own (kcoords); the depth histogram spans the shank's sites, not the deepest spike;
batches with almost no spikes take the shift interpolated from their neighbours in time (Kilosort 2.5 shifted
an empty batch by -675 um); spikes are not capped at 10000 a batch and come in (time, grid point) order.

Inputs: ``chanMap``, ``xc``, ``yc``, ``kcoords`` and the whitened data of preprocessing. Outputs: ``dshift``
[Nbatch, n_shanks, nblk] float64 (um), ``yblk`` [n_shanks, nblk] float64 (block centres, um), ``channel_shifts``
[Nbatch, Nchan] float64 (um, each channel's shift), ``st0`` [n_spikes, 4] float64 (sample, depth um before
correction, amplitude, shank index) and the corrected file ``temp_wh.dat``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from ..context import Bunch, fingerprint
from ..io import (WhitenedData, batch_margin, batch_prefetch, is_pinned, noise_units, open_whitened, owned_spikes,
                  write_rows)
from ..progress import progress_bar
from .learn import extract_templates_from_snippets

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("dshift", "yblk", "channel_shifts", "st0")
FILES = ("temp_wh.dat",)
FILE_INPUTS = ("temp_wh.dat",)

# generic templates of the detector (standalone_detector.m)
FOOTPRINT_SIZES_UM = 10.0 * np.arange(1, 6)  # Gaussian footprints exp(-d^2 / size^2)
NEAR_CHANNELS = 10  # channels a footprint spans
NEAR_GRID_POINTS = 100  # grid points a spike must exceed ...
GRID_NEIGHBOUR_UM = 100.0  # ... within this distance
GRID_SITE_UM = 30.0  # grid points farther than this from every site are dropped
GRID_COLUMN_UM = 16.0  # horizontal spacing of the grid, about
# registration (align_block2.m)
BIN_UM = 5.0
AMPLITUDE_BINS = 20
AMPLITUDE_MAX = 100.0
RIGID_LAGS = 15  # at most a quarter of the histogram (the rolls wrap around)
RIGID_ITERATIONS = 9
FIRST_TARGET = 300  # 1-based batch of the first rigid target, or the middle batch
BLOCK_LAGS = 5
MIN_BLOCK_BINS = 40  # nblocks is lowered to keep blocks of 200 um at least
MIN_SHANK_BINS = 20  # a shank spanning less than 100 um is not registered
SMOOTHING_SIGMA = 0.5
UPSAMPLING = 10
# batches with fewer spikes than this fraction of the median take their neighbours' shift
SPARSE_BATCH_FRACTION = 0.05
KRIGING_RIDGE = 0.01


# --- the detector's grid ------------------------------------------------------------------------------------
def colon(start: float, stop: float, step: float) -> np.ndarray:
    """MATLAB's start:step:stop (stop included when hit, within rounding)."""
    return start + step * np.arange(int(math.floor((stop - start) / step + 1e-9)) + 1)


def detector_grid(xc: np.ndarray, yc: np.ndarray, kcoords: np.ndarray) -> Bunch:
    """The generic templates' centres on each shank and their neighbourhoods.

    xc, yc [Nchan] float (um), kcoords [Nchan] int. Grid points run every pitch/2 in depth and about every 16 um
    across each shank's sites, kept within 30 um of a site. Returns x, y [G] float64, shank [G] int64 (index into
    ``shanks``), iC [G, J] int64 (the J = min(10, sites on the shank) nearest channels), weights [G, J, 5] float32
    (each footprint of unit norm over those channels), neighbours [G, K] int64 (the grid point itself first, then
    the grid points of its shank within 100 um, up to 100; padded with itself), shanks [n_shanks] (kcoords values).
    """
    shanks = np.unique(kcoords)
    n_near = min(NEAR_CHANNELS, min(int((kcoords == s).sum()) for s in shanks))
    parts = []
    for index, shank in enumerate(shanks):
        channels = np.flatnonzero(kcoords == shank)
        x, y = xc[channels], yc[channels]
        depths = np.unique(y)
        pitch = float(np.median(np.diff(depths))) if len(depths) > 1 else 2 * GRID_SITE_UM
        columns = int(math.floor((x.max() - x.min()) / GRID_COLUMN_UM))
        xup = np.linspace(x.min(), x.max(), columns + 1) if columns else np.array([x.max()])
        yup = colon(depths[0], depths[-1], pitch / 2)
        gy, gx = (a.ravel() for a in np.meshgrid(yup, xup, indexing="ij"))  # x varies fastest
        distance = np.hypot(gx[:, None] - x[None, :], gy[:, None] - y[None, :])  # [G, sites]
        kept = distance.min(axis=1) < GRID_SITE_UM
        gx, gy, distance = gx[kept], gy[kept], distance[kept]
        order = np.argsort(distance, axis=1, kind="stable")[:, :n_near]
        parts.append((gx, gy, np.full(len(gx), index), channels[order], np.take_along_axis(distance, order, 1)))
    gx, gy, shank, iC, dist = (np.concatenate(a) for a in zip(*parts))
    weights = np.exp(-(dist[:, :, None] / FOOTPRINT_SIZES_UM) ** 2)
    weights /= np.sqrt((weights ** 2).sum(axis=1, keepdims=True))
    apart = np.hypot(gx[:, None] - gx[None, :], gy[:, None] - gy[None, :]) + 1e9 * (shank[:, None] != shank[None, :])
    np.fill_diagonal(apart, -1)  # itself first
    n_grid_near = min(NEAR_GRID_POINTS, len(gx))
    neighbours = np.argsort(apart, axis=1, kind="stable")[:, :n_grid_near]
    far = np.take_along_axis(apart, neighbours, 1) >= GRID_NEIGHBOUR_UM
    neighbours = np.where(far, np.arange(len(gx))[:, None], neighbours)
    return Bunch(x=gx, y=gy, shank=shank.astype(np.int64), iC=iC.astype(np.int64),
                 weights=weights.astype(np.float32), neighbours=neighbours.astype(np.int64), shanks=shanks)


# --- detection ------------------------------------------------------------------------------------------------
def batch_spikes(ops, S, wTEMP, grid, yc, params) -> tuple:
    """standalone_detector.m on one batch: S [n, Nchan] float32 whitened data (unit noise) on the device; wTEMP
    [nt0, R] float32 prototypes; grid (detector_grid, its arrays on the device); yc [Nchan] on the device.
    Returns device arrays (trough rows [N] int64, depths [N] float32 um, amplitudes [N] float32, grid points [N])
    in (time, grid point) order."""
    xp = ops.xp
    filtered = ops.correlate_valid(S, wTEMP)  # [n, Nchan, R]
    amplitude = ops.grid_amplitudes(filtered, grid.iC, grid.weights, params.drift_spkTh)  # [n, G]
    t, g = ops.local_peaks(amplitude, grid.neighbours, params.drift_spkTh, params.nt0, params.nt0min)
    near = grid.iC[g]  # [N, J]
    responses = filtered[t[:, None], near]  # [N, J, R]
    R, n_sizes = filtered.shape[2], grid.weights.shape[2]
    scores = xp.einsum("njr,njs->nrs", responses, grid.weights[g]).reshape(len(t), R * n_sizes)
    best = xp.argmax(scores, axis=1) // n_sizes  # the prototype of the best (prototype, size), prototype first
    weight = xp.maximum(responses[xp.arange(len(t)), :, best], 0)  # [N, J]
    total = weight.sum(axis=1)
    depth = xp.where(total > 0, (weight * yc[near]).sum(axis=1) / xp.where(total > 0, total, 1), grid.y[g])
    return t + params.nt0min - 1, depth.astype(xp.float32), amplitude[t, g], g


def detect_spikes(ctx, data: WhitenedData, wTEMP: np.ndarray, grid: Bunch) -> np.ndarray:
    """st0 [n_spikes, 4] float64 (sample in the sorted range, depth um, amplitude, shank index) of every batch."""
    ops, p, ir = ctx.ops, ctx.params, ctx.intermediate
    xp = ops.xp
    on_device = Bunch({name: ops.asarray(grid[name]) for name in ("iC", "weights", "neighbours", "y", "shank")})
    yc = ops.asarray(np.asarray(ir.yc, dtype=np.float32))
    wTEMP_d = ops.asarray(wTEMP)
    stride, start = p.NT - p.ntbuff, batch_margin(p)  # batch k is read from stride k - margin
    parts = []
    bar = progress_bar(total=p.Nbatch, desc="drift", unit="batch", enabled=ctx.show_progress)
    for k, raw in batch_prefetch(ctx, data, range(p.Nbatch)):
        rows, depth, amplitude, g = batch_spikes(ops, noise_units(ctx, raw), wTEMP_d, on_device, yc, p)
        own = owned_spikes(rows, p, k)
        sample = (rows[own] + (stride * k - start)).astype(xp.float64)
        parts.append(xp.stack([sample, depth[own].astype(xp.float64), amplitude[own].astype(xp.float64),
                               on_device.shank[g[own]].astype(xp.float64)], axis=1))
        bar.update()
    bar.close()
    return ops.to_host(xp.concatenate(parts)) if parts else np.zeros((0, 4))


# --- registration ---------------------------------------------------------------------------------------------
def batch_of(samples: np.ndarray, stride: int, n_batch: int) -> np.ndarray:
    """[n] int64: the batch whose own samples hold each sample (of the sorted range)."""
    return np.minimum(samples // stride, n_batch - 1).astype(np.int64)


def depth_histograms(st0: np.ndarray, n_batch: int, stride: int, y_low: float, y_high: float,
                     threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """One shank's fingerprints: (F [Nbatch, n_bins, 20] float32, log2(1 + spike count) per depth and
    log-amplitude bin; ysamp [n_bins] bin centres, um). st0 as detect_spikes' (this shank's spikes); the depth
    bins run from y_low - 1 to y_high (the shank's sites) in 5 um."""
    d0 = y_low - 1
    n_bins = 1 + int(math.ceil((y_high - d0) / BIN_UM))
    batch = batch_of(st0[:, 0], stride, n_batch)
    depth_bin = np.clip(np.ceil((st0[:, 1] - d0) / BIN_UM).astype(np.int64) - 1, 0, n_bins - 1)
    amplitude = np.minimum(AMPLITUDE_MAX - 1, np.floor(st0[:, 2]))
    amplitude_bin = np.ceil(1e-5 + AMPLITUDE_BINS * (np.log10(amplitude) - np.log10(threshold))
                            / (np.log10(AMPLITUDE_MAX) - np.log10(threshold))).astype(np.int64) - 1
    amplitude_bin = np.clip(amplitude_bin, 0, AMPLITUDE_BINS - 1)
    counts = np.bincount((batch * n_bins + depth_bin) * AMPLITUDE_BINS + amplitude_bin,
                         minlength=n_batch * n_bins * AMPLITUDE_BINS)
    F = np.log2(1 + counts.reshape(n_batch, n_bins, AMPLITUDE_BINS)).astype(np.float32)
    return F, d0 + BIN_UM * np.arange(1, n_bins + 1) - BIN_UM / 2


def lag_correlations(Fg: np.ndarray, target: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """c[b, i] = mean(roll(Fg[b], lags[i], axis=depth) * target): Fg [N, n_bins, A], target [n_bins, A] float32."""
    rolled = np.stack([np.roll(target, -lag, axis=0) for lag in lags])  # roll(F, d) . T = F . roll(T, -d)
    return np.einsum("nya,lya->nl", Fg, rolled, optimize=True) / np.float32(target.size)


def gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """my_conv2.m: Gaussian smoothing along every axis (of length > 1), zero-padded and divided by the smoothing
    of ones, so that the edges are not pulled toward zero."""
    from scipy import ndimage

    radius = int(math.ceil(4 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    for axis in range(x.ndim):
        if x.shape[axis] > 1:
            x = (ndimage.correlate1d(x, taps, axis=axis, mode="constant")
                 / ndimage.correlate1d(np.ones_like(x), taps, axis=axis, mode="constant"))
    return x


def block_edges(n_bins: int, nblocks: int) -> list[tuple[int, int]]:
    """The 2 nblocks - 1 overlapping blocks of depth bins, [first, last) 0-based (MATLAB's round half up)."""
    span = n_bins // nblocks - 1
    firsts = np.floor(np.linspace(1, n_bins - span, 2 * nblocks - 1) + 0.5).astype(int) - 1
    return [(int(f), int(f) + span + 1) for f in firsts]


def register(F: np.ndarray, ysamp: np.ndarray, nblocks: int) -> tuple[np.ndarray, np.ndarray]:
    """align_block2.m: (imin [Nbatch, nblk] float64, the shift of each batch and block in bins; yblk [nblk] the
    blocks' centres, um) from the fingerprints F [Nbatch, n_bins, A] float32 of one shank."""
    n_batch, n_bins = F.shape[:2]
    Fg = F - F.mean(axis=1, keepdims=True)
    target = Fg[min(FIRST_TARGET, n_batch // 2) - 1].copy()
    rigid_lags = min(RIGID_LAGS, n_bins // 4)
    lags = np.arange(-rigid_lags, rigid_lags + 1)
    total = np.zeros(n_batch)
    for _ in range(RIGID_ITERATIONS):
        best = lags[np.argmax(lag_correlations(Fg, target, lags), axis=1)]
        Fg = np.stack([np.roll(f, int(d), axis=0) for f, d in zip(Fg, best)])
        total += best
        target = Fg.mean(axis=0)
    edges = block_edges(F.shape[1], nblocks)
    lags = np.arange(-BLOCK_LAGS, BLOCK_LAGS + 1)
    dcs = np.stack([lag_correlations(Fg[:, a:b], target[a:b], lags) for a, b in edges], axis=2)  # [N, lags, blk]
    dcs = gaussian_smooth(dcs.astype(np.float64), SMOOTHING_SIGMA)  # over lag, batch and block
    fine = np.linspace(-BLOCK_LAGS, BLOCK_LAGS, 2 * BLOCK_LAGS * UPSAMPLING + 1)
    kernel = np.exp(-(lags[:, None] - fine[None, :]) ** 2 / 2)  # [lags, fine]
    upsampled = np.einsum("nlj,lu->nuj", dcs, kernel)
    imin = total[:, None] + fine[np.argmax(upsampled, axis=1)]
    return imin, block_centres(ysamp, nblocks)


def fill_sparse_batches(dshift: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """dshift [Nbatch, nblk] with the batches holding under SPARSE_BATCH_FRACTION of the median spike count given
    the shift interpolated in time from the others (their histograms say nothing of the drift)."""
    if not (counts > 0).any():
        return np.zeros_like(dshift)
    sparse = counts < SPARSE_BATCH_FRACTION * np.median(counts[counts > 0])
    if sparse.any() and not sparse.all():
        batches, good = np.arange(len(counts)), np.flatnonzero(~sparse)
        for j in range(dshift.shape[1]):
            dshift[sparse, j] = np.interp(batches[sparse], good, dshift[good, j])
    return dshift


def estimate_drift(st0: np.ndarray, yc, kcoords, grid: Bunch, params) -> tuple[np.ndarray, np.ndarray]:
    """(dshift [Nbatch, n_shanks, nblk] um, yblk [n_shanks, nblk] um) of every shank, registered on its own."""
    stride = params.NT - params.ntbuff
    n_blk = 2 * params.nblocks - 1
    dshift = np.zeros((params.Nbatch, len(grid.shanks), n_blk))
    yblk = np.zeros((len(grid.shanks), n_blk))
    for index, shank in enumerate(grid.shanks):
        sites = yc[kcoords == shank]
        mine = st0[st0[:, 3] == index]
        F, ysamp = depth_histograms(mine, params.Nbatch, stride, sites.min(), sites.max(), params.drift_spkTh)
        nblocks = max(1, min(params.nblocks, len(ysamp) // MIN_BLOCK_BINS))
        if nblocks < params.nblocks:
            logger.info("drift: shank %s spans %d um, too little for nblocks=%d: %d block(s) of %d um", shank,
                        int(np.ptp(sites)), params.nblocks, nblocks, int(BIN_UM * len(ysamp) / nblocks))
        if len(ysamp) < MIN_SHANK_BINS:
            logger.warning("drift: shank %s spans %d um, too little to estimate its drift: not corrected", shank,
                           int(np.ptp(sites)))
        if params.Nbatch < 2 or len(ysamp) < MIN_SHANK_BINS:
            imin, centres = np.zeros((params.Nbatch, 2 * nblocks - 1)), block_centres(ysamp, nblocks)
        else:
            imin, centres = register(F, ysamp, nblocks)
        counts = np.bincount(batch_of(mine[:, 0], stride, params.Nbatch), minlength=params.Nbatch)
        shifts = fill_sparse_batches(imin * BIN_UM, counts)
        # a shank with fewer blocks is resampled onto nblk block centres, so that every shank has the same shape
        span = (centres[0], centres[-1]) if len(centres) > 1 else (ysamp[0], ysamp[-1])
        yblk[index] = np.linspace(*span, n_blk)
        dshift[:, index] = interpolate_shifts(centres, shifts.T, yblk[index]).T
    return dshift, yblk


def block_centres(ysamp: np.ndarray, nblocks: int) -> np.ndarray:
    """yblk [nblk]: the mean depth of each block's bins."""
    return np.array([ysamp[a:b].mean() for a, b in block_edges(len(ysamp), nblocks)])


def interpolate_shifts(yblk: np.ndarray, shifts: np.ndarray, depths: np.ndarray) -> np.ndarray:
    """The shift (um) at ``depths`` from the blocks' shifts (makima, extrapolated; constant for one block).

    yblk [nblk]; shifts [nblk] or [nblk, m] (m sets of shifts); returns [len(depths)] or [len(depths), m]."""
    if len(yblk) == 1:
        return np.broadcast_to(shifts[:1], (len(depths),) + shifts.shape[1:]).copy()
    from scipy.interpolate import Akima1DInterpolator

    return Akima1DInterpolator(yblk, shifts, method="makima", extrapolate=True)(depths)


def channel_shifts_from(dshift: np.ndarray, yblk: np.ndarray, yc, kcoords, shanks) -> np.ndarray:
    """[Nbatch, Nchan] float64 um: each channel's shift, from its shank's blocks."""
    out = np.zeros((len(dshift), len(yc)))
    for index, shank in enumerate(shanks):
        channels = np.flatnonzero(kcoords == shank)
        out[:, channels] = interpolate_shifts(yblk[index], dshift[:, index].T, yc[channels]).T
    return out


# --- a motion given by the user -------------------------------------------------------------------------------
def load_motion(motion):
    """A SpikeInterface Motion, from itself or from the folder it was saved to."""
    if type(motion).__name__ == "Motion":
        return motion
    from spikeinterface.core.motion import Motion

    folder = Path(motion)
    if not (folder / "spatial_bins_um.npy").exists():
        raise ValueError(f"ks2py param 'motion': {folder} is not the folder of a saved SpikeInterface Motion "
                         "(Motion.save(folder) writes spatial_bins_um.npy and the displacement there)")
    return Motion.load(folder)


def motion_identity(motion) -> str:
    """A fingerprint of a Motion's content (for the cache)."""
    m = load_motion(motion)
    parts = [m.direction, np.asarray(m.spatial_bins_um).tolist()]
    for displacement, times in zip(m.displacement, m.temporal_bins_s):
        parts += [np.asarray(times).tolist(), np.asarray(displacement).round(6).tolist()]
    return fingerprint(parts)


def batch_times_s(recording, params) -> np.ndarray:
    """[Nbatch] the recording's time (s) at the middle of each batch's own samples."""
    stride = params.NT - params.ntbuff
    middle = np.minimum(params.t_start + stride * np.arange(params.Nbatch) + stride // 2, params.t_stop - 1)
    return np.asarray(recording.sample_index_to_time(middle, segment_index=0), dtype=np.float64)


def shifts_from_motion(motion, recording, shanks, params) -> tuple[np.ndarray, np.ndarray]:
    """(dshift [Nbatch, n_shanks, nblk], yblk [n_shanks, nblk]) sampled from a SpikeInterface Motion at each
    batch's middle and at its spatial bins (its displacement is minus ks2py's shift)."""
    m = load_motion(motion)
    if m.direction != "y" or m.num_segments != 1:
        raise ValueError("ks2py param 'motion' must be a one-segment Motion along y (depth)")
    bins = np.asarray(m.spatial_bins_um, dtype=np.float64)
    times = batch_times_s(recording, params)
    dshift = -np.asarray(m.get_displacement_at_time_and_depth(times, bins, grid=True)).T  # [Nbatch, nblk]
    return np.repeat(dshift[:, None], len(shanks), axis=1), np.repeat(bins[None], len(shanks), axis=0)


# --- the correction --------------------------------------------------------------------------------------------
def kriging_kernel(xp, x_to, y_to, x_from, y_from, shank_to, shank_from, sig: float, kind: str = "gaussian"):
    """[len(to), len(from)], 0 between shanks: 'gaussian' exp(-d^2 / (2 sig^2)) (Kilosort 4) or 'exponential'
    exp(-|dx|/sig - |dy|/(1.5 sig)) (kernel2D.m of Kilosort 2.5)."""
    dx, dy = x_to[:, None] - x_from[None, :], y_to[:, None] - y_from[None, :]
    if kind == "gaussian":
        k = xp.exp(-(dx * dx + dy * dy) / (2 * sig * sig))
    else:
        k = xp.exp(-xp.abs(dx) / sig - xp.abs(dy) / (1.5 * sig))
    return k * (shank_to[:, None] == shank_from[None, :])


def shift_data(ctx, data: WhitenedData, shifts: np.ndarray, store):
    """shift_batch_on_disk2.m: each batch's own samples [stride k, stride (k + 1)) of ``data`` interpolated at the
    positions shifted by shifts[k] [Nchan] um, as int16, passed to ``store(rows int16 [n, Nchan] on the device,
    first_row)`` in batch order. The first ntbuff rows of a batch are cross-faded from the previous batch's
    interpolation to its own."""
    ops, p, ir = ctx.ops, ctx.params, ctx.intermediate
    xp = ops.xp
    xc, yc, kcoords = (ops.asarray(np.asarray(getattr(ir, k), dtype=np.float64)) for k in ("xc", "yc", "kcoords"))
    sites = kriging_kernel(xp, xc, yc, xc, yc, kcoords, kcoords, p.sig, p.drift_kernel)
    inverse = xp.linalg.inv(sites + KRIGING_RIDGE * xp.eye(len(xc)))  # symmetric
    shifts_d = ops.asarray(shifts)
    fade = xp.linspace(0, 1, p.ntbuff, dtype=xp.float32)[:, None]
    stride = p.NT - p.ntbuff
    previous = None
    bar = progress_bar(total=p.Nbatch, desc="shift", unit="batch", enabled=ctx.show_progress)
    for k in range(p.Nbatch):
        first, last = stride * k, min(stride * (k + 1), p.n_samples)
        x = ops.asarray(data.read(ops, first, last)).astype(xp.float32)
        moved = kriging_kernel(xp, xc, yc - shifts_d[k], xc, yc, kcoords, kcoords, p.sig, p.drift_kernel)
        matrix = (moved @ inverse).astype(xp.float32).T  # [Nchan in, Nchan out]
        y = x @ matrix
        if previous is not None:
            n = min(p.ntbuff, len(x))
            y[:n] = fade[:n] * y[:n] + (1 - fade[:n]) * (x[:n] @ previous)
        store(xp.clip(xp.rint(y), -32768, 32767).astype(xp.int16), first)
        previous = matrix
        bar.update()
    bar.close()


def correct_in_memory(ctx, shifts: np.ndarray):
    """Correct the in-memory whitened copy in place (its batches are read before they are written), then write
    the file from it in the background."""
    ops, whitened = ctx.ops, ctx.whitened
    data = WhitenedData(whitened, ctx.params.n_samples, whitened.shape[1], ctx.params.scaleproc)

    def store(rows, first):
        if is_pinned(ctx.get("whitened_pinning")):
            ops.copy_to_host(rows, whitened[first:first + len(rows)])
        else:
            whitened[first:first + len(rows)] = ops.to_host(rows)

    shift_data(ctx, data, shifts, store)
    ops.synchronize()
    ctx.intermediate.write_file_in_background("temp_wh.dat", lambda f: write_rows(f, whitened))


def correct_file(ctx, shifts: np.ndarray):
    """Write the corrected whitened file beside the uncorrected one, then put it in its place."""
    ir = ctx.intermediate
    data = open_whitened(ctx)  # the path, taken before the rewrite makes the cached entry invalid
    with ir.write_file("temp_wh.dat") as tmp, open(tmp, "wb") as f:
        shift_data(ctx, data, shifts, lambda rows, first: f.write(memoryview(np.ascontiguousarray(
            ctx.ops.to_host(rows)))))


def run(ctx):
    p, ir = ctx.params, ctx.intermediate
    xc, yc = np.asarray(ir.xc, dtype=np.float64), np.asarray(ir.yc, dtype=np.float64)
    kcoords = np.asarray(ir.kcoords, dtype=np.int64)
    grid = detector_grid(xc, yc, kcoords)
    data = open_whitened(ctx)
    wTEMP, _ = extract_templates_from_snippets(ctx, data, np.random.default_rng(p.seed))
    st0 = detect_spikes(ctx, data, wTEMP, grid)
    logger.info("drift: %d spikes detected on %d grid points of %d shank(s)", len(st0), len(grid.x), len(grid.shanks))
    motion = ctx.user_params["motion"]
    if motion is not None:
        dshift, yblk = shifts_from_motion(motion, ctx.raw_data, grid.shanks, p)
    else:
        dshift, yblk = estimate_drift(st0, yc, kcoords, grid, p)
    shifts = channel_shifts_from(dshift, yblk, yc, kcoords, grid.shanks)
    logger.info("drift: shifts from %.1f to %.1f um (median over channels, batches)",
                *np.percentile(np.median(shifts, axis=1), [0, 100]))
    # nothing to correct: the data stay as they are (kriging at zero shift smooths a little); preprocessing wrote
    # the file unless it left it to this stage's in-memory correction
    if shifts.any() and ctx.whitened is not None:
        correct_in_memory(ctx, shifts)
    elif shifts.any():
        correct_file(ctx, shifts)
    elif ctx.whitened is not None:
        ir.write_file_in_background("temp_wh.dat", lambda f: write_rows(f, ctx.whitened))
    ir.dshift, ir.yblk, ir.channel_shifts, ir.st0 = dshift, yblk, shifts, st0
