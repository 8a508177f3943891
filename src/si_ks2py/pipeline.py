"""Runs the stages in order, skipping those whose outputs are cached for the same fingerprint.

Each stage's fingerprint chains the previous stage's fingerprint with the stage's version and the params it
reads (params.py says which), starting from a fingerprint of the recording. So a changed param reruns its stage
and everything after it, and a changed recording reruns everything.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import logging
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import __version__
from . import params as params_module
from .backend import get_ops
from .checks import check_recording_values
from .context import Context, Intermediate, fingerprint, folder_lock
from .export import queue_batch_figure, run_export
from .export.phy import STAGING
from .io import content_digest, release_whitened, unpin_whitened
from .logs import run_log
from .plots import FIGURES, FigureProcess
from .probe import probe_from_recording

logger = logging.getLogger("si_ks2py")

#: Cached stages in run order (export always runs). Bump a stage's version when its results change.
STAGES = tuple(s for s in params_module.STAGES if s != "export")
STAGE_VERSIONS = {"preprocess": 3, "drift": 1, "reorder": 6, "learn": 5, "extract": 3, "merge": 1, "split": 4, "cutoff": 1}


#: short windows of the recording whose bytes are in its fingerprint (the cheap part of the check of its content)
FINGERPRINT_WINDOWS = 32


def recording_fingerprint(recording, probe=None) -> str:
    """Shape, rate, dtype, channels, locations, the probe's channel map and shanks (kcoords), and the bytes of
    FINGERPRINT_WINDOWS short windows spread over the recording. The stage fingerprints chain from it; the rest of
    the samples are checked by check_recording_content."""
    n = recording.get_num_samples(segment_index=0)
    parts = [
        recording.get_sampling_frequency(),
        n,
        str(recording.get_dtype()),
        [str(c) for c in recording.get_channel_ids()],
        np.round(recording.get_channel_locations(), 6).tolist(),
    ]
    if probe is not None:
        parts.append([np.asarray(probe[k]).tolist() for k in ("chanMap", "xc", "yc", "kcoords")])
    for start in np.linspace(0, max(n - 256, 0), FINGERPRINT_WINDOWS).astype(int):
        traces = recording.get_traces(segment_index=0, start_frame=int(start), end_frame=int(min(n, start + 256)))
        parts.append(hashlib.sha256(np.ascontiguousarray(traces).tobytes()).hexdigest())
    return fingerprint(parts)


def active_stages(full_params: dict) -> tuple[str, ...]:
    """The stages this run goes through: the drift stage only where drift correction is on, so that a sort without
    it has the same stages (and cache) as Kilosort 2.0's pipeline."""
    return tuple(s for s in STAGES if s != "drift" or params_module.drift_correction_on(full_params))


def param_identity(name: str, value):
    """What of a param's value enters the fingerprints: the value, or for a Motion its content."""
    if name == "motion" and value is not None:
        from .stages.drift import motion_identity

        return motion_identity(value)
    return value


class _NotInFiles(Exception):
    pass


MAX_IDENTITY_FILES = 256  # files of a recording's folders whose sizes and times are checked, at most


def recording_identity(recording):
    """The cheap identity of a recording's content: the arguments it was made from (its kwargs, and those of the
    recordings it derives from), with each path that exists replaced by the path, size and modification time of
    the file (of each file under a folder, MAX_IDENTITY_FILES at most). None when some data is not in a file (an
    array of more than 1000 values among the kwargs, e.g. a NumpyRecording's traces), or when no file was found:
    then nothing cheap says the content is unchanged, and a rerun reads every sample again."""
    files = []

    def stat(path: Path):
        info = path.stat()
        files.append([str(path.absolute()), info.st_size, info.st_mtime_ns])
        if len(files) > MAX_IDENTITY_FILES:
            raise _NotInFiles

    def walk(value):
        if hasattr(value, "_kwargs") and hasattr(value, "get_traces"):
            return [type(value).__name__, walk(value._kwargs)]
        if isinstance(value, dict):
            return {str(k): walk(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v) for v in value]
        if isinstance(value, np.ndarray):
            if value.size > 1000:
                raise _NotInFiles
            return value.tolist()
        if isinstance(value, (str, Path)) and str(value) and os.path.exists(value):
            path = Path(value)
            for file in path.rglob("*") if path.is_dir() else [path]:  # stat raises past MAX_IDENTITY_FILES
                if file.is_file():
                    stat(file)
            return str(path.absolute())
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            return value.item()
        raise _NotInFiles  # an object whose content we cannot vouch for

    try:
        arguments = walk(recording)
    except (_NotInFiles, OSError):
        return None
    return fingerprint(arguments, sorted(files)) if files else None


def check_recording_content(ctx):
    """Before any stage is skipped: is the recording the one the cache was computed from? Its fingerprint (shape,
    channels, probe, sampled windows) is in every stage's; the rest is checked here. When the cheap identity
    (recording_identity) equals the one recorded by the cached preprocessing, yes; otherwise every sample is
    read again (io.content_digest, one pass) and compared with the digest preprocessing computed from the samples
    it read. A difference, or no record (a cache of an earlier version), drops the whole cache: every stage
    reruns."""
    ir, p = ctx.intermediate, ctx.params
    if not ir.stage_is_done("preprocess"):
        return  # nothing would be skipped
    entry, identity = ir.recorded_recording(), ctx.get("recording_identity")
    if entry is not None and identity is not None and entry["identity"] == identity:
        return
    if entry is not None:
        t = time.perf_counter()
        digest = content_digest(ctx.raw_data, p.t_start, p.t_stop, p.NT - p.ntbuff)
        if digest == entry["digest"]:
            logger.info("recording unchanged since the cached sort (every sample read and compared in %.2f s)",
                        time.perf_counter() - t)
            if identity is not None:
                ir.update_recorded_identity(identity)
            return
    logger.warning("the recording's samples differ from those of the cached sort in %s (or were not recorded): "
                   "every stage reruns", ir.folder)
    ir.forget_everything()


def stage_fingerprints(recording_fp: str, full_params: dict) -> dict[str, str]:
    fps, fp = {}, recording_fp
    for stage in active_stages(full_params):
        values = {name: param_identity(name, full_params[name]) for name in params_module.params_of_stage(stage)}
        fp = fingerprint(fp, stage, STAGE_VERSIONS[stage], values)
        fps[stage] = fp
    return fps


def stage_module(stage: str):
    try:
        return importlib.import_module(f"si_ks2py.stages.{stage}")
    except ModuleNotFoundError as err:
        if err.name != f"si_ks2py.stages.{stage}":
            raise
        raise NotImplementedError(f"ks2py stage '{stage}' is not implemented yet; the run stopped before it") from None


def check_recording(recording):
    """Errors about the recording that must come before any work."""
    if recording.get_num_segments() != 1:
        raise ValueError(
            f"ks2py sorts one segment, this recording has {recording.get_num_segments()}: join them with "
            "spikeinterface.concatenate_recordings([recording])"
        )


#: Stage modules imported with the op table, before the sort starts; the later ones (the post-processing, whose
#: imports of numba and the host op table take about 0.3 s) are imported in the background once learning starts:
#: its batches leave the interpreter idle while they wait for the GPU.
FIRST_STAGES = ("preprocess", "drift", "reorder", "learn", "extract")
PRELOAD_DURING = "learn"


def import_stage_modules(stages):
    for stage in stages:
        with contextlib.suppress(NotImplementedError):  # run_stages reports a missing stage
            stage_module(stage)


def import_code(device: str, params, n_channels: int):
    """(The op table of ``device``, the thread loading preprocessing's kernels or None): the op table and the first
    stage modules are imported (CuPy, CUDA's start: a few tenths of a second), then preprocessing's kernels are
    loaded in the background (on the GPU) for a recording of ``n_channels`` channels sorted with ``params``."""
    ops = get_ops(device)
    import_stage_modules(FIRST_STAGES)
    return ops, stage_module("preprocess").load_kernels(ops, params, n_channels)


def preload_later_stages():
    """Import the stage modules after FIRST_STAGES in a background thread."""
    later = [stage for stage in STAGES if stage not in FIRST_STAGES]

    def preload():
        with contextlib.suppress(Exception):  # an import error comes again where its stage runs
            import_stage_modules(later)

    threading.Thread(target=preload, name="ks2py-preload", daemon=True).start()


#: host bytes that batches of NT samples take, per sample and channel (float32): 23 GB were seen for NT=2**24 and
#: 16 channels (several float32 and float64 copies of a batch, three batches side by side)
BATCH_HOST_BYTES = 24 * 4


def available_host_memory() -> int | None:
    """Bytes of memory available now (Linux's MemAvailable: free memory and the page cache it can reclaim), or
    None where the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_batch_memory(params, n_channels: int):
    """ValueError, before any work, when the batches of NT samples would need more host memory than is available
    (about BATCH_HOST_BYTES per sample and channel), naming NT and a value that fits."""
    available, need = available_host_memory(), BATCH_HOST_BYTES * params.NTbuff * n_channels
    if available is None or need <= available:
        return
    fits = max(1024 + params.ntbuff, int(params.NT * available / need) // 1024 * 1024 + params.ntbuff)
    raise ValueError(f"NT={params.NT} needs about {need / 1e9:.1f} GB of host memory for its batches of {n_channels} "
                     f"channels, more than the {available / 1e9:.1f} GB available: lower NT (e.g. NT={fits}, or None "
                     "for the default)")


def cache_folder_of(output_folder, params: dict) -> Path:
    """The cache folder of a sort: the ``cache_folder`` param, by default <output>/cache."""
    folder = params.get("cache_folder")
    return Path(output_folder) / "cache" if folder is None else Path(folder)


def build_context(recording, output_folder, user_params: dict | None = None, verbose: bool = True) -> Context:
    """Validate everything, resolve params and probe, open the cache: all before any heavy work. A thread imports
    the code of the sort meanwhile (its imports run mostly while this thread reads and checks the recording)."""
    check_recording(recording)
    full = params_module.validate(user_params or {}, recording.get_sampling_frequency())
    run_params = params_module.resolve(full, recording.get_sampling_frequency(), recording.get_num_samples(0))
    if full["NT"] is None and run_params.NT != params_module.DEFAULT_STRIDE + run_params.ntbuff:
        logger.info("NT=%d (%d batches): the sorted range is shorter than %d batches of the default NT=%d (pass NT "
                    "to choose)", run_params.NT, run_params.Nbatch, params_module.MIN_BATCHES,
                    params_module.DEFAULT_STRIDE + run_params.ntbuff)
    check_batch_memory(run_params, recording.get_num_channels())
    with ThreadPoolExecutor(max_workers=1) as importer:
        imported = importer.submit(import_code, full["device"], run_params, recording.get_num_channels())
        probe = probe_from_recording(recording)
        check_recording_values(recording, run_params.t_start, run_params.t_stop)
        output_folder = Path(output_folder)
        output_folder.mkdir(parents=True, exist_ok=True)
        cache_folder = cache_folder_of(output_folder, full)
        fps = stage_fingerprints(recording_fingerprint(recording, probe), full)
        identity = recording_identity(recording)
        ops, kernels_loading = imported.result()
    return Context(
        raw_data=recording,
        probe=probe,
        params=run_params,
        user_params=full,
        intermediate=Intermediate(cache_folder, fps),
        ops=ops,
        output_folder=output_folder,
        show_progress=bool(full["progress"]) and bool(full["progress_bar"]) and verbose,
        timings={},
        whitened=None,
        whitened_pinning=None,
        figures=None,
        kernels_loading=kernels_loading,
        recording_identity=identity,
    )


def _declared(stage: str, attribute: str) -> tuple:
    """A stage module's OUTPUTS / FILES / FILE_INPUTS; None for a stage not implemented yet."""
    try:
        return getattr(stage_module(stage), attribute)
    except NotImplementedError:
        return None


def stages_to_run(ctx, stages: tuple[str, ...]) -> list[str]:
    """From the first stage that is not cached on; plus the producer of a missing file a running stage reads."""
    ir = ctx.intermediate

    def done(stage):
        outputs, files = _declared(stage, "OUTPUTS"), _declared(stage, "FILES")
        return (outputs is not None and ir.stage_is_done(stage) and all(ir.has(name) for name in outputs)
                and all(ir.has_file(name) for name in files))

    first = next((i for i, stage in enumerate(stages) if not done(stage)), len(stages))
    to_run = list(stages[first:])
    if first == 0:  # nothing cached: nothing to produce again (nor any later stage module to import now)
        return to_run
    needed = {f for stage in to_run for f in (_declared(stage, "FILE_INPUTS") or ()) if not ir.has_file(f)}
    producers = [s for s in stages[:first] if needed & set(_declared(s, "FILES"))]
    return producers + to_run


def is_device_out_of_memory(err: BaseException) -> bool:
    """CuPy's OutOfMemoryError, or a CUDA library (cuBLAS, cuFFT, cuSOLVER) that could not allocate."""
    return type(err).__name__ == "OutOfMemoryError" or "ALLOC_FAILED" in str(err)


def out_of_memory_advice(stage: str, params, err: BaseException) -> str:
    half = max(params.ntbuff + 2 * params.nt0, (params.NT // 2) // 32 * 32)
    return (f"the GPU ran out of memory in the '{stage}' stage ({type(err).__name__}: {err}). GPU memory grows "
            f"with the batch length NT (now {params.NT} samples) and the channel count: rerun with a smaller NT, "
            f"e.g. NT={half}, or free the GPU of other work, or use device='cpu'. Finished stages are cached and "
            "are not redone.")


def run_stages(ctx: Context, stop_after: str | None = None) -> Context:
    ir = ctx.intermediate
    stages = active_stages(ctx.user_params)
    if stop_after is not None:
        stages = stages[:stages.index(stop_after) + 1]
    check_recording_content(ctx)
    to_run = stages_to_run(ctx, stages)
    # the drift stage corrects the in-memory whitened copy in place and writes the file from it: preprocessing
    # then leaves the file to it
    ctx.whitened_file_by_drift = "drift" in to_run and "preprocess" in to_run
    try:
        for stage in stages:
            if stage == PRELOAD_DURING:
                preload_later_stages()
            if stage not in to_run:
                logger.info("%-10s cached, skipped", stage)
            else:
                run_stage(ctx, stage)
            if stage == "reorder" and ctx.get("figures") is not None:  # drawn while the later stages run
                queue_batch_figure(ctx.figures, ir)
    finally:
        ir.wait_for_files()  # e.g. the whitened file, written while the later stages ran
        unpin_whitened(ctx)  # no stage after these reads the in-memory copy
    return ctx


def run_stage(ctx: Context, stage: str):
    ir = ctx.intermediate
    module = stage_module(stage)
    ir.current_stage = stage
    t0 = time.perf_counter()
    try:
        module.run(ctx)
        ctx.ops.synchronize()
        ctx.ops.release_memory()
    except Exception as err:
        if is_device_out_of_memory(err):
            raise MemoryError(out_of_memory_advice(stage, ctx.params, err)) from err
        raise
    ctx.timings[stage] = time.perf_counter() - t0
    ir.mark_stage_done(stage)
    ir.current_stage = None
    logger.info("%-10s done in %.2f s", stage, ctx.timings[stage])


def run(recording, output_folder, params: dict | None = None, verbose: bool = True, stop_after: str | None = None):
    """Sort ``recording`` into ``output_folder``; returns the Context (its timings say what ran)."""
    output_folder = Path(output_folder)
    output_folder.mkdir(parents=True, exist_ok=True)
    params_module.validate(params or {}, recording.get_sampling_frequency())  # refused before a folder is locked
    with contextlib.ExitStack() as locks:  # held until the sort ends; a second sort of a folder fails at once
        locks.enter_context(folder_lock(output_folder, "output folder"))
        locks.enter_context(folder_lock(cache_folder_of(output_folder, params or {}), "cache folder"))
        return run_locked(recording, output_folder, params, verbose, stop_after)


#: temporary files of a sort that a killed or failed one may leave: in the cache folder (context.py's temporary
#: files and extraction's spill files), in qc/ (the figures' job files, plots.FigureProcess)
CACHE_LITTER = re.compile(r"^\..+\.part$")
QC_LITTER = re.compile(r"^\.(" + "|".join(FIGURES) + r")\.[0-9a-f]{8}\.\d+\.npz$")


def remove_litter(output_folder: Path, cache_folder: Path):
    """Delete what an interrupted sort left: files of our temporary patterns only (CACHE_LITTER, QC_LITTER, the
    export's staging folder). Called with both folders locked, so no running sort owns them."""
    litter = [f for f in cache_folder.iterdir() if CACHE_LITTER.match(f.name) and f.is_file()]
    if (output_folder / "qc").is_dir():
        litter += [f for f in (output_folder / "qc").iterdir() if QC_LITTER.match(f.name) and f.is_file()]
    for f in litter:
        f.unlink(missing_ok=True)
    staging = output_folder / STAGING
    if staging.is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        litter.append(staging)
    if litter:
        logger.info("removed %d temporary files left by an interrupted sort", len(litter))


def run_locked(recording, output_folder: Path, params, verbose: bool, stop_after: str | None):
    with run_log(output_folder, verbose):
        remove_litter(output_folder, cache_folder_of(output_folder, params or {}))
        ctx = build_context(recording, output_folder, params, verbose)
        logger.info("ks2py %s: %d channels, %.1f s, device %s", __version__, len(ctx.probe.chanMap),
                    ctx.params.n_samples / ctx.params.fs, ctx.ops.name)
        with contextlib.ExitStack() as stack:
            if stop_after is None and ctx.user_params["fig"]:  # started now: its imports are done by the export
                ctx.figures = stack.enter_context(FigureProcess(output_folder))
            run_stages(ctx, stop_after)
            if stop_after is None:
                run_export(ctx)
                release_whitened(ctx)
    return ctx
