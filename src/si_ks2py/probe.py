"""probeinterface Probe / ProbeGroup -> the Kilosort channel map (``probe`` Bunch).

Fields: ``NchanTOT`` (channels of the recording), ``chanMap`` (0-based recording channel index of each connected
contact, ascending), ``xc``, ``yc`` (um), ``kcoords`` (integer group: one per shank, shanks of different probes
kept apart; the probe index where no shank ids are set).
"""

from __future__ import annotations

import numpy as np
from probeinterface import Probe, ProbeGroup

from .context import Bunch


def probe_from_recording(recording) -> Bunch:
    """The channel map of a SpikeInterface recording; ValueError when it has no probe."""
    if not recording.has_probe():
        raise ValueError(
            "ks2py needs channel locations: this recording has no probe attached. Attach one (SpikeInterface "
            "modifies the recording in place and returns None): recording.set_probegroup(probeinterface.read_prb("
            "path)) for a .prb file, or recording.set_probe(probe) for a probeinterface Probe (e.g. "
            "probeinterface.generate_multi_columns_probe(...), then probe.set_device_channel_indices(...))."
        )
    return channel_map(recording.get_probegroup(), recording.get_num_channels())


def channel_map(probe: Probe | ProbeGroup, n_channels: int | None = None) -> Bunch:
    """Build the channel map from a Probe or ProbeGroup whose device_channel_indices give recording channels."""
    probes = probe.probes if isinstance(probe, ProbeGroup) else [probe]
    channels, xs, ys, groups = [], [], [], []
    for probe_index, p in enumerate(probes):
        if p.device_channel_indices is None:
            raise ValueError(
                f"probe {probe_index} has no device_channel_indices: call probe.set_device_channel_indices(...) "
                "so each contact names its recording channel"
            )
        wired = np.asarray(p.device_channel_indices) >= 0  # -1 marks an unconnected contact
        positions = np.asarray(p.contact_positions, dtype=float)[wired]
        shanks = p.shank_ids[wired] if p.shank_ids is not None and len(p.shank_ids) else None
        if shanks is None or np.all(shanks == ""):
            shanks = np.zeros(int(wired.sum()), dtype=int)
        channels.append(np.asarray(p.device_channel_indices)[wired])
        xs.append(positions[:, 0])
        ys.append(positions[:, 1])
        groups += [(probe_index, str(s)) for s in shanks]
    chan = np.concatenate(channels).astype(np.int64)
    if len(chan) == 0:
        raise ValueError("the probe has no connected contacts")
    if len(np.unique(chan)) != len(chan):
        raise ValueError("two probe contacts are wired to the same recording channel")
    n_total = int(chan.max()) + 1 if n_channels is None else int(n_channels)
    if chan.max() >= n_total:
        raise ValueError(f"a probe contact is wired to channel {chan.max()}, but the recording has {n_total}")
    # stable numbering of (probe, shank) pairs in order of first appearance
    group_ids = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    kcoords = np.array([group_ids[g] for g in groups], dtype=np.int64)
    order = np.argsort(chan, kind="stable")
    return Bunch(
        NchanTOT=n_total,
        chanMap=chan[order],
        xc=np.concatenate(xs)[order],
        yc=np.concatenate(ys)[order],
        kcoords=kcoords[order],
    )


def channel_distances(xc: np.ndarray, yc: np.ndarray, kcoords: np.ndarray | None = None) -> np.ndarray:
    """Euclidean distances between channels (um), [Nchan, Nchan] float64.

    Channels of different groups (shanks or probes) are put 1e9 um apart, so no neighbourhood spans two shanks.
    """
    d = np.hypot(xc[:, None] - xc[None, :], yc[:, None] - yc[None, :])
    if kcoords is not None:
        d = d + 1e9 * (kcoords[:, None] != kcoords[None, :])
    return d


def nearest_channels(xc, yc, kcoords, n_near: int) -> np.ndarray:
    """For each channel, its ``n_near`` nearest channels (itself first), [Nchan, n_near] int64 (getClosestChannels)."""
    d = channel_distances(xc, yc, kcoords)
    n_near = min(n_near, len(xc))
    # itself first even if another channel shares its position; then by distance, ties by index (stable)
    d[np.arange(len(xc)), np.arange(len(xc))] = -1
    return np.argsort(d, axis=1, kind="stable")[:, :n_near]
