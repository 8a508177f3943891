"""Figure of bench_neuropixels.py results (its --json lines): wall time per stage and ground-truth units found,
per recording set and sorter.

    python benchmarks/plot_benchmarks.py docs/benchmark_results.jsonl docs/benchmarks.png
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="JSON lines written by bench_neuropixels.py --json")
    parser.add_argument("figure", help="PNG to write")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(args.results) as f:
        runs = [r for r in map(json.loads, filter(str.strip, f)) if not r.get("failed")]
    labels = [f"{r['sorter']}\n{r['set']}" for r in runs]
    y = np.arange(len(runs))
    fig, (ax_time, ax_units) = plt.subplots(1, 2, figsize=(13, 0.9 * len(runs) + 3.0))

    stage_names = list(dict.fromkeys(name for r in runs for name in r["stages_s"]))
    colors = plt.get_cmap("tab20")(np.linspace(0, 1, max(len(stage_names), 2)))
    for name, color in zip(stage_names, colors):
        left = np.array([sum(v for k, v in r["stages_s"].items() if stage_names.index(k) < stage_names.index(name))
                         for r in runs])
        width = np.array([r["stages_s"].get(name, 0.0) for r in runs])
        ax_time.barh(y, width, left=left, color=color, label=name)
    for i, r in enumerate(runs):
        ax_time.text(r["wall_s"], i, f" {r['wall_s']:.0f} s ({r['x_realtime']:.1f}x)", va="center", fontsize=8)
    ax_time.set(yticks=y, yticklabels=labels, xlabel="wall time (s), by stage",
                title=f"{runs[0]['duration_s']:g} s of 384-channel Neuropixels 1.0" if runs else "")
    ax_time.set_xlim(0, 1.3 * max((r["wall_s"] for r in runs), default=1))
    ax_time.invert_yaxis()
    ax_time.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.18))

    height = 0.25
    for offset, key, color in ((-height, "accuracy_0.8", "C0"), (0, "accuracy_0.95", "C2"),
                               (height, "false_positive", "C3")):
        values = [r[key] + (r["redundant"] if key == "false_positive" else 0) for r in runs]
        ax_units.barh(y + offset, values, height, color=color,
                      label={"accuracy_0.8": "GT units, accuracy >= 0.8", "accuracy_0.95": "GT units, >= 0.95",
                             "false_positive": "false positive + redundant units"}[key])
        for i, v in enumerate(values):
            ax_units.text(v, i + offset, f" {v}", va="center", fontsize=7)
    ax_units.set(yticks=y, yticklabels=labels, xlabel="units",
                 title=f"against {runs[0]['gt_units']} ground-truth units" if runs else "")
    ax_units.invert_yaxis()
    ax_units.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(args.figure, dpi=110)


if __name__ == "__main__":
    main()
