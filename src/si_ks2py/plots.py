"""QC figures saved with the output (PNG): drift map, largest templates, batch similarity and its order.

The figures are drawn with matplotlib's object API (``Figure`` on an Agg canvas, no pyplot): it keeps no global
state, so the export draws them in a background thread while it writes the Phy files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPIKES_PER_CHUNK = 65536  # spike_depths works through the spikes in chunks that stay in the cache


def new_figure(figsize):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure, path):
    """120 dpi. zlib level 1 writes the same pixels as the default level 6 in about two thirds of the time, in a
    file about 10 % larger."""
    figure.savefig(path, dpi=120, pil_kwargs={"compress_level": 1})


def spike_depths(pc_features, pc_feature_ind, spike_templates, yc):
    """Depth of each spike: the channel depths weighted by its first-PC energy on its template's channels.

    pc_features [n, 3, n_near] (a memory map is fine), pc_feature_ind [K, n_near], spike_templates [n], yc [Nchan];
    returns [n] float64."""
    template_depths = yc[pc_feature_ind]  # [K, n_near]
    depths = np.empty(len(spike_templates))
    for start in range(0, len(spike_templates), SPIKES_PER_CHUNK):
        chunk = slice(start, start + SPIKES_PER_CHUNK)
        weights = pc_features[chunk, 0, :].astype(np.float64) ** 2
        depths[chunk] = ((weights * template_depths[spike_templates[chunk]]).sum(axis=1)
                         / np.maximum(weights.sum(axis=1), 1e-12))
    return depths


def drift_map(path, times_s, depths, amplitudes):
    """Summed spike amplitude per (time, depth) bin as an image: every spike counts, and drawing it costs the same
    for a million spikes as for a thousand (a scatter plot of them took seconds)."""
    fig = new_figure((10, 5))
    ax = fig.subplots()
    if len(times_s):
        span_t = max(float(times_s.max()), 1e-3)
        low, high = float(depths.min()), float(depths.max())
        depth_bins = max(1, min(400, int(np.ceil((high - low) / 5))))  # 5 um bins, at most 400
        image, t_edges, d_edges = np.histogram2d(times_s, depths, bins=(min(1000, max(1, int(span_t))), depth_bins),
                                                 range=((0, span_t), (low, max(high, low + 1e-3))),
                                                 weights=amplitudes)
        shown = ax.imshow(image.T, origin="lower", aspect="auto", cmap="Greys", interpolation="nearest",
                          extent=(t_edges[0], t_edges[-1], d_edges[0], d_edges[-1]),
                          vmax=max(np.percentile(image[image > 0], 99), 1e-12) if (image > 0).any() else None)
        fig.colorbar(shown, ax=ax, label="summed amplitude per bin (whitened units)")
    ax.set(xlabel="time (s)", ylabel="depth (um)", title="drift map")
    save_png(fig, path)


def largest_templates(path, templates, whitening_inv, counts, good, xc, yc, n_show=16):
    """Unwhitened templates of the units with most spikes, each drawn at its channel positions in a cell of a 4-column
    grid (one axes and one line collection per label: drawing 16 subplots took most of the figures' time)."""
    from matplotlib.collections import LineCollection

    shown = [k for k in np.argsort(-counts, kind="stable")[:n_show] if counts[k] > 0]
    cols = 4
    rows = max(1, int(np.ceil(len(shown) / cols)))
    fig = new_figure((3 * cols, 3 * rows))
    ax = fig.subplots()
    ax.axis("off")
    depths = np.unique(yc)
    spacing = np.diff(depths).min() if len(depths) > 1 else 20
    units = []  # (unit, its 12 largest channels, unwhitened template, scale)
    for k in shown:
        t = templates[k] @ whitening_inv  # [nt, Nchan]
        peak = np.abs(t).max(axis=0)
        near = np.argsort(-peak)[:12]
        units.append((k, near, t, 0.8 * min(spacing, 40) / max(peak.max(), 1e-12)))
    extent = max([np.ptp(xc[near]) for _, near, _, _ in units] + [0]) + 40, \
        max([np.ptp(yc[near]) for _, near, _, _ in units] + [0]) + 60  # um per cell
    lines = {True: [], False: []}
    time = np.linspace(-8, 8, templates.shape[1])
    for i, (k, near, t, scale) in enumerate(units):
        cell = np.array([(i % cols) * extent[0], -(i // cols) * extent[1]])
        origin = np.array([xc[near].mean(), yc[near].mean()])
        for c in near:
            lines[bool(good[k])].append(np.column_stack([xc[c] + time, yc[c] + t[:, c] * scale]) - origin + cell)
        ax.text(cell[0], cell[1] + extent[1] / 2 - 15, f"unit {k} ({counts[k]} spikes, {'good' if good[k] else 'mua'})",
                fontsize=8, ha="center")
    for is_good, segments in lines.items():
        ax.add_collection(LineCollection(segments, colors="C0" if is_good else "C3", linewidths=0.8))
    ax.autoscale()
    save_png(fig, path)


def batch_similarity(path, ccb, iorig):
    fig = new_figure((10, 4.5))
    axes = fig.subplots(1, 2)
    for ax, matrix, title in ((axes[0], ccb, "batch dissimilarity (time order)"),
                              (axes[1], ccb[np.ix_(iorig, iorig)], "in the learnt order (iorig)")):
        image = ax.imshow(matrix, cmap="magma_r", aspect="auto")
        ax.set(title=title, xlabel="batch", ylabel="batch")
        fig.colorbar(image, ax=ax)
    save_png(fig, path)


def qc_folder(folder) -> Path:
    qc = Path(folder) / "qc"
    qc.mkdir(exist_ok=True)
    return qc


def save_batch_figure(folder, ctx):
    """<folder>/qc/batch_similarity.png, from the cache alone (it can be drawn before the Phy files exist)."""
    ir = ctx.intermediate
    batch_similarity(qc_folder(folder) / "batch_similarity.png", np.asarray(ir.ccb, dtype=float), np.asarray(ir.iorig))


def save_phy_figures(folder, ctx):
    """<folder>/qc/drift_map.png and templates.png, from the Phy files in <folder> and the cache."""
    folder = Path(folder)
    qc = qc_folder(folder)
    ir = ctx.intermediate
    times = np.load(folder / "spike_times.npy").astype(np.float64) / ctx.params.fs
    templates_of_spikes = np.load(folder / "spike_templates.npy").astype(np.int64)
    amplitudes = np.load(folder / "amplitudes.npy")
    pc_features = np.load(folder / "pc_features.npy", mmap_mode="r")
    pc_ind = np.load(folder / "pc_feature_ind.npy").astype(np.int64)
    yc, xc = np.asarray(ir.yc, dtype=float), np.asarray(ir.xc, dtype=float)
    depths = spike_depths(pc_features, pc_ind, templates_of_spikes, yc)
    drift_map(qc / "drift_map.png", times, depths, amplitudes)
    templates = np.load(folder / "templates.npy")
    counts = np.bincount(templates_of_spikes, minlength=len(templates))
    largest_templates(qc / "templates.png", templates, np.load(folder / "whitening_mat_inv.npy"), counts,
                      np.asarray(ir.good), xc, yc)
