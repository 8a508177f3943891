"""The si-ks2py command: demo, sort, params-doc."""

from __future__ import annotations

import argparse
import sys


def params_doc(args):
    from .params import markdown_reference

    print(markdown_reference())


def main(argv=None):
    parser = argparse.ArgumentParser(prog="si-ks2py", description="Kilosort 2.0 in Python (SpikeInterface sorter 'ks2py')")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("params-doc", help="print the params reference (docs/params.md)").set_defaults(func=params_doc)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
