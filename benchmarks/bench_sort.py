"""Benchmark: sort a generated ground-truth recording with ks2py and print per-stage wall time, x realtime and
accuracy against the ground truth.

    python benchmarks/bench_sort.py --probe multi-column --channels 32 --duration 60 --units 12 --device cpu
    python benchmarks/bench_sort.py --probe np1 --channels 384 --duration 300 --units 200 --device cuda

The recording is generated and saved to a binary folder first (not timed); the sort reads it from there.
The last line is the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def neuropixels_1_probe(num_channels: int):
    from probeinterface.neuropixels_tools import build_neuropixels_probe

    probe = build_neuropixels_probe("NP1000").get_slice(np.arange(num_channels))
    probe.set_device_channel_indices(np.arange(num_channels))
    return probe


def generate(args):
    import spikeinterface.core as sc

    from si_ks2py.demo import generate_demo_recording

    if args.probe == "multi-column":
        return generate_demo_recording(args.duration, args.channels, args.units, args.seed)
    return sc.generate_ground_truth_recording(
        durations=[args.duration], sampling_frequency=30000.0, num_units=args.units, seed=args.seed,
        probe=neuropixels_1_probe(args.channels),
        generate_unit_locations_kwargs=dict(margin_um=10.0, minimum_z=5.0, maximum_z=25.0, minimum_distance=20.0),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe", choices=("multi-column", "np1"), default="multi-column")
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--units", type=int, default=12)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--workdir", default=None, help="where the recording and the sort go (default: a temp dir)")
    parser.add_argument("--n-jobs", type=int, default=1, help="processes used to save the generated recording")
    args = parser.parse_args(argv)

    from si_ks2py.demo import score, summary
    from si_ks2py.export.sorting import read_sorting
    from si_ks2py.pipeline import run

    work = Path(args.workdir or tempfile.mkdtemp(prefix="ks2py_bench_"))
    shutil.rmtree(work / "sort", ignore_errors=True)
    recording, gt = generate(args)
    t = time.perf_counter()
    recording = recording.save(folder=work / "recording", overwrite=True, n_jobs=args.n_jobs, verbose=False)
    generation = time.perf_counter() - t

    t = time.perf_counter()
    ctx = run(recording, work / "sort", {"device": args.device, "progress": False}, verbose=False)
    wall = time.perf_counter() - t
    result = summary(score(gt, read_sorting(work / "sort")))
    duration = recording.get_num_samples() / recording.sampling_frequency

    print(f"ks2py {args.probe} {args.channels} ch, {duration:g} s, {args.units} units, device {ctx.ops.name}")
    print(f"(recording generated and saved in {generation:.1f} s, not counted)")
    for stage, seconds in ctx.timings.items():
        print(f"  {stage:<10} {seconds:8.2f} s")
    print(f"  {'other':<10} {wall - sum(ctx.timings.values()):8.2f} s")
    print(f"  {'total':<10} {wall:8.2f} s  = {duration / wall:.2f}x realtime")
    print(f"  GT units with accuracy >= 0.8: {result['accuracy_0.8']} / {result['gt_units']}, >= 0.95: "
          f"{result['accuracy_0.95']}; sorted units {result['sorted_units']}, false positive "
          f"{result['false_positive']}, redundant {result['redundant']}")
    print(json.dumps({"probe": args.probe, "channels": args.channels, "duration_s": duration, "units": args.units,
                      "device": ctx.ops.name, "wall_s": round(wall, 2), "x_realtime": round(duration / wall, 2),
                      "stages_s": {k: round(v, 2) for k, v in ctx.timings.items()}, **result}))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
