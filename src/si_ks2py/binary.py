"""pykilosort's entry point: a raw binary file, a probe Bunch and a folder.

``run_binary(dat_path, probe, dir_path)`` opens the file as a SpikeInterface binary recording with a probeinterface
probe built from the Bunch, and sorts it with ``pipeline.run``, as any other recording:

- the file: ``NchanTOT`` interleaved channels (time rows), ``dtype`` (int16 by default), no header, sampled at
  ``fs`` (or ``sample_rate``; 30000 Hz by default);
- the probe Bunch: ``NchanTOT``, ``chanMap`` (0-based file channel of each site), ``xc``, ``yc`` (um) and, optional,
  ``kcoords`` (the shank of each site; channels of different shanks are never neighbours); file channels not in
  ``chanMap`` (e.g. a sync channel) are not sorted;
- the folders: the cache of intermediates in ``<dir_path>/.kilosort/context`` (the ``cache_folder`` param names
  another), the Phy folder and ks2py.log in ``<dir_path>/output`` (``output_folder`` names another).

Every check of the probe and of the file comes before any work, with an error that says what to change.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path

import numpy as np

from .context import Bunch

#: The params of the raw file (not sorter params): pykilosort's names, the sorter's defaults.
FILE_PARAMS = {"fs": 30000.0, "dtype": "int16"}
#: Other names a pykilosort user may give them (phylib's ephys reader).
FILE_PARAM_ALIASES = {"sample_rate": "fs"}


def _integers(values, name: str) -> np.ndarray:
    """``values`` as int64 [n]; ValueError unless every value is a whole number."""
    array = np.asarray(values).squeeze()
    array = array.reshape(-1) if array.ndim == 0 else array
    if array.ndim != 1 or array.dtype.kind not in "iuf" or not np.all(np.isfinite(array)) or \
            np.any(array != np.round(array)):
        raise ValueError(f"probe.{name} must be a 1-D array of whole numbers, got {values!r:.200}")
    return array.astype(np.int64)


def _numbers(values, name: str) -> np.ndarray:
    array = np.asarray(values).squeeze()
    array = array.reshape(-1) if array.ndim == 0 else array
    if array.ndim != 1 or array.dtype.kind not in "iuf" or not np.all(np.isfinite(array)):
        raise ValueError(f"probe.{name} must be a 1-D array of finite numbers (um), got {values!r:.200}")
    return array.astype(np.float64)


def check_probe(probe) -> Bunch:
    """The probe Bunch, checked: a new Bunch with NchanTOT (int), chanMap (int64 [n], 0-based file channels), xc,
    yc (float64 [n], um) and kcoords (int64 [n]; all 0 when the Bunch has none). ValueError naming what to change."""
    if not isinstance(probe, dict):
        raise TypeError(f"probe must be a Bunch (or dict) with NchanTOT, chanMap, xc, yc, kcoords, got "
                        f"{type(probe).__name__}")
    missing = [k for k in ("NchanTOT", "chanMap", "xc", "yc") if k not in probe]
    if missing:
        raise ValueError(f"the probe Bunch has no {', '.join(missing)}: set probe.NchanTOT (channels in the file), "
                         "probe.chanMap (0-based file channel of each site), probe.xc and probe.yc (um)")
    n_total = probe["NchanTOT"]
    if not isinstance(n_total, numbers.Real) or isinstance(n_total, (bool, np.bool_)) or \
            not float(n_total).is_integer() or n_total < 1:
        raise ValueError(f"probe.NchanTOT must be the number of channels in the file (a positive integer), got "
                         f"{n_total!r}")
    n_total = int(n_total)
    chan = _integers(probe["chanMap"], "chanMap")
    xc, yc = _numbers(probe["xc"], "xc"), _numbers(probe["yc"], "yc")
    kcoords = _integers(probe["kcoords"], "kcoords") if "kcoords" in probe else np.zeros(len(chan), np.int64)
    lengths = {"chanMap": len(chan), "xc": len(xc), "yc": len(yc), "kcoords": len(kcoords)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the probe's arrays must have one entry per site, but their lengths differ: {lengths}; "
                         "give chanMap, xc, yc and kcoords the same length")
    if len(chan) == 0:
        raise ValueError("probe.chanMap is empty: list the file channel of each site to sort")
    if chan.min() < 0 or chan.max() >= n_total:
        bad = chan[(chan < 0) | (chan >= n_total)]
        hint = (" chanMap looks 1-based (MATLAB's): subtract 1" if chan.min() >= 1 and chan.max() == n_total
                else " fix chanMap, or NchanTOT if the file has more channels")
        raise ValueError(f"probe.chanMap holds {bad[:5].tolist()}, outside the file's channels 0 to {n_total - 1} "
                         f"(NchanTOT = {n_total}):{hint}")
    values, counts = np.unique(chan, return_counts=True)
    if np.any(counts > 1):
        raise ValueError(f"probe.chanMap lists file channel(s) {values[counts > 1][:5].tolist()} more than once: "
                         "each site must have a channel of its own")
    return Bunch(NchanTOT=n_total, chanMap=chan, xc=xc, yc=yc, kcoords=kcoords)


def check_file(dat_path, n_total: int, dtype) -> int:
    """The number of samples of the raw file ``dat_path`` of ``n_total`` channels of ``dtype``; FileNotFoundError
    or ValueError (a size that is not a whole number of samples) naming what to change."""
    path = Path(dat_path)
    if not path.is_file():
        raise FileNotFoundError(f"no raw data file {os.fspath(path)!r}: give the path of the .bin (or .dat) file")
    size, sample = path.stat().st_size, n_total * np.dtype(dtype).itemsize
    if size == 0 or size % sample:
        fits = [n for n in range(1, 4 * n_total + 2) if size and size % (n * np.dtype(dtype).itemsize) == 0]
        near = sorted(fits, key=lambda n: abs(n - n_total))[:3]
        raise ValueError(
            f"{os.fspath(path)!r} has {size} bytes, not a whole number of samples of NchanTOT = {n_total} channels of "
            f"{np.dtype(dtype).name} ({sample} bytes a sample): check probe.NchanTOT (channel counts that fit this "
            f"size: {near or 'none'}) and the dtype param"
        )
    return size // sample


def file_params(params: dict) -> tuple[float, np.dtype, dict]:
    """(fs, dtype, the sorter params): the raw file's params split from the others."""
    params = dict(params)
    for alias, name in FILE_PARAM_ALIASES.items():
        if alias in params:
            if name in params and params[name] != params[alias]:
                raise ValueError(f"'{alias}' and '{name}' name the same param (the sampling rate, Hz) and differ: "
                                 f"{params[alias]!r} and {params[name]!r}; give one")
            params[name] = params.pop(alias)
    fs = params.pop("fs", FILE_PARAMS["fs"])
    if isinstance(fs, (bool, np.bool_)) or not isinstance(fs, numbers.Real) or not fs > 0:
        raise ValueError(f"'fs' (the sampling rate of the file, Hz) must be a positive number, got {fs!r}")
    dtype = params.pop("dtype", FILE_PARAMS["dtype"])
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"'dtype' must name the file's sample type, e.g. 'int16', got {dtype!r}") from None
    if dtype.kind not in "iuf":
        raise ValueError(f"'dtype' must be an integer or float sample type, e.g. 'int16', got {dtype.name!r}")
    return float(fs), dtype, params


def binary_recording(dat_path, probe, fs: float = FILE_PARAMS["fs"], dtype=FILE_PARAMS["dtype"]):
    """The raw file as a SpikeInterface recording of the probe's sites (a channel slice of the file's
    BinaryRecordingExtractor: its channels in chanMap, by file channel), the probe set from the Bunch
    (device_channel_indices = chanMap, shank_ids = kcoords)."""
    import probeinterface
    from spikeinterface.core import read_binary

    probe = check_probe(probe)
    check_file(dat_path, probe.NchanTOT, dtype)
    recording = read_binary(os.fspath(dat_path), sampling_frequency=fs, dtype=np.dtype(dtype).name,
                            num_channels=probe.NchanTOT, time_axis=0, file_offset=0)
    sites = probeinterface.Probe(ndim=2, si_units="um")
    sites.set_contacts(positions=np.column_stack([probe.xc, probe.yc]), shapes="circle",
                       shape_params={"radius": 6}, shank_ids=probe.kcoords.astype(str))
    sites.set_device_channel_indices(probe.chanMap)
    group = probeinterface.ProbeGroup()
    group.add_probe(sites)
    return recording.select_channels_with_probegroup(group)


def run_binary(dat_path, probe, dir_path=None, output_folder=None, verbose: bool = True, **params):
    """Sort the raw file ``dat_path`` (see the module's docstring); returns the run's Context (``ctx.raw_data``
    the recording, ``ctx.probe`` its channel map, ``ctx.params``, ``ctx.intermediate``, ``ctx.timings`` the
    stages that ran). A rerun with the same ``dir_path`` resumes from the cache."""
    from .params import validate
    from .pipeline import run as run_pipeline

    if probe is None:
        raise TypeError("run(dat_path, probe=probe, dir_path=...) needs the probe Bunch of the raw file; a folder "
                        "saved by SpikeInterface is opened with spikeinterface.load(folder) and sorted as a recording")
    fs, dtype, params = file_params(params)
    validate(params, fs)  # a misnamed param is reported before the folders are made
    dir_path = Path(dat_path).parent if dir_path is None else Path(dir_path)
    output_folder = dir_path / "output" if output_folder is None else Path(output_folder)
    if params.get("cache_folder") is None:
        params["cache_folder"] = dir_path / ".kilosort" / "context"
    recording = binary_recording(dat_path, probe, fs, dtype)
    return run_pipeline(recording, output_folder, params, verbose=verbose)
