"""Template learning (learnAndSolve8b.m / learnTemplates.m of Kilosort 2.0).

Starting from the middle of the reordered batches, learning walks to one end and back (``iorig[ihalf-1::-1]``
then ``iorig[:ihalf]``). Each batch: templates sorted by peak channel, re-factorised from their running
average ``dWU`` (svd_templates), matching pursuit at ``Th[0]``, the running average updated with weight
``pm ** n_spikes`` where the momentum ``pm`` is annealed from momentum[0] to momentum[1] spikes, and every 5
batches templates under minFR are dropped or merged into a twin (triage); new templates are seeded from the
residual. The state at the end is the "mid-point" the extraction starts from.

Outputs: ``wPCA`` [nt0, 3] and ``wTEMP`` [nt0, 6] (waveform PCs and prototypes), ``W`` [K, nt0, 3], ``U``
[K, Nchan, 3], ``mu`` [K], ``dWU`` [K, nt0, Nchan], ``nsp`` [K], ``iW`` [K] peak channels, ``simScore`` [K, K],
``iNeigh`` [K, Nnearest] most similar templates, ``iNeighPC`` [K, NchanNear] channels of each template.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .. import templates as tm
from ..io import batch_prefetch, noise_units, on_own_streams, open_whitened, owned_spikes
from ..probe import nearest_channels
from ..progress import progress_bar
from .reorder import isolated_peaks, no_isolated_spikes_message, spike_clips

logger = logging.getLogger("si_ks2py")

OUTPUTS = ("wPCA", "wTEMP", "W", "U", "mu", "dWU", "nsp", "iW", "simScore", "iNeigh", "iNeighPC")
FILES = ()
FILE_INPUTS = ("temp_wh.dat",)

N_PROTOTYPES = 6  # NrankPC


def extract_templates_from_snippets(ctx, data, rng) -> tuple[np.ndarray, np.ndarray]:
    """extractTemplatesfromSnippets.m: (wTEMP [nt0, 6] prototype waveforms, wPCA [nt0, 3] temporal PCs).

    Isolated single-channel spikes of every nskip-th batch (up to 1e5 clips); the prototypes come from 10
    iterations of k-means on the clips' shapes (an empty cluster keeps its prototype, where Kilosort produced
    NaN); the PCs are the clips' top singular vectors (the leading eigenvectors of their Gram matrix), PC1
    negative at the trough. The clips stay on the device; only the Gram matrix comes back.
    """
    ops, p = ctx.ops, ctx.params
    xp = ops.xp
    clips, n = [], 0
    for k, raw in batch_prefetch(ctx, data, range(0, p.Nbatch, p.nskip)):
        S = noise_units(ctx, raw)
        rows, cols = isolated_peaks(ops, S, p)
        clips.append(spike_clips(ops, S, rows, cols, p))
        n += len(rows)
        if n > 1e5:
            break
    if n < N_PROTOTYPES:
        raise ValueError(f"only {n} isolated spikes were found, too few to learn waveform shapes: "
                         + no_isolated_spikes_message(ctx, data, range(0, p.Nbatch, p.nskip)))
    dd = xp.concatenate(clips).astype(xp.float64)  # [n, nt0]
    prototypes = dd[xp.asarray(rng.permutation(n)[:N_PROTOTYPES])].T  # [nt0, 6]
    prototypes /= xp.linalg.norm(prototypes, axis=0) + 1e-12
    clusters = xp.arange(N_PROTOTYPES)
    for _ in range(10):
        cc = dd @ prototypes  # [n, 6]
        members = cc.argmax(axis=1)[:, None] == clusters  # [n, 6]
        updated = dd.T @ xp.where(members, cc, 0.0)  # each prototype: its members' clips weighted by their score
        prototypes = xp.where(members.any(axis=0), updated, prototypes)
        prototypes /= xp.linalg.norm(prototypes, axis=0) + 1e-12
    values, vectors = np.linalg.eigh(ops.to_host(dd.T @ dd))
    wPCA = vectors[:, np.argsort(-values, kind="stable")[:p.Nrank]]
    wPCA[:, 0] *= -np.sign(wPCA[p.nt0min - 1, 0]) if wPCA[p.nt0min - 1, 0] != 0 else 1
    return ops.to_host(prototypes).astype(np.float32), np.ascontiguousarray(wPCA, dtype=np.float32)


def middle(n_active: int) -> int:
    """ihalf: where learning turns and extraction starts, the middle of the active batches at the head of iorig."""
    return max(1, int(math.ceil(n_active / 2)))


def learning_order(iorig: np.ndarray, n_active: int) -> np.ndarray:
    """Batches in learning order: from the middle of the active batches to the start of iorig and back."""
    ihalf = middle(n_active)
    return np.concatenate([iorig[ihalf - 1::-1], iorig[:ihalf]])


def seed_templates(ops, residual, wTEMP, wPCA, iC, params):
    """New templates from prototype-shaped events in the residual, smoothed by the waveform PCs: [n, nt0, Nchan]."""
    xp = ops.xp
    t, _ = ops.prototype_spikes(residual, wTEMP, iC, min(residual.shape[1], 7), params.Th[0])
    snippets = residual[xp.asarray(t)[:, None] + xp.arange(params.nt0)[None, :]].astype(xp.float64)
    w = xp.asarray(wPCA, dtype=xp.float64)
    return (w @ w.T) @ snippets  # [nt0, nt0] projector on the PCs, applied to every snippet


def template_update(dWU, nsp, dWU0, nsp0, pm: float, p1: float):
    """Running average of the templates (weight pm ** n_spikes for the past) and of the spikes per batch."""
    fexp = pm ** nsp0
    dWU = dWU * fexp[:, None, None] + (1 - fexp)[:, None, None] * dWU0 / np.maximum(1, nsp0)[:, None, None]
    return dWU, p1 * nsp + (1 - p1) * nsp0


def match_and_update(ops, data, state, fixed, params, k: int, threshold: float, pm: float, features=None,
                     on_residual=None):
    """One batch of matching pursuit with the current templates and the running-average update of ``state``.

    state: dict with W, U, mu, dWU, nsp (device arrays, float64); fixed: iC, iW, Ka, Kb and the templates'
    neighbours. Returns the pursuit's outputs over the batch read with its margins (st, ids, y, x, residual,
    features), the float32 templates W, U it used and ``owned`` [n_spikes] bool, the batch's own spikes.
    ``on_residual(residual)``, when given, is called as soon as the pursuit is done, before the update.
    """
    xp = ops.xp
    if len(state["dWU"]) == 0:  # nothing learnt yet (e.g. a silent first batch): the residual is the data
        if on_residual is not None:
            on_residual(data)
        empty = xp.zeros(0, dtype=xp.int64)
        none_owned = xp.zeros(0, dtype=bool)
        return empty, empty, xp.zeros(0, xp.float32), xp.zeros(0, xp.float32), data, None, None, None, none_owned
    W, U, mu = ops.svd_templates(state["dWU"], state["W"], fixed["iC"], fixed["iW"], fixed["Ka"], fixed["Kb"],
                                 params.nt0min)
    state.update(W=W, U=U, mu=mu)
    W32, U32, mu32 = (a.astype(xp.float32) for a in (W, U, mu))
    xcorr = ops.neighbor_xcorr(W32, U32, fixed["neighbors"])
    st, ids, y, x, residual, feat = ops.match_pursuit(data, W32, U32, mu32, fixed["neighbors"], xcorr, threshold,
                                                      params.lam, params.nInnerIter, features)
    if on_residual is not None:
        on_residual(residual)
    owned = owned_spikes(st + params.nt0min, params, k)
    # only the batch's confident spikes update the templates, in every phase
    dWU0, nsp0 = ops.accumulate_templates(residual, st, ids, y, W32, U32, len(W), owned & (x > params.Th[0]))
    state["dWU"], state["nsp"] = template_update(state["dWU"], state["nsp"], dWU0, nsp0.astype(xp.float64), pm,
                                                 params.p1)
    return st, ids, y, x, residual, feat, W32, U32, owned


def select_templates(state, index):
    """Keep (and order) the templates of ``state`` given by ``index`` (bool mask or indices, device)."""
    for name in ("W", "U", "mu", "nsp", "dWU"):
        state[name] = state[name][index]


def most_spikes(xp, nsp, most):
    """The larger of ``most`` (None or a 0-d device array) and the largest of ``nsp``: kept on the device (no wait
    for the GPU), read only for an error."""
    if len(nsp) == 0:
        return most
    largest = nsp.max()
    return largest if most is None else xp.maximum(most, largest)


def sort_by_channel(ops, state, fixed, channel_overlap, nt0min: int):
    """Templates sorted by peak channel (coherent memory access, as in Kilosort), with their peak channels iW
    and neighbours (templates whose neighbourhoods overlap, from channel_overlap [Nchan, Nchan] bool) in
    ``fixed``; the small bookkeeping is done on the host, after one wait for the peak channels."""
    iW = ops.to_host(tm.peak_channels(state["dWU"], nt0min))
    by_channel = np.argsort(iW, kind="stable")
    iW = iW[by_channel]
    select_templates(state, ops.asarray(by_channel))
    fixed["iW"] = ops.asarray(iW)
    fixed["neighbors"] = ops.asarray(tm.neighbors_from_overlap(channel_overlap[iW[:, None], iW[None, :]]))


def run(ctx):
    ops, p, ir = ctx.ops, ctx.params, ctx.intermediate
    xp = ops.xp
    data = open_whitened(ctx)
    n_chan = len(ir.chanMap)
    n_near = min(n_chan, 32)
    max_templates = p.nfilt_factor * n_chan
    rng = np.random.default_rng(p.seed)
    wTEMP, wPCA = extract_templates_from_snippets(ctx, data, rng)
    iC = nearest_channels(np.asarray(ir.xc), np.asarray(ir.yc), np.asarray(ir.kcoords), n_near)
    Ka, Kb = tm.alignment_kernels(p.nt0, p.nt0min)
    fixed = {"iC": ops.asarray(iC), "Ka": ops.asarray(Ka), "Kb": ops.asarray(Kb)}
    wTEMP_d, wPCA_d = ops.asarray(wTEMP), ops.asarray(wPCA)
    W0 = xp.asarray(wPCA_d, dtype=xp.float64)  # warm start (and rank) of every new template
    m0 = p.minFR * p.NT / p.fs
    order = learning_order(np.asarray(ir.iorig), int(ir.n_active))
    momentum = np.exp(-1.0 / np.linspace(p.momentum[0], p.momentum[1], len(order)))
    state = {"W": xp.zeros((0, p.nt0, p.Nrank)), "U": xp.zeros((0, n_chan, p.Nrank)), "mu": xp.zeros(0),
             "nsp": xp.zeros(0), "dWU": xp.zeros((0, p.nt0, n_chan))}

    seeded, most_active = [0], [None]  # for the error below: templates seeded, most spikes per batch at a triage

    def add_templates(new_dwu):
        n_new = len(new_dwu)
        seeded[0] += n_new
        state["dWU"] = xp.concatenate([state["dWU"], new_dwu])[:max_templates]
        state["W"] = xp.concatenate([state["W"], xp.broadcast_to(W0, (n_new,) + W0.shape)])[:max_templates]
        state["U"] = xp.concatenate([state["U"], xp.zeros((n_new,) + state["U"].shape[1:])])[:max_templates]
        state["nsp"] = xp.concatenate([state["nsp"], xp.full(n_new, m0)])[:max_templates]
        state["mu"] = xp.concatenate([state["mu"], xp.full(n_new, 10.0)])[:max_templates]

    def seeds_of(residual):
        new_dwu = seed_templates(ops, residual, wTEMP_d, wPCA_d, fixed["iC"], p)
        ops.synchronize()  # of this thread's stream: the caller's stream uses the seeds
        return new_dwu

    channel_overlap = tm.channel_overlap(iC, np.arange(n_chan), n_chan)  # [Nchan, Nchan]: neighbourhoods overlap
    bar = progress_bar(total=len(order), desc="learn", enabled=ctx.show_progress)
    # a batch's seeds are looked for in its residual by another thread (on a stream of its own) while this one
    # updates the templates: the detection's GPU work then fills the time of the update's host work. The queued
    # call holds the residual until the seeds are made.
    with ThreadPoolExecutor(max_workers=1) as seeder:
        seeds_on_own_stream, seeding = on_own_streams(ops, seeds_of), []

        def start_seeding(residual):
            seeding.append(seeder.submit(seeds_on_own_stream, residual))

        for ib, (k, raw) in enumerate(batch_prefetch(ctx, data, order)):
            batch = noise_units(ctx, raw)
            if ib == 0:
                add_templates(seeds_of(batch))
            sort_by_channel(ops, state, fixed, channel_overlap, p.nt0min)
            last = ib == len(order) - 1
            match_and_update(ops, batch, state, fixed, p, int(k), p.Th[0], momentum[ib],
                             on_residual=None if last else start_seeding)
            if not last:
                if ib % 5 == 0:
                    most_active[0] = most_spikes(xp, state["nsp"], most_active[0])
                    select_templates(state, tm.triage(state["W"], state["U"], state["mu"], state["nsp"], m0))
                add_templates(seeding.pop().result())
            bar.set_postfix(templates=len(state["dWU"]))
            bar.update()
    bar.close()

    most_active[0] = most_spikes(xp, state["nsp"], most_active[0])
    keep = tm.triage(state["W"], state["U"], state["mu"], state["nsp"], m0)
    select_templates(state, keep)
    if len(state["W"]) == 0 and seeded[0] == 0:
        raise ValueError("template learning found no templates: the recording seems to hold no spikes above "
                         f"projection_threshold={p.Th}")
    if len(state["W"]) == 0:  # triage drops a template for a low rate, or for a twin that fires more (and is kept)
        rate = 0.0 if most_active[0] is None else float(ops.to_host(most_active[0])) * p.fs / p.NT
        raise ValueError(f"template learning seeded {seeded[0]} templates and dropped every one for firing below "
                         f"minFR={p.minFR:g} Hz (the most active reached {rate:.3g} Hz): lower minFR")
    iW = tm.peak_channels(state["dWU"], p.nt0min)
    sim = tm.similarity(ops, state["W"].astype(xp.float32), state["U"].astype(xp.float32), fixed["iC"], iW, n_chan,
                        n_near)
    logger.info("learn: %d templates", len(iW))
    ir.wPCA, ir.wTEMP = wPCA, wTEMP
    for name in ("W", "U", "mu", "dWU", "nsp"):
        setattr(ir, name, ops.to_host(state[name]))
    ir.iW = ops.to_host(iW)
    ir.simScore = ops.to_host(sim["simScore"])
    ir.iNeigh = ops.to_host(sim["iList"])
    ir.iNeighPC = iC[ops.to_host(iW)]
