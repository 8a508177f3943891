"""QC figures saved with the output (PNG): drift map, largest templates, batch similarity and its order.

The figures are drawn with matplotlib's object API (``Figure`` on an Agg canvas, no pyplot) by a separate Python
process (``FigureProcess``, this file run as a script): matplotlib is pure Python, and drawing in a thread of the
sort would hold the interpreter lock that the sort's own threads need. The process is started with the sort, so
that its imports are done by the export, and draws each figure as soon as its arrays are known: the batch figure
after the reorder stage, the others at the start of the export, while the Phy files are written. This
module imports only NumPy (and matplotlib in the drawing process), so that the process starts quickly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
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


def spike_depths(pc_features, rows, pc_feature_ind, spike_templates, yc):
    """Depth of each spike: the channel depths weighted by its first-PC energy on its template's channels.

    pc_features [N, 3, n_near] (a memory map is fine), rows [n] int64 the spikes' rows in it, pc_feature_ind
    [K, n_near], spike_templates [n], yc [Nchan]; returns [n] float64."""
    template_depths = yc[pc_feature_ind]  # [K, n_near]
    depths = np.empty(len(spike_templates))
    for start in range(0, len(spike_templates), SPIKES_PER_CHUNK):
        chunk = slice(start, start + SPIKES_PER_CHUNK)
        weights = pc_features[rows[chunk], 0, :].astype(np.float64) ** 2
        depths[chunk] = ((weights * template_depths[spike_templates[chunk]]).sum(axis=1)
                         / np.maximum(weights.sum(axis=1), 1e-12))
    return depths


def drift_map(path, times_s, depths, amplitudes):
    """Kilosort's drift map of the sorted spikes: each spike a point at its time and depth, darker the larger (black
    from the 95th percentile of the amplitudes up; drift_points)."""
    fig = new_figure((10, 5))
    ax = fig.subplots()
    if len(times_s):
        extent = (0.0, max(float(times_s.max()), 1e-3), float(depths.min()), max(float(depths.max()),
                                                                                float(depths.min()) + 1e-3))
        drift_points(ax, times_s, depths, amplitudes, 0.0, extent, max(float(np.percentile(amplitudes, 95)), 1e-12))
    ax.set(xlabel="time (s)", ylabel="depth (um)", title="drift map (sorted spikes, darker: larger)")
    save_png(fig, path)


def drift_points(ax, times_s, depths, amplitudes, threshold, extent, scale: float = 40.0):
    """Kilosort's drift map in one panel: each spike a dark point at its time and depth, darker the larger (grey
    level 1 - (amplitude - threshold) / scale), the darkest drawn over the others. Drawn as an image of 800 x 600
    points, so that an hour of spikes costs what a minute does. extent: (t0, t1, d0, d1)."""
    width, height = 800, 600
    image = np.ones((height, width))
    if len(times_s):
        t0, t1, d0, d1 = extent
        col = np.clip(((times_s - t0) / max(t1 - t0, 1e-9) * (width - 1)).astype(np.int64), 0, width - 1)
        row = np.clip(((depths - d0) / max(d1 - d0, 1e-9) * (height - 1)).astype(np.int64), 0, height - 1)
        grey = np.clip(1 - (amplitudes - threshold) / scale, 0, 0.9)
        order = np.argsort(-grey, kind="stable")  # the last write of a pixel wins: the darkest
        image[row[order], col[order]] = grey[order]
    ax.imshow(image, origin="lower", aspect="auto", cmap="gray", vmin=0, vmax=1, interpolation="nearest",
              extent=extent)


def drift_correction(path, times_s, depths, corrected, amplitudes, shanks, batch_times_s, dshift, yblk, threshold):
    """The drift detector's spikes before and after the correction (one row of two panels per shank), with the
    estimated position of each block's reference depth (yblk - dshift) drawn over the recorded data."""
    n_shanks = len(yblk)
    fig = new_figure((12, 1.5 + 4 * n_shanks))
    axes = fig.subplots(n_shanks, 2, sharex=True, sharey="row", squeeze=False)
    for index in range(n_shanks):
        mine = shanks == index
        before, after = axes[index]
        low = min(depths[mine].min(initial=np.inf), corrected[mine].min(initial=np.inf))
        high = max(depths[mine].max(initial=-np.inf), corrected[mine].max(initial=-np.inf))
        extent = (0.0, float(max(times_s.max(initial=0), batch_times_s.max(initial=0))),
                  float(low if np.isfinite(low) else 0), float(high if np.isfinite(high) else 1))
        drift_points(before, times_s[mine], depths[mine], amplitudes[mine], threshold, extent)
        drift_points(after, times_s[mine], corrected[mine], amplitudes[mine], threshold, extent)
        for j in range(yblk.shape[1]):
            before.plot(batch_times_s, yblk[index, j] - dshift[:, index, j], color="C3", linewidth=1)
            after.axhline(yblk[index, j], color="C3", linewidth=0.5, alpha=0.5)
        label = f" (shank {index})" if n_shanks > 1 else ""
        before.set(ylabel="depth (um)", title=f"recorded, with the estimated drift of each block{label}")
        after.set(title=f"after the drift correction{label}")
    for ax in axes[-1]:
        ax.set(xlabel="time (s)")
    fig.tight_layout()
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


def draw_batch_figure(qc: Path, ccb, iorig):
    """qc/batch_similarity.png: ccb [Nbatch, Nbatch], iorig [Nbatch] (from the cache alone: drawn as soon as the
    reorder stage is done)."""
    batch_similarity(qc / "batch_similarity.png", np.asarray(ccb, dtype=float), np.asarray(iorig))


def draw_templates_figure(qc: Path, templates, whitening_inv, counts, good, xc, yc):
    """qc/templates.png: templates [K, nt, Nchan] (whitened), whitening_inv [Nchan, Nchan], counts [K] spikes per
    template, good [K] bool, xc, yc [Nchan]."""
    largest_templates(qc / "templates.png", templates, whitening_inv, np.asarray(counts), np.asarray(good),
                      np.asarray(xc, dtype=float), np.asarray(yc, dtype=float))


def draw_drift_map(qc: Path, times_s, depths, amplitudes):
    """qc/drift_map.png: times_s, depths (um), amplitudes [n] of every spike."""
    drift_map(qc / "drift_map.png", np.asarray(times_s), np.asarray(depths), np.asarray(amplitudes))


def draw_drift_correction(qc: Path, **arrays):
    """qc/drift_correction.png: the arrays of drift_correction."""
    drift_correction(qc / "drift_correction.png", **{k: np.asarray(v) for k, v in arrays.items()})


FIGURES = {"batch_similarity": draw_batch_figure, "templates": draw_templates_figure, "drift_map": draw_drift_map,
           "drift_correction": draw_drift_correction}


DRAWERS = 2  # processes drawing side by side: the templates and the drift map are asked for together


class FigureProcess:
    """The processes that draw the QC figures (DRAWERS of them, each figure drawn by the next one in turn).
    ``draw(name, **arrays)`` queues FIGURES[name] (the arrays travel in a .npz file beside the figure);
    ``close()`` waits for every figure and raises RuntimeError with a process's error when one failed. Their
    messages go to qc/figures.log, which is deleted after a clean run."""

    def __init__(self, folder):
        self.qc = qc_folder(folder)
        self.log_path = self.qc / "figures.log"
        self.jobs = 0
        self.tag = uuid.uuid4().hex[:8]  # job files of this sort only (a resumed sort may start others)
        self.processes = []
        with open(self.log_path, "w") as log:
            try:
                for _ in range(DRAWERS):
                    self.processes.append(subprocess.Popen([sys.executable, os.path.abspath(__file__)],
                                                           stdin=subprocess.PIPE, stdout=log,
                                                           stderr=subprocess.STDOUT, text=True))
            except OSError as err:
                self.kill()
                raise RuntimeError(f"the process drawing the QC figures could not start ({err}): set fig=False to "
                                   "sort without them") from err

    def draw(self, name: str, **arrays):
        job = self.qc / f".{name}.{self.tag}.{self.jobs}.npz"
        process = self.processes[self.jobs % len(self.processes)]
        self.jobs += 1
        np.savez(job, **arrays)
        try:
            process.stdin.write(f"{name}\t{self.qc}\t{job}\n")
            process.stdin.flush()
        except BrokenPipeError:  # it stopped at an earlier figure: close() says why
            pass

    def close(self):
        with_error = False
        for process in self.processes:
            try:
                process.stdin.close()
            except BrokenPipeError:  # it stopped with jobs still to read
                with_error = True
        for process in self.processes:
            with_error |= process.wait() != 0
        for job in self.qc.glob(f".*.{self.tag}.*.npz"):
            job.unlink()
        if with_error:
            message = self.log_path.read_text().strip().splitlines()[-1:] or ["no message"]
            raise RuntimeError(f"drawing the QC figures failed ({message[0]}); see {self.log_path}, or set "
                               "fig=False to sort without them")
        self.log_path.unlink(missing_ok=True)

    def kill(self):
        for process in self.processes:
            process.kill()
            process.wait()
        for job in self.qc.glob(f".*.{self.tag}.*.npz"):  # e.g. one half-written when the disk filled up
            job.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.close()
        else:  # the sort failed: stop drawing, keep its error
            self.kill()


def serve():
    """The drawing process: one job per line of stdin (figure name, qc folder, .npz of its arrays)."""
    new_figure((1, 1))  # imports matplotlib while the sort runs
    for line in sys.stdin:
        name, qc, job = line.rstrip("\n").split("\t")
        with np.load(job) as arrays:
            FIGURES[name](Path(qc), **arrays)
        os.unlink(job)


if __name__ == "__main__":
    serve()
