"""Profile one stage of a finished sort: rerun it from the sort's cache under cProfile and print where its time
goes (the stage's outputs in the cache are rewritten with the same values).

    python benchmarks/profile_stage.py RECORDING_FOLDER SORT_FOLDER split --workers 1

``--workers 1`` runs the stages that use a thread pool (split) on the main thread, where cProfile sees them.
``--op-times`` instead times every function of the op table, of templates.py and of the stage's module with a
device synchronisation before and after each call (times include the calls they make), which puts the GPU's
time on the op that queued the work.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import time
import types
from collections import defaultdict


#: helpers too small to time (their synchronisations would cost more than they do)
UNTIMED = {"run", "synchronize", "asarray", "array_module", "module", "kernel", "launch", "blocks", "f32", "i64", "i32"}


def profile_summary(profile: cProfile.Profile, top: int) -> str:
    """The ``top`` costliest calls of a profile, by their own time and by time with callees."""
    text = io.StringIO()
    stats = pstats.Stats(profile, stream=text).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return text.getvalue()


def time_functions(modules, synchronize):
    """Replace the functions of ``modules`` by synchronising, timing wrappers; returns {name: [calls, seconds]}."""
    totals = defaultdict(lambda: [0, 0.0])

    def timed(name, function):
        def wrapper(*args, **kwargs):
            synchronize()
            t = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                synchronize()
                totals[name][0] += 1
                totals[name][1] += time.perf_counter() - t
        return wrapper

    for module in modules:
        package = module.__name__.rsplit(".", 1)[0]  # also its package's functions it imports (gpu/segments.py's)
        for name, value in list(vars(module).items()):
            if (isinstance(value, types.FunctionType) and value.__module__.startswith(package)
                    and name not in UNTIMED):
                setattr(module, name, timed(f"{module.__name__.split('.')[-1]}.{name}", value))
    return totals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recording", help="the recording's SpikeInterface folder")
    parser.add_argument("sort_folder", help="the output folder of a finished ks2py sort of it")
    parser.add_argument("stage")
    parser.add_argument("--workers", type=int, default=None, help="CPU count the stage sees")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--op-times", action="store_true", help="synchronised times per function, no cProfile")
    args = parser.parse_args(argv)

    import spikeinterface.core as sc

    from si_ks2py import templates
    from si_ks2py.pipeline import build_context, stage_module

    if args.workers is not None:
        os.cpu_count = lambda: args.workers
    recording = sc.load(args.recording)
    ctx = build_context(recording, args.sort_folder, {"device": args.device, "progress": False}, verbose=False)
    ctx.intermediate.current_stage = args.stage
    module = stage_module(args.stage)
    if args.op_times:
        totals = time_functions((ctx.ops, templates, module), ctx.ops.synchronize)
        t = time.perf_counter()
        module.run(ctx)
        ctx.ops.synchronize()
        print(f"{args.stage}: {time.perf_counter() - t:.2f} s with synchronised op timers")
        for name, (calls, seconds) in sorted(totals.items(), key=lambda item: -item[1][1])[:args.top]:
            print(f"  {name:<40} {calls:7d} calls {seconds:8.3f} s")
        return
    profile = cProfile.Profile()
    t = time.perf_counter()
    profile.runcall(lambda: (module.run(ctx), ctx.ops.synchronize()))
    print(f"{args.stage}: {time.perf_counter() - t:.2f} s under cProfile")
    print(profile_summary(profile, args.top))


if __name__ == "__main__":
    main()
