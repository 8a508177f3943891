"""The demo: a generated ground-truth recording sorted with run_sorter("ks2py"), scored against its truth."""

from __future__ import annotations

import shutil
from pathlib import Path


def generate_demo_recording(duration: float = 60.0, num_channels: int = 32, num_units: int = 12, seed: int = 7,
                            sampling_frequency: float = 30000.0):
    """A ground-truth recording on a 4-column probe (20 um pitch): (recording, sorting).

    SpikeInterface's generator with its default waveforms, firing rates (15 Hz, 4 ms refractory period) and
    noise (5 uV), with the units 5 to 25 um from the probe plane, so every unit's spikes stand above the noise
    on some channel (peak 5 to 60 noise standard deviations).
    """
    import spikeinterface.core as sc

    return sc.generate_ground_truth_recording(
        durations=[duration],
        sampling_frequency=sampling_frequency,
        num_channels=num_channels,
        num_units=num_units,
        seed=seed,
        generate_probe_kwargs=dict(num_columns=4, xpitch=20, ypitch=20, contact_shapes="circle",
                                   contact_shape_params={"radius": 6}),
        generate_unit_locations_kwargs=dict(margin_um=10.0, minimum_z=5.0, maximum_z=25.0, minimum_distance=20.0),
    )


def score(gt_sorting, sorting):
    """SpikeInterface's comparison with the ground truth (exhaustive): the comparison object."""
    from spikeinterface.comparison import compare_sorter_to_ground_truth

    return compare_sorter_to_ground_truth(gt_sorting, sorting, exhaustive_gt=True)


def accuracy_table(comparison) -> str:
    perf = comparison.get_performance()
    best = comparison.best_match_12
    lines = [f"{'gt unit':>8} {'spikes':>7} {'accuracy':>9} {'recall':>7} {'precision':>9} {'ks2py unit':>11}"]
    counts = comparison.sorting1.count_num_spikes_per_unit()
    for unit in perf.index:
        match = best[unit]
        lines.append(f"{unit!s:>8} {counts[unit]:>7} {perf.loc[unit, 'accuracy']:>9.3f} "
                     f"{perf.loc[unit, 'recall']:>7.3f} {perf.loc[unit, 'precision']:>9.3f} "
                     f"{'-' if match == -1 or match == '-1' else str(match):>11}")
    return "\n".join(lines)


def summary(comparison) -> dict:
    accuracy = comparison.get_performance()["accuracy"].to_numpy(dtype=float)
    return {
        "gt_units": len(accuracy),
        "sorted_units": len(comparison.sorting2.unit_ids),
        "accuracy_0.8": int((accuracy >= 0.8).sum()),
        "accuracy_0.95": int((accuracy >= 0.95).sum()),
        "false_positive": int(comparison.count_false_positive_units()),
        "redundant": int(comparison.count_redundant_units()),
    }


def run_demo(folder="ks2py_demo", duration=60.0, num_channels=32, num_units=12, seed=7, device="auto",
             verbose=True) -> dict:
    """Generate, save, sort with run_sorter("ks2py"), print the per-unit accuracy and where the output is."""
    from spikeinterface.sorters import run_sorter

    import si_ks2py  # noqa: F401  (registers the sorter)

    folder = Path(folder).absolute()
    recording, gt_sorting = generate_demo_recording(duration, num_channels, num_units, seed)
    print(f"ground truth: {num_units} units, {num_channels} channels, {duration:g} s at 30 kHz (seed {seed})")
    shutil.rmtree(folder / "recording", ignore_errors=True)
    recording = recording.save(folder=folder / "recording", verbose=False)  # run_sorter needs a saved recording
    sorting = run_sorter("ks2py", recording, folder=folder / "ks2py", remove_existing_folder=True, verbose=verbose,
                         device=device)
    comparison = score(gt_sorting, sorting)
    print()
    print(accuracy_table(comparison))
    result = summary(comparison)
    print(f"\n{result['accuracy_0.8']} of {result['gt_units']} ground-truth units found with accuracy >= 0.8 "
          f"({result['accuracy_0.95']} >= 0.95); {result['sorted_units']} units sorted, "
          f"{result['false_positive']} false positive, {result['redundant']} redundant")
    print(f"output (Phy folder): {folder / 'ks2py' / 'sorter_output'}")
    print(f"recording: {folder / 'recording'}")
    return result
