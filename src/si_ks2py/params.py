"""Every option of the sorter in one table.

SpikeInterface's ``_default_params`` / ``_params_description``, the validation, the resolution into the
Kilosort-named run parameters (``ctx.params``) and the docs' params reference are all derived from ``PARAMS``.
Options that SpikeInterface's ``kilosort2`` wrapper exposes keep its names and meanings, so a params dict that
worked with ``run_sorter("kilosort2", ...)`` works with ``run_sorter("ks2py", ...)``; the remaining Kilosort 2.0
options keep their Kilosort names.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .context import Bunch

logger = logging.getLogger("si_ks2py")

#: Pipeline stages in run order; a param belongs to the first stage that reads it, and a change to it
#: invalidates that stage and everything after it. "run" params never change results.
STAGES = ("preprocess", "drift", "reorder", "learn", "extract", "merge", "split", "cutoff", "export")


@dataclass(frozen=True)
class Param:
    name: str
    default: Any
    kind: str  # int | float | bool | pair | int_pair | choice | path | tmp_files | trange | motion | any
    stage: str
    description: str
    ks2_name: str | None = None
    low: float | None = None  # inclusive bounds for numbers (each element for pairs)
    high: float | None = None
    allow_none: bool = False
    choices: tuple = ()


PARAMS: tuple[Param, ...] = (
    # --- options of SpikeInterface's kilosort2 wrapper (same names, same meaning) ---
    Param("detect_threshold", 6.0, "float", "preprocess",
          "Threshold (in noise standard deviations, positive) for the single-channel negative-peak detection used by "
          "good-channel selection and by the waveform PCs.", "spkTh", low=0.5, high=100),
    Param("projection_threshold", [10.0, 4.0], "pair", "learn",
          "Template-matching thresholds on sqrt(cost): the first while learning templates, the second for the final "
          "extraction pass; set_cutoff scans from the first down to the second.", "Th", low=0.1, high=1000),
    Param("preclust_threshold", 8.0, "float", "reorder",
          "Threshold on the norm of the PC projections for the spike detection of batch reordering.", "ThPre",
          low=0.1, high=1000),
    Param("whiteningRange", 32, "int", "preprocess",
          "Number of nearest channels used to whiten each channel (local ZCA); a value >= the channel count gives "
          "global whitening.", low=1, high=100000),
    Param("momentum", [20.0, 400.0], "pair", "learn",
          "Number of spikes a template averages over, annealed from the first to the second value during learning; "
          "the second value is used during extraction.", low=1, high=1e6),
    Param("car", True, "bool", "preprocess", "Subtract the median across channels at every sample (common median "
          "reference).", "CAR"),
    Param("minFR", 0.1, "float", "learn",
          "Minimum firing rate (Hz) of a template during learning; templates below it are dropped.", low=0, high=1000),
    Param("minfr_goodchannels", 0.1, "float", "preprocess",
          "Minimum rate (Hz) of threshold crossings for a channel to be kept; 0 keeps every channel.",
          low=0, high=1000),
    Param("freq_min", 150.0, "float", "preprocess", "High-pass corner frequency (Hz) of the 3rd-order Butterworth "
          "filter.", "fshigh", low=1, high=1e6),
    Param("sigmaMask", 30.0, "float", "learn", "Spatial constant (um) of the channel mask around each template.",
          low=1e-3, high=1e6),
    Param("lam", 10.0, "float", "learn", "Weight of the amplitude prior in template matching (0: not used, 10: "
          "average, 50: a lot).", low=0, high=1e6),
    Param("nPCs", 3, "int", "reorder", "Number of temporal PCs per channel for the batch-reordering features.",
          low=1, high=3),
    Param("ntbuff", 64, "int", "preprocess", "Samples of overlap between consecutive batches; filter context on "
          "each side of a batch.", low=1, high=100000),
    Param("nfilt_factor", 4, "int", "learn", "Maximum number of templates per good channel (temporary ones "
          "included).", low=1, high=64),
    Param("NT", None, "int", "preprocess", "Batch length in samples; None gives 64*1024 + ntbuff, except for a "
          "sorted range of fewer than 4 such batches (e.g. 4 s at 30 kHz, 10 s at 10 kHz), which is cut into 8 "
          "batches of at least 8192 samples (logged): learning from 1 or 2 batches lost units. Another value is "
          "rounded down to a multiple of 32, as kilosort2 does, and is at most the sorted range (rounded up to 64 "
          "samples) + ntbuff. Lower it if the GPU runs out of memory.", low=1024, high=2**24, allow_none=True),
    Param("AUCsplit", 0.9, "float", "split", "Minimum isolation (area under the curve, max 1) each half of a "
          "cluster needs for the cluster to be split.", low=0, high=1),
    # --- options of SpikeInterface's kilosort2_5 wrapper (drift correction, Kilosort 2.5's datashift2) ---
    Param("do_correction", True, "bool", "drift",
          "Estimate the drift of the tissue along the probe and correct the whitened data for it by kriging "
          "interpolation (Kilosort 2.5's datashift2) before the later stages; batches then stay in time order. "
          "False gives Kilosort 2.0's behaviour (no correction, batches reordered by similarity)."),
    Param("nblocks", 5, "int", "drift",
          "Vertical blocks of the non-rigid drift estimate: 0 turns drift correction off (as do_correction=False), "
          "1 estimates a rigid drift, n >= 2 estimates 2n - 1 overlapping blocks per shank.", low=0, high=100),
    Param("sig", 20.0, "float", "drift",
          "Spatial scale (um) of the kriging kernel that interpolates the data at the corrected positions "
          "(see drift_kernel).", low=1, high=1000),
    Param("drift_kernel", "gaussian", "choice", "drift",
          "Kernel of the kriging interpolation: 'gaussian' exp(-d^2 / (2 sig^2)) (Kilosort 4's; a spike's footprint "
          "is moved with a few % error) or 'exponential' exp(-|dx|/sig - |dy|/(1.5 sig)) (Kilosort 2.5's; 13-20 % "
          "error and 10-15 % amplitude loss at sub-pitch shifts, docs/stages.md).",
          choices=("gaussian", "exponential")),
    Param("drift_detect_threshold", 8.0, "float", "drift",
          "Threshold of the drift detector (matched-filter SNR of the generic templates; Kilosort 2.5 hard-codes "
          "8).", low=2, high=100),
    Param("motion", None, "motion", "drift",
          "A drift estimated elsewhere, used instead of ks2py's estimate: a SpikeInterface Motion (e.g. from "
          "spikeinterface.preprocessing.compute_motion) or the folder it was saved to with Motion.save (pass "
          "the folder through run_sorter, whose params must be JSON). Its displacement follows SpikeInterface's "
          "sign (a spike recorded at depth y came from y - displacement).", allow_none=True),
    Param("wave_length", 61, "int", "preprocess", "Template length in samples at 30 kHz (odd; 61 = 2 ms); scaled "
          "to the recording's sampling rate. An even value is made odd (+1), as kilosort2 does.", "nt0", low=11, high=127),
    Param("keep_good_only", False, "bool", "export", "Return only the units labelled 'good'."),
    Param("skip_kilosort_preprocessing", False, "bool", "preprocess",
          "Skip filtering, common reference and whitening: the recording is taken as already whitened "
          "(scaleproc must then be given)."),
    Param("scaleproc", None, "float", "preprocess", "int16 scaling of the whitened data; None gives 200.",
          low=1e-6, high=1e6, allow_none=True),
    Param("save_rez_to_mat", False, "bool", "export", "Also save the main results as rez.mat (MATLAB format) in "
          "the output folder."),
    Param("delete_tmp_files", ("matlab_files",), "tmp_files", "export",
          "Temporary files to delete after a successful run: True (all), False (none) or a tuple of 'temp_wh.dat' "
          "(the whitened data) and 'matlab_files' (ks2py writes none; accepted for kilosort2 compatibility)."),
    Param("delete_recording_dat", False, "bool", "export",
          "Accepted for kilosort2 compatibility: ks2py reads the recording directly and never writes a "
          "recording.dat copy, so there is nothing to delete."),
    # --- remaining Kilosort 2.0 options, Kilosort names ---
    Param("fslow", None, "float", "preprocess", "Optional low-pass corner (Hz): a band-pass filter instead of the "
          "high-pass (discouraged by Kilosort).", low=1, high=1e6, allow_none=True),
    Param("trange", [0.0, None], "trange", "preprocess",
          "Time range [start, stop] in seconds to sort; stop None sorts to the end."),
    Param("reorder", True, "bool", "reorder", "Reorder batches by waveform similarity (drift tracking); False "
          "keeps the time order."),
    Param("nskip", 25, "int", "learn", "Batch stride when collecting spikes for the template-learning PCs.",
          low=1, high=100000),
    Param("nSkipCov", 25, "int", "preprocess", "Batch stride when estimating the covariance for whitening.",
          low=1, high=100000),
    Param("nt0min", None, "int", "preprocess", "Sample of the template trough; None gives ceil(20*nt0/61).",
          low=1, high=126, allow_none=True),
    Param("loc_range", [5, 4], "int_pair", "reorder", "Half-widths (samples, channels) of the local-minimum window "
          "of the single-channel peak detection.", low=0, high=1000),
    Param("long_range", [30, 6], "int_pair", "reorder", "Half-widths (samples, channels) of the isolation window of "
          "the single-channel peak detection.", low=0, high=10000),
    Param("gain", 1.0, "float", "export", "Multiplies the cluster amplitudes of cluster_Amplitude.tsv (e.g. uV per "
          "bit).", low=0, high=1e12),
    Param("fig", True, "bool", "export", "Save QC figures (drift map, templates, batch similarity) as PNG."),
    # --- ks2py options ---
    Param("device", "auto", "choice", "run", "Where the sort runs: 'auto' (the GPU if CuPy sees one, else the "
          "CPU), 'cuda' or 'cpu'.", choices=("auto", "cuda", "cpu")),
    Param("seed", 1, "int", "reorder", "Seed of every random choice (batch k-means, template prototypes), so runs "
          "repeat.", low=0, high=2**32 - 1),
    Param("cache_folder", None, "path", "run",
          "Folder of the intermediate arrays; None puts them in <output>/cache. Name one to resume a killed run "
          "through run_sorter, which recreates its output folder.", allow_none=True),
    Param("progress", True, "bool", "run", "Show a progress bar for each stage."),
    # --- SpikeInterface's job kwargs, which its kilosort2 wrapper adds to its params (it writes recording.dat with
    # them); run params, so they never change results ---
    Param("progress_bar", True, "bool", "run", "SpikeInterface job kwarg: False hides the stages' progress bars "
          "(as does progress=False)."),
    Param("n_jobs", 1, "any", "run", "SpikeInterface job kwarg, accepted for kilosort2 compatibility and unused: "
          "kilosort2 uses it to write its recording.dat copy, ks2py reads the recording in batches with its own "
          "read-ahead threads."),
    Param("chunk_duration", "1s", "any", "run", "SpikeInterface job kwarg, accepted for kilosort2 compatibility "
          "and unused: the batches are NT samples long."),
    Param("pool_engine", "process", "any", "run", "SpikeInterface job kwarg, accepted for kilosort2 compatibility "
          "and unused (no recording.dat copy is written)."),
    Param("mp_context", None, "any", "run", "SpikeInterface job kwarg, accepted for kilosort2 compatibility and "
          "unused (no recording.dat copy is written).", allow_none=True),
    Param("max_threads_per_worker", 1, "any", "run", "SpikeInterface job kwarg, accepted for kilosort2 "
          "compatibility and unused (no recording.dat copy is written)."),
)

PARAMS_BY_NAME = {p.name: p for p in PARAMS}
#: Kilosort's name of a param where ks2py's differs (a pykilosort script's params), for the error that names it
KILOSORT_NAMES = {p.ks2_name: p for p in PARAMS if p.ks2_name not in (None, p.name)}
TMP_FILES = ("matlab_files", "temp_wh.dat")


def default_params() -> dict:
    """The defaults as SpikeInterface expects them (a fresh dict each call)."""
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default) for p in PARAMS}


def params_description() -> dict:
    return {p.name: p.description for p in PARAMS}


def params_of_stage(stage: str) -> tuple[str, ...]:
    return tuple(p.name for p in PARAMS if p.stage == stage)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))


def _check_number(p: Param, v, what: str, integer: bool):
    if integer and not (isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))):
        raise ValueError(f"ks2py param {what} must be an integer, got {v!r}")
    if not _is_number(v) or not math.isfinite(v):
        raise ValueError(f"ks2py param {what} must be a finite number, got {v!r}")
    if (p.low is not None and v < p.low) or (p.high is not None and v > p.high):
        raise ValueError(f"ks2py param {what} = {v!r} is out of range [{p.low}, {p.high}]")


def _check_value(p: Param, v):
    if v is None:
        if p.allow_none:
            return
        raise ValueError(f"ks2py param '{p.name}' must not be None")
    if p.kind in ("int", "float"):
        _check_number(p, v, f"'{p.name}'", p.kind == "int")
    elif p.kind == "bool":
        if not isinstance(v, (bool, np.bool_)):
            raise ValueError(f"ks2py param '{p.name}' must be True or False, got {v!r}")
    elif p.kind in ("pair", "int_pair"):
        if not isinstance(v, (list, tuple, np.ndarray)) or len(v) != 2:
            raise ValueError(f"ks2py param '{p.name}' must be a list of two numbers, got {v!r}")
        for i, x in enumerate(v):
            _check_number(p, x, f"'{p.name}[{i}]'", p.kind == "int_pair")
    elif p.kind == "choice":
        if v not in p.choices:
            raise ValueError(f"ks2py param '{p.name}' must be one of {p.choices}, got {v!r}")
    elif p.kind == "path":
        if not isinstance(v, (str, bytes)) and not hasattr(v, "__fspath__"):
            raise ValueError(f"ks2py param '{p.name}' must be a folder path or None, got {v!r}")
    elif p.kind == "motion":
        if not (isinstance(v, (str, bytes)) or hasattr(v, "__fspath__") or type(v).__name__ == "Motion"):
            raise ValueError(f"ks2py param '{p.name}' must be a SpikeInterface Motion, the folder of a saved "
                             f"Motion, or None, got {v!r}")
    elif p.kind == "tmp_files":
        if isinstance(v, (bool, np.bool_)):
            return
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or any(x not in TMP_FILES for x in v):
            raise ValueError(f"ks2py param '{p.name}' must be True, False or a tuple of {TMP_FILES}, got {v!r}")
    elif p.kind == "any":
        return
    elif p.kind == "trange":
        if not isinstance(v, (list, tuple)) or len(v) != 2 or not _is_number(v[0]) or v[0] < 0 or not (
            v[1] is None or (_is_number(v[1]) and v[1] > v[0])
        ):
            raise ValueError(f"ks2py param '{p.name}' must be [start, stop] seconds with 0 <= start < stop "
                             f"(stop may be None or inf for the end), got {v!r}")
    else:  # pragma: no cover - a table entry with an unknown kind is a programming error
        raise AssertionError(p.kind)


def validate(params: dict, sampling_frequency: float | None = None) -> dict:
    """Check every option by name, type and range; return a complete dict (defaults filled in).

    Raises ValueError naming the first bad option. With the sampling frequency, the filter corners are checked
    against Nyquist as well.
    """
    unknown = sorted(set(params) - set(PARAMS_BY_NAME))
    if unknown:
        renamed = [f"'{name}' is '{KILOSORT_NAMES[name].name}'" for name in unknown if name in KILOSORT_NAMES]
        hint = f" (Kilosort's names: {', '.join(renamed)}, see docs/params.md)" if renamed else ""
        raise ValueError(f"unknown ks2py param(s) {unknown}{hint}; valid names are {sorted(PARAMS_BY_NAME)}")
    full = default_params()
    full.update(params)
    for p in PARAMS:
        _check_value(p, full[p.name])
    adjust_as_kilosort2(full)
    nt0min = full["nt0min"]
    if nt0min is not None and nt0min >= full["wave_length"]:
        raise ValueError(f"ks2py param 'nt0min' = {nt0min} must be smaller than wave_length = {full['wave_length']}")
    if nt0min is not None and sampling_frequency is not None:
        nt0 = template_length(full["wave_length"], sampling_frequency)
        if nt0min >= nt0:
            raise ValueError(f"ks2py param 'nt0min' = {nt0min} must be smaller than the template length: at "
                             f"{sampling_frequency:g} Hz wave_length={full['wave_length']} (samples at 30 kHz) gives "
                             f"templates of {nt0} samples; give nt0min < {nt0} (or None for ceil(20*nt0/61) = "
                             f"{math.ceil(20 * nt0 / 61)})")
    learning, final = full["projection_threshold"]
    if learning < final:
        raise ValueError(f"ks2py param 'projection_threshold' = {list(full['projection_threshold'])}: the first "
                         "(learning) threshold must be >= the second (final extraction), e.g. [10, 4]; reversed, "
                         "the cutoff would label every unit mua")
    cache_folder = full["cache_folder"]
    if cache_folder is not None and not os.fspath(cache_folder).strip():
        raise ValueError("ks2py param 'cache_folder' is empty: it would put the cache in the current directory; "
                         "give a folder path, or None for <output>/cache")
    if full["skip_kilosort_preprocessing"] and full["scaleproc"] is None:
        raise ValueError("ks2py param 'scaleproc' must be given when skip_kilosort_preprocessing=True (the scale of "
                         "the already-whitened recording, e.g. 200 for data whitened to unit variance x 200)")
    if full["fslow"] is not None and full["fslow"] <= full["freq_min"]:
        raise ValueError(f"ks2py param 'fslow' = {full['fslow']} must be above freq_min = {full['freq_min']}")
    if sampling_frequency is not None:
        nyquist = sampling_frequency / 2
        for name in ("freq_min", "fslow"):
            if full[name] is not None and full[name] >= nyquist:
                raise ValueError(f"ks2py param '{name}' = {full[name]} Hz must be below the Nyquist frequency "
                                 f"{nyquist} Hz of this recording")
    NT = full["NT"]
    if NT is not None and NT - full["ntbuff"] < 2 * full["wave_length"]:
        raise ValueError(f"ks2py param 'NT' = {NT} is too small: NT - ntbuff must be at least "
                         f"2 * wave_length = {2 * full['wave_length']} samples")
    return full


def drift_correction_on(params: dict) -> bool:
    """Whether the drift stage runs: do_correction and nblocks > 0, or a motion given."""
    return params["motion"] is not None or (bool(params["do_correction"]) and params["nblocks"] > 0)


def adjust_as_kilosort2(full: dict):
    """What SpikeInterface's kilosort2 wrapper does to its params, so that they mean the same here: an even
    wave_length is made odd, NT is rounded down to a multiple of 32."""
    if full["wave_length"] % 2 != 1:
        logger.warning("ks2py param wave_length = %d is even: %d is used (templates have a centre sample), as "
                       "kilosort2 does", full["wave_length"], full["wave_length"] + 1)
        full["wave_length"] += 1
    NT = full["NT"]
    if NT is not None and NT % 32:
        logger.warning("ks2py param NT = %d is rounded down to %d, a multiple of 32, as kilosort2 does", NT,
                       NT // 32 * 32)
        full["NT"] = NT // 32 * 32


def template_length(wave_length: int, fs: float) -> int:
    """nt0: wave_length (samples at 30 kHz) scaled to the rate fs, rounded to the nearest odd number."""
    nt0 = int(2 * round((wave_length * fs / 30000.0 - 1) / 2) + 1)
    if not 11 <= nt0 <= 127:
        raise ValueError(
            f"at {fs:g} Hz, wave_length={wave_length} (samples at 30 kHz) gives templates of {nt0} samples, outside "
            "the supported 11 to 127: change wave_length so that wave_length * fs / 30000 falls in that range"
        )
    return nt0


DEFAULT_STRIDE = 64 * 1024  # NT - ntbuff when NT is None
MIN_BATCHES = 4  # a sorted range of fewer default batches is cut into SHORT_BATCHES batches instead
SHORT_BATCHES = 8
MIN_SHORT_STRIDE = 8192


def default_batch_length(n_sorted: int, ntbuff: int) -> int:
    """NT for NT=None: 64*1024 + ntbuff; for a sorted range of fewer than MIN_BATCHES such batches, the batch
    that cuts it into SHORT_BATCHES (stride a multiple of 64, at least MIN_SHORT_STRIDE samples): learning from one
    or two batches (it sees the same one twice) found half the units of 4 s at 30 kHz, where 8 batches found as
    many as a 20 s recording. Longer recordings keep Kilosort's batch, so their results are unchanged."""
    if math.ceil(n_sorted / DEFAULT_STRIDE) >= MIN_BATCHES:
        return DEFAULT_STRIDE + ntbuff
    stride = max(MIN_SHORT_STRIDE, -(-n_sorted // (SHORT_BATCHES * 64)) * 64)
    return min(DEFAULT_STRIDE, stride) + ntbuff


def resolve(params: dict, sampling_frequency: float, n_samples: int) -> Bunch:
    """Validated user params -> the run parameters under their Kilosort names, with the derived sizes.

    ``n_samples`` is the length of the recording; the sorted range comes from ``trange``.
    """
    p = validate(params, sampling_frequency)
    fs = float(sampling_frequency)
    nt0 = template_length(p["wave_length"], fs)
    ntbuff = int(p["ntbuff"])
    t_start = int(math.ceil(p["trange"][0] * fs))
    stop = p["trange"][1]
    t_stop = n_samples if stop is None or not math.isfinite(stop) else min(n_samples, int(math.ceil(stop * fs)))
    if t_stop - t_start < nt0 * 2:
        raise ValueError(f"the sorted range has {max(0, t_stop - t_start)} samples: too short to sort (trange="
                         f"{p['trange']}, recording of {n_samples} samples)")
    n_sorted = t_stop - t_start
    NT = int(p["NT"]) if p["NT"] is not None else default_batch_length(n_sorted, ntbuff)
    # a batch is never longer than the sorted range (rounded up to 64 samples): batches are padded to NT, and
    # NT=2**24 on 10 s took more than 23 GB of host memory
    NT = min(NT, max(1024, -(-n_sorted // 64) * 64 + ntbuff))
    stride = NT - ntbuff
    Th = [float(x) for x in p["projection_threshold"]]
    return Bunch(
        fs=fs,
        fshigh=float(p["freq_min"]),
        fslow=None if p["fslow"] is None else float(p["fslow"]),
        CAR=bool(p["car"]),
        spkTh=-float(p["detect_threshold"]),
        Th=Th,
        ThPre=float(p["preclust_threshold"]),
        lam=float(p["lam"]),
        AUCsplit=float(p["AUCsplit"]),
        minFR=float(p["minFR"]),
        minfr_goodchannels=float(p["minfr_goodchannels"]),
        momentum=[float(x) for x in p["momentum"]],
        sigmaMask=float(p["sigmaMask"]),
        whiteningRange=int(p["whiteningRange"]),
        nSkipCov=int(p["nSkipCov"]),
        nskip=int(p["nskip"]),
        nPCs=int(p["nPCs"]),
        nfilt_factor=int(p["nfilt_factor"]),
        reorder=bool(p["reorder"]),
        do_correction=drift_correction_on(p),
        nblocks=int(p["nblocks"]),
        sig=float(p["sig"]),
        drift_kernel=str(p["drift_kernel"]),
        drift_spkTh=float(p["drift_detect_threshold"]),
        loc_range=[int(x) for x in p["loc_range"]],
        long_range=[int(x) for x in p["long_range"]],
        scaleproc=200.0 if p["scaleproc"] is None else float(p["scaleproc"]),
        skip_preprocessing=bool(p["skip_kilosort_preprocessing"]),
        gain=float(p["gain"]),
        seed=int(p["seed"]),
        nt0=nt0,
        nt0min=int(p["nt0min"]) if p["nt0min"] is not None else int(math.ceil(20 * nt0 / 61)),
        ntbuff=ntbuff,
        NT=NT,
        NTbuff=NT + 4 * ntbuff,
        t_start=t_start,
        t_stop=t_stop,
        n_samples=n_sorted,
        Nbatch=int(math.ceil(n_sorted / stride)),
        # template-learning constants that Kilosort 2.0 hard-codes
        Nrank=3,
        NrankPC=6,
        nInnerIter=60,
        p1=0.95,
    )


def markdown_reference() -> str:
    """The params reference of docs/params.md, generated from PARAMS."""
    lines = [
        "# Parameters",
        "",
        "Generated from `src/si_ks2py/params.py` (`si-ks2py params-doc > docs/params.md`); do not edit by hand.",
        "",
        "Pass them to `spikeinterface.sorters.run_sorter(\"ks2py\", recording, folder=..., **params)`. Names shared "
        "with SpikeInterface's `kilosort2` wrapper keep its meaning; *Kilosort name* is the field of Kilosort "
        "2.0's `ops` struct. A change to a param reruns its stage and every stage after it; `run` params never "
        "change results.",
        "",
    ]
    for stage in STAGES + ("run",):
        rows = [p for p in PARAMS if p.stage == stage]
        if not rows:
            continue
        lines += [f"## Stage `{stage}`", "", "| name | default | type / range | Kilosort name | description |",
                  "|---|---|---|---|---|"]
        for p in rows:
            rng = p.kind
            if p.low is not None:
                rng += f" in [{p.low:g}, {p.high:g}]"
            if p.choices:
                rng += " of " + ", ".join(map(repr, p.choices))
            if p.allow_none:
                rng += " or None"
            lines.append(f"| `{p.name}` | `{p.default!r}` | {rng} | {p.ks2_name or ''} | {p.description} |")
        lines.append("")
    return "\n".join(lines)

