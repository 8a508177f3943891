"""Memory on a long recording: GPU and host peaks of a ks2py sort of a generated 384-channel Neuropixels 1.0
recording (default one hour, 200 ground-truth units), with the per-stage times.

    python benchmarks/bench_long.py --duration 3600 --workdir /tmp/long --whitened-on-disk --score

The recording is SpikeInterface's generate_ground_truth_recording on the Neuropixels 1.0 probe, generated lazily
as the sort reads it (an hour of 384 channels would be 83 GB as int16). The sort runs in this process: the host
peak is its max RSS, the GPU peak is sampled with nvidia-smi. ``--whitened-on-disk`` makes preprocessing stream the
whitened data to its file only, as it does where the data does not fit in half of the free memory (most
workstations, for an hour of 384 channels); without it a machine with enough memory keeps a copy in memory.
A rerun with the same ``--workdir`` resumes from the cached stages (the printed times are then this run's).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=3600.0)
    parser.add_argument("--units", type=int, default=200)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", default="ks2py_long")
    parser.add_argument("--whitened-on-disk", action="store_true",
                        help="no in-memory copy of the whitened data (the path of machines with less memory)")
    parser.add_argument("--score", action="store_true", help="also score the sort against the ground truth")
    parser.add_argument("--json", default=None, help="append the result to this JSON-lines file")
    args = parser.parse_args(argv)

    import spikeinterface.core as sc

    from bench_neuropixels import GpuMemorySampler, neuropixels_1_probe  # beside this script
    from si_ks2py.pipeline import run

    if args.whitened_on_disk:
        from si_ks2py.stages import preprocess

        preprocess.whitened_fits_in_memory = lambda n_bytes: False
    rng = np.random.default_rng(args.seed)
    probe = neuropixels_1_probe()
    recording, gt = sc.generate_ground_truth_recording(  # firing 2 to 8 Hz, noise 6 to 8 uV as bench_neuropixels
        durations=[args.duration], sampling_frequency=30000.0, num_units=args.units, seed=args.seed, probe=probe,
        generate_sorting_kwargs=dict(firing_rates=rng.uniform(2.0, 8.0, args.units), refractory_period_ms=4.0),
        noise_kwargs=dict(noise_levels=rng.uniform(6.0, 8.0, probe.get_contact_count()), strategy="tile_pregenerated"),
    )
    folder = Path(args.workdir) / "sort"
    with GpuMemorySampler() as memory:
        t = time.perf_counter()
        ctx = run(recording, folder, {"device": "auto", "progress": False}, verbose=True)
        wall = time.perf_counter() - t
    result = {
        "duration_s": args.duration, "channels": recording.get_num_channels(), "wall_s": wall,
        "x_realtime": args.duration / wall, "stages_s": dict(ctx.timings), "device": ctx.ops.name,
        "gpu_peak_mib": memory.peak_mib, "host_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "spikes": int(len(ctx.intermediate.st3_c)), "whitened_on_disk": args.whitened_on_disk,
    }
    gpu = "n/a" if result["gpu_peak_mib"] is None else f"{result['gpu_peak_mib'] / 1024:.2f} GB"
    print(f"{args.duration:.0f} s x {result['channels']} channels: wall {wall:.1f} s ({result['x_realtime']:.1f}x "
          f"realtime), GPU peak {gpu}, host peak {result['host_peak_mib'] / 1024:.1f} GB, {result['spikes']} spikes",
          flush=True)
    print("stages (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result["stages_s"].items()), flush=True)
    if args.score:
        from si_ks2py.demo import score, summary
        from si_ks2py.export.sorting import read_sorting

        result.update(summary(score(gt, read_sorting(folder))))
        print(f"GT >= 0.8: {result['accuracy_0.8']}/{result['gt_units']}, >= 0.95: {result['accuracy_0.95']}, "
              f"units {result['sorted_units']}", flush=True)
    if args.json:
        with open(args.json, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
