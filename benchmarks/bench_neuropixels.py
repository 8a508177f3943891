"""Benchmark against Kilosort 4 on Neuropixels 1.0: one command generates the recordings, sorts them with ks2py
and kilosort4, and prints for each sort the wall time, x realtime, per-stage times, GPU and host memory peaks and
the accuracy against the ground truth.

    python benchmarks/bench_neuropixels.py --duration 300 --units 200 --workdir /tmp/npx --n-jobs 16 \
        --json results.json

The recordings come from SpikeInterface's generate_drifting_recording (384 channels of a Neuropixels 1.0 probe,
``--units`` units, once static and once with its default zigzag drift); they are saved as int16 binary folders
first (not timed) and reused by a later call with the same arguments and the same ``--workdir``. Each sort runs
in its own process, so its GPU memory (sampled through NVML, above what the GPU held before) and its host peak
(max RSS) are its own. ``--warmup`` first sorts every set with ks2py (not timed as a result) so that the timed
sorts find every kernel compiled in CuPy's (and numba's) disk cache; the warm-up times are printed, the first one
as the first-run (compile) time. A smaller warm-up leaves kernels uncompiled: CuPy compiles variants of some
kernels by the size of their input (a 60 s warm-up left two, 0.3 s of compilation, to the first 300 s sort; a
10 s one left the split's code, whose clusters it never gives the 300 spikes a split needs; a warm-up on the
static set alone left the first drift sort 5 s of learning more than the next one). ``--repeats N`` sorts each set N times
with ks2py and prints the median: the same code varies by 1-3 s between sorts on one machine. Before each sort the
disk's dirty pages are flushed (``os.sync``), so that the writeback of the sort before does not overlap it.

kilosort4 is run through spikeinterface.sorters.run_sorter with its defaults (drift correction on); its stage
times are the ``runtime_*`` entries of its ops.npy. Every sort is scored with SpikeInterface's
compare_sorter_to_ground_truth (exhaustive ground truth, all units of the sort, good and mua).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

SETS = ("static", "drift", "np2")
SORTERS = ("ks2py", "ks2py_nocorrection", "ks2py_ks25kernel", "kilosort4")
#: ks2py variants: extra params of their sorts
KS2PY_PARAMS = {"ks2py": {}, "ks2py_nocorrection": {"do_correction": False},
                "ks2py_ks25kernel": {"drift_kernel": "exponential"}}


def neuropixels_1_probe(num_channels: int = 384):
    from probeinterface.neuropixels_tools import build_neuropixels_probe

    probe = build_neuropixels_probe("NP1000").get_slice(np.arange(num_channels))
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def neuropixels_2_four_shanks():
    """A Neuropixels 2.0 4-shank layout of 384 channels: 4 shanks 250 um apart, each 2 columns 32 um apart of 48
    sites every 15 um (96 channels a shank)."""
    from probeinterface import generate_multi_shank

    probe = generate_multi_shank(num_shank=4, shank_pitch=[250, 0], num_columns=2, num_contact_per_column=48,
                                 xpitch=32, ypitch=15, contact_shapes="square", contact_shape_params={"width": 12})
    probe.set_device_channel_indices(np.arange(probe.get_contact_count()))
    return probe


def generate_np2_set(args, folder: Path, gt_folder: Path):
    """The 4-shank set: a non-rigid zigzag drift (amplitude falling with depth, gradient 0.5) plus bumps, within
    20 to -20 um."""
    from spikeinterface.generation import generate_drifting_recording

    _, drifting, gt, extra = generate_drifting_recording(
        num_units=args.units, duration=args.duration, sampling_frequency=30000.0,
        probe=neuropixels_2_four_shanks(), seed=args.seed + 1, extra_outputs=True,
        generate_displacement_vector_kwargs=dict(
            displacement_sampling_frequency=5.0, drift_start_um=[0, 20], drift_stop_um=[0, -20], drift_step_um=1,
            motion_list=[dict(drift_mode="zigzag", amplitude_factor=0.6, non_rigid_gradient=0.5,
                              t_start_drift=30.0, t_end_drift=None, period_s=150),
                         dict(drift_mode="bump", amplitude_factor=0.4, non_rigid_gradient=None,
                              t_start_drift=60.0, t_end_drift=None, bump_interval_s=(30, 90.0))]),
    )
    drifting.astype("int16").save(folder=folder, overwrite=True, n_jobs=args.n_jobs, chunk_duration="1s",
                                  progress_bar=False)
    gt.set_property("depth_um", extra["unit_locations"][:, 1])
    gt.save(folder=gt_folder, overwrite=True)


def generate_sets(args, work: Path) -> dict[str, Path]:
    """Save the requested recordings (static, drift; int16) and the ground truth under ``work``; reuse the ones
    saved earlier with the same arguments."""
    from spikeinterface.generation import generate_drifting_recording

    tag = {"duration": args.duration, "units": args.units, "seed": args.seed, "channels": args.channels}
    folders = {name: work / f"recording_{name}" for name in SETS} | {"gt": work / "ground_truth",
                                                                     "gt_np2": work / "ground_truth_np2"}
    stamp = work / "generated.json"
    saved = json.loads(stamp.read_text()) if stamp.exists() else {}
    if saved.get("tag") != tag:
        saved = {"tag": tag, "sets": []}
    missing = [name for name in args.sets if name not in saved["sets"] or not folders[name].exists()]
    if not missing:
        print(f"recordings reused from {work}", flush=True)
        return folders
    t = time.perf_counter()
    if "np2" in missing:
        generate_np2_set(args, folders["np2"], folders["gt_np2"])
    neuropixels_1 = [name for name in missing if name != "np2"]
    if neuropixels_1:
        static, drifting, gt, extra = generate_drifting_recording(
            num_units=args.units, duration=args.duration, sampling_frequency=30000.0,
            probe=neuropixels_1_probe(args.channels), seed=args.seed, extra_outputs=True,
        )
        gt.set_property("depth_um", extra["unit_locations"][:, 1])
        gt.save(folder=folders["gt"], overwrite=True)
    for name in neuropixels_1:
        recording = (static if name == "static" else drifting).astype("int16")  # uV floats, noise std 6-8 uV
        recording.save(folder=folders[name], overwrite=True, n_jobs=args.n_jobs, chunk_duration="1s",
                       progress_bar=False)
    saved["sets"] = sorted(set(saved["sets"]) | set(missing))
    stamp.write_text(json.dumps(saved))
    print(f"recordings {missing} generated and saved in {time.perf_counter() - t:.1f} s (not counted)", flush=True)
    return folders


class MemoryInfo(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class GpuMemorySampler:
    """Peak GPU memory used (MiB) above the level when it started, read every 100 ms through NVML (libnvidia-ml,
    which nvidia-smi is built on) by a thread of this process: lighter than an nvidia-smi process sampling in a
    loop beside the sort."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s = interval_s
        self.peak = self.baseline = None
        self.stop = threading.Event()

    def _used_mib(self) -> int:
        info = MemoryInfo()
        if self.nvml.nvmlDeviceGetMemoryInfo(self.handle, ctypes.byref(info)) != 0:
            raise OSError("nvmlDeviceGetMemoryInfo failed")
        return info.used // 2 ** 20

    def __enter__(self):
        try:
            self.nvml = ctypes.CDLL("libnvidia-ml.so.1")
            self.handle = ctypes.c_void_p()
            if self.nvml.nvmlInit_v2() != 0 or self.nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)):
                return self
            self.baseline = self.peak = self._used_mib()
        except OSError:  # no NVIDIA driver: no GPU figure
            return self
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.wait(self.interval_s):
            self.peak = max(self.peak, self._used_mib())

    def __exit__(self, *exc):
        if self.baseline is not None:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.peak, self._used_mib())

    @property
    def peak_mib(self):
        return None if self.peak is None else self.peak - self.baseline


class PoolPeaks:
    """Peak bytes held by CuPy's memory pool in each stage of a ks2py sort, as {stage: MiB}: the pool keeps every
    block it allocated until it is released (after each stage, between preprocessing's passes and between the
    split's groups), so its largest size then is the peak (empty for a CPU sort). The op table's release is
    wrapped when the first stage starts, so that CuPy is imported where the sort imports it (in its import thread,
    beside the checks of the recording), not before the sort."""

    def __enter__(self):
        import si_ks2py.pipeline as pipeline

        self.peaks = {}
        run_stage, stage, wrapped = pipeline.run_stage, [], []

        def tracked(ctx, name):
            if not wrapped and ctx.ops.name == "cuda":
                import cupy

                pool, ops, release = cupy.get_default_memory_pool(), ctx.ops, ctx.ops.release_memory

                def measured_release():
                    self.peaks[stage[0]] = max(self.peaks.get(stage[0], 0.0), pool.total_bytes() / 2 ** 20)
                    release()

                ops.release_memory = measured_release
                wrapped.append(lambda: setattr(ops, "release_memory", release))
            stage[:] = [name]
            return run_stage(ctx, name)

        pipeline.run_stage = tracked
        self.restore = lambda: [setattr(pipeline, "run_stage", run_stage)] + [undo() for undo in wrapped]
        return self

    def __exit__(self, *exc):
        self.restore()


@contextlib.contextmanager
def timed_setup():
    """[seconds] of the sort's build_context (imports, checks of the recording, fingerprint, cache), once done."""
    import si_ks2py.pipeline as pipeline

    build, seconds = pipeline.build_context, []

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return build(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - t)

    pipeline.build_context = timed
    try:
        yield seconds
    finally:
        pipeline.build_context = build


def sort_ks2py(recording, folder: Path, params: dict) -> dict:
    t = time.perf_counter()
    from si_ks2py.pipeline import run

    imported = time.perf_counter()
    with PoolPeaks() as pool, timed_setup() as setup:
        ctx = run(recording, folder, {"device": "auto", "progress": False, **params}, verbose=False)
    stages = dict(ctx.timings, setup=setup[0])
    stages["other"] = time.perf_counter() - imported - sum(stages.values())  # the log, the figure process
    stages["import"] = imported - t  # the package (the recording's SpikeInterface modules are loaded already)
    device, t = ctx.ops.name, time.perf_counter()
    del ctx  # the context's memory (the whitened copy) is given back when the caller drops it
    stages["release"] = time.perf_counter() - t
    return {"stages_s": stages, "device": device, "pool_peak_mib": pool.peaks}


def sort_kilosort4(recording, folder: Path, params: dict) -> dict:
    from spikeinterface.sorters import run_sorter

    run_sorter("kilosort4", recording, folder=folder, remove_existing_folder=True, verbose=False)
    ops = np.load(folder / "sorter_output" / "ops.npy", allow_pickle=True).item()
    return {"stages_s": {k.removeprefix("runtime_"): float(v) for k, v in ops.items() if k.startswith("runtime_")}}


def read_sorted(sorter: str, folder: Path):
    if sorter.startswith("ks2py"):
        from si_ks2py.export.sorting import read_sorting

        return read_sorting(folder)
    from spikeinterface.sorters import read_sorter_folder

    return read_sorter_folder(folder)


def profiled(sort, sorter: str, recording, folder: Path, path: Path) -> dict:
    """Run ``sort`` under cProfile (main thread only) and write the 60 costliest calls, by total time and by time
    with callees, to ``path``."""
    import cProfile

    from profile_stage import profile_summary  # beside this script

    profile = cProfile.Profile()
    result = profile.runcall(sort, recording, folder, KS2PY_PARAMS.get(sorter, {}))
    path.write_text(profile_summary(profile, 60))
    return result


def child(args):
    """One sort in this process; prints its result as one JSON line."""
    import spikeinterface.core as sc

    from si_ks2py.demo import score, summary

    recording = sc.load(args.recording)
    folder = Path(args.folder)
    shutil.rmtree(folder, ignore_errors=True)
    sort = sort_kilosort4 if args.child == "kilosort4" else sort_ks2py
    t = time.perf_counter()
    if args.profile:
        result = profiled(sort, args.child, recording, folder, Path(args.profile))
    else:
        result = sort(recording, folder, KS2PY_PARAMS.get(args.child, {}))
    wall = time.perf_counter() - t
    result["stages_s"].setdefault("other", wall - sum(result["stages_s"].values()))  # e.g. the wrapper's copy
    duration = recording.get_num_samples() / recording.sampling_frequency
    result.update(wall_s=wall, duration_s=duration, x_realtime=duration / wall,
                  host_peak_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    if not args.unscored:
        gt = sc.load(args.gt)
        comparison = score(gt, read_sorted(args.child, folder))
        result.update(summary(comparison))
        result["missed"] = missed_units(gt, comparison, duration)
    print("RESULT " + json.dumps(result), flush=True)


def missed_units(gt, comparison, duration_s: float) -> dict:
    """The ground-truth units under accuracy 0.8: how many per fifth of the probe's depth (the units' depths as
    generated), and how many of them fire under 2 Hz; with their accuracies."""
    accuracy = comparison.get_performance()["accuracy"].to_numpy(dtype=float)
    rates = np.array([len(gt.get_unit_spike_train(u)) for u in gt.unit_ids]) / duration_s
    missed = accuracy < 0.8
    out = {"accuracies": np.round(accuracy[missed], 2).tolist(), "under_2_hz": int((rates[missed] < 2).sum())}
    if "depth_um" in gt.get_property_keys():
        depth = gt.get_property("depth_um")
        edges = np.linspace(depth.min(), depth.max() + 1e-6, 6)
        out["per_fifth_of_depth"] = np.histogram(depth[missed], edges)[0].tolist()
        out["units_per_fifth"] = np.histogram(depth, edges)[0].tolist()
    return out


def run_child(sorter: str, recording: Path, gt: Path, folder: Path, scored: bool = True,
              profile: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", sorter, "--recording", str(recording), "--gt", str(gt),
               "--folder", str(folder)] + ([] if scored else ["--unscored"])
    if profile is not None:
        command += ["--profile", str(profile)]
    os.sync()  # the sort before wrote ~7 GB (whitened file, Phy folder): its writeback must not overlap this one
    with GpuMemorySampler() as memory:
        done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{sorter} failed (exit {done.returncode}):\n{done.stderr[-3000:]}", flush=True)
        return {"failed": True}
    result = json.loads(lines[-1].removeprefix("RESULT "))
    result["gpu_peak_mib"] = memory.peak_mib
    return result


def report(name: str, sorter: str, r: dict) -> str:
    if r.get("failed"):
        return f"{name:<7}{sorter:<19} failed"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages_s"].items())
    gpu = "n/a" if r.get("gpu_peak_mib") is None else f"{r['gpu_peak_mib'] / 1024:.2f} GB"
    peaks = r.get("pool_peak_mib") or {}
    pool_peaks = f"\n{'':17}memory pool peak (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in peaks.items())
    return (f"{name:<7}{sorter:<19} wall {r['wall_s']:7.1f} s = {r['x_realtime']:5.1f}x realtime, GPU peak {gpu}, "
            f"host peak {r['host_peak_mib'] / 1024:.1f} GB; GT >= 0.8: {r['accuracy_0.8']}/{r['gt_units']}, "
            f">= 0.95: {r['accuracy_0.95']}, units {r['sorted_units']}, false positive {r['false_positive']}, "
            f"redundant {r['redundant']}\n{'':17}stages (s): {stages}" + (pool_peaks if peaks else "")
            + (f"\n{'':17}missed: {r['missed']}" if r.get("missed") else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--channels", type=int, default=384)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--sorters", nargs="+", choices=SORTERS, default=list(SORTERS))
    parser.add_argument("--workdir", required=False, default="ks2py_bench")
    parser.add_argument("--n-jobs", type=int, default=os.cpu_count())
    parser.add_argument("--warmup", action="store_true",
                        help="sort every set with ks2py first, untimed (kernel compilation)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="sort each set this many times with ks2py (kilosort4 once) and print the median")
    parser.add_argument("--json", default=None, help="append the results to this JSON-lines file")
    parser.add_argument("--profile", default=None,
                        help="folder for a cProfile summary of each sort (main thread), profile_<set>_<sorter>.txt")
    parser.add_argument("--child", choices=SORTERS, help=argparse.SUPPRESS)
    parser.add_argument("--recording", help=argparse.SUPPRESS)
    parser.add_argument("--gt", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--unscored", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    # matplotlib's font cache is built once per machine; where the home folder is not writable it would be rebuilt
    # by every sort (seconds), which no user sees twice
    os.environ.setdefault("MPLCONFIGDIR", str((work / "mplconfig").absolute()))
    folders = generate_sets(args, work)
    for name in args.sets if args.warmup and "ks2py" in args.sorters else ():
        r = run_child("ks2py", folders[name], folders["gt"], work / "sort_warmup", scored=False)  # unscored
        if not r.get("failed"):
            print(f"ks2py warm-up on {name} (kernel compilation): {r['wall_s']:.1f} s", flush=True)
        shutil.rmtree(work / "sort_warmup", ignore_errors=True)  # the disk holds both sets and every sort's folder
    for name in args.sets:
        for sorter in args.sorters:
            walls = []
            for repeat in range(args.repeats if sorter == "ks2py" else 1):
                profile = None if args.profile is None else Path(args.profile) / f"profile_{name}_{sorter}.txt"
                gt = folders["gt_np2" if name == "np2" else "gt"]
                r = run_child(sorter, folders[name], gt, work / f"sort_{name}_{sorter}", profile=profile)
                print(report(name, sorter, r), flush=True)
                walls += [] if r.get("failed") else [r["wall_s"]]
                if args.json:
                    with open(args.json, "a") as f:
                        f.write(json.dumps({"set": name, "sorter": sorter, "duration_s": args.duration,
                                            "units": args.units, "repeat": repeat, **r}) + "\n")
            if len(walls) > 1:
                median = float(np.median(walls))
                print(f"{name:<7}{sorter:<10} median wall of {len(walls)} sorts {median:.1f} s = "
                      f"{args.duration / median:.1f}x realtime (range {min(walls):.1f}-{max(walls):.1f} s)", flush=True)


if __name__ == "__main__":
    main()
