"""The si-ks2py command: demo, sort, params-doc."""

from __future__ import annotations

import argparse
import json
import sys


def demo(args):
    from .demo import run_demo

    run_demo(args.folder, args.duration, args.channels, args.units, args.seed, args.device)


def sort(args):
    """Sort a recording saved by SpikeInterface (recording.save(folder=...)) or any file si.load opens."""
    import spikeinterface.core as sc

    from . import run

    recording = sc.load(args.recording)
    params = {}
    for item in args.param:
        name, _, value = item.partition("=")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    sorting = run(recording, args.output, **params)
    print(f"{len(sorting.unit_ids)} units; output (Phy folder): {args.output}")


def params_doc(args):
    from .params import markdown_reference

    print(markdown_reference())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="si-ks2py", description="Kilosort 2.0 in Python (SpikeInterface sorter 'ks2py')")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("demo", help="sort a generated ground-truth recording and print its accuracy")
    p.add_argument("--folder", default="ks2py_demo", help="where the recording and the sort are written")
    p.add_argument("--duration", type=float, default=60.0, help="seconds")
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--units", type=int, default=12)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.set_defaults(func=demo)
    p = commands.add_parser("sort", help="sort a saved SpikeInterface recording (resumes an interrupted sort)")
    p.add_argument("recording", help="folder written by recording.save(...), or a file spikeinterface.load opens")
    p.add_argument("output", help="output folder (Phy folder and cache)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a ks2py param, value as JSON (e.g. --param projection_threshold=[9,3])")
    p.set_defaults(func=sort)
    commands.add_parser("params-doc", help="print the params reference (docs/params.md)").set_defaults(func=params_doc)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
