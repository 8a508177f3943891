"""One ks2py sort with a timeline of its main calls: when each started and ended (seconds from the start of the
sort, any thread), their summed time and the time of the first call, the chunk times of preprocessing's passes,
and the time CuPy spent loading (or compiling) kernel modules. No synchronisation is added, so the sort runs as it
would without it: a GPU op's time is the host's time to queue it, except where it waits for results (to_host is
the host's waits for the GPU, wherever they happen). The stage modules whose calls are timed are imported before
the sort starts (they import no CuPy; the op table, which does, is wrapped when the sort's import thread loads it).

    python benchmarks/sort_timeline.py RECORDING_FOLDER OUTPUT_FOLDER

The output folder is replaced. Run it after a warm-up sort (see bench_neuropixels.py), or the module loads
include the compilation of every kernel.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import threading
import time
from collections import defaultdict

import numpy as np

#: (module, functions) whose calls are timed
TIMED = {
    "si_ks2py.pipeline": ("build_context", "import_code", "recording_fingerprint", "check_recording_values",
                          "get_ops", "run_stage", "run_export"),
    "si_ks2py.stages.preprocess": ("get_good_channels", "chunk_crossings", "get_whitening_matrix",
                                   "chunk_covariance", "write_whitened", "whiten_chunk", "filter_traces"),
    "si_ks2py.stages.reorder": ("extract_pc_from_snippets", "cluster_batches", "batch_distances", "sort_batches"),
    "si_ks2py.stages.learn": ("extract_templates_from_snippets", "seed_templates", "sort_by_channel",
                              "match_and_update"),
    "si_ks2py.stages.split": ("split_all_clusters",),
    "si_ks2py.templates": ("triage", "similarity"),
    "si_ks2py.export.phy": ("write_small_files", "save_rows"),
}
#: ops of the op table (timed where the GPU's is used)
TIMED_OPS = ("to_host", "column_sums", "filtfilt_zero_state", "row_median", "pc_threshold_spikes", "prototype_spikes",
             "svd_templates", "neighbor_xcorr", "match_pursuit", "accumulate_templates", "pc_features", "pin_host",
             "copy_to_host")
CHUNKS = ("chunk_crossings", "whiten_chunk")


def record_calls(events: list):
    """Wrap the TIMED functions (and the figure process's start and wait) to append (name, start, end)."""
    import importlib

    from si_ks2py import context, io, plots

    def wrap(owner, name, label=None):
        function = getattr(owner, name)

        @functools.wraps(function)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                events.append((label or name, t, time.perf_counter()))

        setattr(owner, name, timed)

    for module_name, names in TIMED.items():
        module = importlib.import_module(module_name)
        for name in names:
            wrap(module, name)
    pipeline = importlib.import_module("si_ks2py.pipeline")
    get_ops, wrapped = pipeline.get_ops, []

    def get_timed_ops(device):  # the op table's calls wrapped where the sort's import thread loads it
        ops = get_ops(device)
        if not wrapped:
            wrapped.append(ops)
            for name in TIMED_OPS:
                wrap(ops, name, f"ops.{name}")
        return ops

    pipeline.get_ops = get_timed_ops
    wrap(io.RecordingReader, "read_staged", "RecordingReader.read_staged")
    wrap(io.RecordingReader, "to_device", "RecordingReader.to_device")
    wrap(context.Intermediate, "wait_for_files", "wait for the whitened file")
    wrap(plots.FigureProcess, "__init__", "figure processes start")
    wrap(plots.FigureProcess, "close", "figure processes wait")


def record_module_loads(loads: list):
    """Time CuPy's loads of kernel modules (from its disk cache, or compiled on a miss) as (first kernel's name,
    thread, start, end); nothing without CuPy."""
    try:
        import cupy.cuda.compiler as compiler
    except ImportError:
        return
    load = compiler._compile_module_with_cache

    def timed(source, *args, **kwargs):
        t = time.perf_counter()
        try:
            return load(source, *args, **kwargs)
        finally:
            found = re.search(r"__global__\s+void\s+(\w+)", source)
            loads.append((found.group(1) if found else "?", threading.current_thread().name, t,
                          time.perf_counter()))

    compiler._compile_module_with_cache = timed


def huge_pages() -> str:
    """The transparent huge page setting and this process's resident and huge-page memory (Linux; '' elsewhere)."""
    try:
        enabled = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip()
        rollup = open("/proc/self/smaps_rollup").read()
    except OSError:
        return ""
    return f"THP {enabled}; " + "; ".join(" ".join(line.split()) for line in rollup.splitlines()
                                         if "Huge" in line or line.startswith("Rss"))


def release_context(ctx):
    """Drop the context's fields one by one, as the caller of run does at once when it lets go of the context,
    and print the time of each one that takes over 20 ms with its costliest calls (cProfile)."""
    import cProfile
    import pstats

    total = time.perf_counter()
    for key in list(ctx):
        profile, t = cProfile.Profile(), time.perf_counter()
        profile.runcall(ctx.__setitem__, key, None)
        if time.perf_counter() - t > 0.02:
            print(f"  releasing ctx.{key}: {time.perf_counter() - t:.3f} s")
            pstats.Stats(profile).sort_stats("cumulative").print_stats(8)
    print(f"  context released in {time.perf_counter() - total:.3f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", help="the recording's SpikeInterface folder")
    parser.add_argument("output", help="output folder of the sort (replaced)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    import spikeinterface.core as sc

    from si_ks2py.pipeline import run

    recording = sc.load(args.recording)
    shutil.rmtree(args.output, ignore_errors=True)
    events, loads = [], []
    record_calls(events)
    record_module_loads(loads)
    t0 = time.perf_counter()
    ctx = run(recording, args.output, {"device": args.device, "progress": False}, verbose=False)
    wall = time.perf_counter() - t0
    print(f"sort {wall:.2f} s; stages: " + ", ".join(f"{k} {v:.2f}" for k, v in ctx.timings.items()))
    print(f"  memory at the end: {huge_pages()}")
    release_context(ctx)
    calls = defaultdict(list)
    for name, start, end in events:
        calls[name].append((start - t0, end - t0))
    print(f"  {'call':<32} {'calls':>5} {'summed s':>9} {'first s':>8} {'first start':>12} {'last end':>9}")
    for name, spans in sorted(calls.items(), key=lambda item: min(s for s, _ in item[1])):
        first = min(spans)
        print(f"  {name:<32} {len(spans):5d} {sum(e - s for s, e in spans):9.3f} {first[1] - first[0]:8.3f} "
              f"{first[0]:12.3f} {max(e for _, e in spans):9.3f}")
    for name in CHUNKS:
        ms = 1e3 * np.array([e - s for s, e in sorted(calls.get(name, []))])
        if len(ms):
            print(f"  {name} (ms, in start order): first {np.round(ms[:5], 1).tolist()}, median {np.median(ms):.1f}")
    if loads:
        print(f"  CuPy module loads: {len(loads)}, {sum(e - s for _, _, s, e in loads):.3f} s in all; those over "
              "20 ms and those in the first second (kernel, thread, start, end):")
        for name, thread, start, end in sorted(loads, key=lambda load: load[2]):
            if end - start > 0.02 or start - t0 < 1.0:
                print(f"    {name[:40]:<40} {thread[:24]:<24} {start - t0:7.3f} {end - t0:7.3f}")


if __name__ == "__main__":
    main()
