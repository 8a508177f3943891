"""Spike extraction (runTemplates.m / trackAndSort.m of Kilosort 2.0): the final pass over every batch.

Two sweeps start from the learnt mid-point templates (``dWU = mu W U'`` rebuilt, spike counts reset): one from
the middle of the reordered batches to their start, one from the middle to their end. They are independent and
run side by side, each in a thread with a device stream of its own (the same spikes as one after the other; the
per-batch work is bound by the host's kernel launches and waits, which the other thread fills). Templates keep
tracking (running average with momentum[1]), the number of templates and their peak channels stay fixed,
and matching pursuit runs at ``Th[-1]``, recording every spike with its template features (projections on
the most similar templates) and PC features (on the template's channels).

Outputs (spikes ordered by batch rank, then time, as in Kilosort 2.0): ``st3`` [n, 5] float64 (sample in the
recording, template, amplitude, score sqrt(cost), rank of the batch in iorig), ``cProj`` [n, Nnearest]
float32, ``cProjPC`` [n, 3, NchanNear] float32. The features of each batch are spilled to a file (one per sweep)
as they come and copied into their arrays in rank order at the end, one batch at a time: host memory does not
grow with the spike count (about 0.5 kB per spike).
"""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import templates as tm
from ..io import batch_margin, batch_prefetch, noise_units, on_own_streams, open_whitened
from ..probe import nearest_channels
from ..progress import progress_bar
from .learn import match_and_update, middle

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("st3", "cProj", "cProjPC")
FILES = ()
FILE_INPUTS = ("temp_wh.dat",)


def extraction_sweeps(iorig: np.ndarray, n_active: int) -> list[np.ndarray]:
    """iorig[ihalf-1::-1] then iorig[ihalf:], each started from the mid-point templates."""
    ihalf = middle(n_active)
    return [iorig[ihalf - 1::-1], iorig[ihalf:]]


def run(ctx):
    ops, p, ir = ctx.ops, ctx.params, ctx.intermediate
    xp = ops.xp
    data = open_whitened(ctx)
    n_chan = len(ir.chanMap)
    iorig = np.asarray(ir.iorig)
    rank_of = np.empty(len(iorig), dtype=np.int64)
    rank_of[iorig] = np.arange(len(iorig))
    W_mid, U_mid, mu_mid = (ops.asarray(np.asarray(a, dtype=np.float64)) for a in (ir.W, ir.U, ir.mu))
    dWU_mid = tm.dense_templates(W_mid, U_mid, mu_mid)
    iC = nearest_channels(np.asarray(ir.xc), np.asarray(ir.yc), np.asarray(ir.kcoords), min(n_chan, 32))
    Ka, Kb = tm.alignment_kernels(p.nt0, p.nt0min)
    iW = tm.peak_channels(dWU_mid, p.nt0min)
    fixed = {"iC": ops.asarray(iC), "iW": iW, "Ka": ops.asarray(Ka), "Kb": ops.asarray(Kb),
             "neighbors": tm.overlap_neighbors(ops.asarray(iC), iW, n_chan)}
    feature_templates = ops.asarray(np.asarray(ir.iNeigh))
    template_channels = fixed["iC"][iW]
    wPCA = ops.asarray(np.asarray(ir.wPCA))
    pm = math.exp(-1.0 / p.momentum[1])
    stride, margin = p.NT - p.ntbuff, batch_margin(p)
    bar = progress_bar(total=p.Nbatch, desc="extract", enabled=ctx.show_progress)

    def sweep_batches(sweep, spill) -> dict:
        """One sweep, its features spilled to ``spill``: {batch rank: (its st3 rows, where its features start)}."""
        blocks = {}
        state = {"W": W_mid, "U": U_mid, "mu": mu_mid, "dWU": dWU_mid, "nsp": xp.zeros(len(mu_mid))}
        for k, raw in batch_prefetch(ctx, data, sweep):
            batch = noise_units(ctx, raw)
            st, ids, y, x, residual, feat, W32, U32, owned = match_and_update(
                ops, batch, state, fixed, p, int(k), p.Th[-1], pm, feature_templates)
            mine = xp.flatnonzero(owned)  # indices: one count, not one per array
            st, ids, y, x, feat = st[mine], ids[mine], y[mine], x[mine], feat[mine]
            pcs = ops.pc_features(residual, st, ids, y, W32, U32, template_channels, wPCA)
            time = p.t_start + stride * int(k) - margin + st + p.nt0min
            # two transfers per batch: the spike table (float64, exact for the times) and the features
            rows = ops.to_host(xp.stack([time, ids, y, x, xp.full(len(st), rank_of[k])], axis=1)
                               .astype(xp.float64))
            pcs = pcs.reshape(len(st), pcs.shape[1] * pcs.shape[2])
            features = ops.to_host(xp.concatenate([feat, pcs], axis=1))
            order = np.lexsort((rows[:, 1], rows[:, 0]))  # time, then template
            blocks[rank_of[k]] = (rows[order], spill, spill.tell())
            n_feat = feat.shape[1]
            spill.write(np.ascontiguousarray(features[order, :n_feat], dtype=np.float32).tobytes())
            spill.write(np.ascontiguousarray(features[order, n_feat:], dtype=np.float32).tobytes())
            bar.update()
        return blocks

    sweeps = extraction_sweeps(iorig, int(ir.n_active))
    spill_paths = [ir.folder / f".extract_features_{i}.part" for i in range(len(sweeps))]
    try:
        with contextlib.ExitStack() as files:
            spills = [files.enter_context(open(path, "w+b")) for path in spill_paths]
            # the sweeps are independent (each starts from the mid-point templates): run side by side, the host
            # work of one fills the other's waits for the GPU
            with ThreadPoolExecutor(max_workers=len(sweeps)) as pool:
                blocks = {}
                for result in pool.map(on_own_streams(ops, sweep_batches), sweeps, spills):
                    blocks.update(result)
            bar.close()
            ranks = sorted(blocks)
            st3 = np.concatenate([blocks[r][0] for r in ranks])
            logger.info("extract: %d spikes from %d templates", len(st3), len(mu_mid))
            ir.st3 = st3  # spikes by batch rank, then time, then template
            shapes = {"cProj": (feature_templates.shape[1],), "cProjPC": (wPCA.shape[1], template_channels.shape[1])}
            for part, (name, shape) in enumerate(shapes.items()):
                ir.write_array(name, (len(st3),) + shape, np.float32,
                               lambda out, part=part: gather_blocks(blocks, ranks, shapes, part, out))
    finally:
        for path in spill_paths:
            path.unlink(missing_ok=True)


def gather_blocks(blocks: dict, ranks: list, shapes: dict, part: int, out: np.ndarray):
    """Copy part ``part`` (0: template features, 1: PC features) of every batch's spilled features (blocks: rank ->
    (rows, spill file, offset)) into ``out`` [n, ...] float32, in rank order: one batch in memory at a time."""
    sizes = [int(np.prod(shape)) for shape in shapes.values()]
    row = 0
    for r in ranks:
        rows, spill, offset = blocks[r]
        n = len(rows)
        spill.seek(offset + 4 * n * sum(sizes[:part]))
        values = np.frombuffer(spill.read(4 * n * sizes[part]), dtype=np.float32)
        out[row:row + n] = values.reshape((n,) + out.shape[1:])
        row += n
