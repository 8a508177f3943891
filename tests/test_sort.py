"""End-to-end sorts on the CPU: accuracy against ground truth, repeatability, SpikeInterface's contract."""

import json
import unittest

import numpy as np
import pytest
from spikeinterface.sorters import installed_sorters, run_sorter

import si_ks2py
from si_ks2py.demo import score, summary

pytestmark = pytest.mark.slow


def test_finds_ground_truth_units(demo_sort):
    result = summary(score(demo_sort["gt"], demo_sort["sorting"]))
    assert result["accuracy_0.8"] >= 0.8 * result["gt_units"], result
    assert result["accuracy_0.95"] >= 10, result


def test_same_seed_gives_identical_sorting(demo_sort):
    first = demo_sort["sorting"]
    second = si_ks2py.run(demo_sort["recording"], demo_sort["base"] / "again", device="cpu", verbose=False)
    assert list(second.unit_ids) == list(first.unit_ids)
    for unit in second.unit_ids:
        np.testing.assert_array_equal(second.get_unit_spike_train(unit), first.get_unit_spike_train(unit))
    for name in ("KSLabel", "ContamPct", "Amplitude"):
        np.testing.assert_array_equal(second.get_property(name), first.get_property(name))


def test_spikeinterface_contract_on_a_small_probe(tmp_path):
    """What SpikeInterface's own sorter test suite checks, on a 4-channel toy recording."""
    import spikeinterface.core as sc

    assert "ks2py" in installed_sorters()
    recording, _ = sc.generate_ground_truth_recording(durations=[30.0], sampling_frequency=30000.0, num_channels=4,
                                                      num_units=3, seed=2)
    recording = recording.save(folder=tmp_path / "rec", verbose=False)
    sorting = run_sorter("ks2py", recording, folder=tmp_path / "out", delete_output_folder=True, verbose=False)
    assert set(sorting.sorting_info) >= {"recording", "params", "log"}
    assert not (tmp_path / "out" / "sorter_output").exists()
    for name in ("recording", "params", "log"):
        assert (tmp_path / "out" / f"spikeinterface_{name}.json").exists()
    log = json.loads((tmp_path / "out" / "spikeinterface_log.json").read_text())
    assert log["error"] is False and log["sorter_version"] == si_ks2py.__version__
    assert any("extract" in line for line in log["runtime_trace"])  # our ks2py.log reached SpikeInterface's log
    assert sorting.get_sampling_frequency() == 30000.0


try:  # SpikeInterface's own suite for sorters: in its source tree (e.g. an editable install), not in its wheel
    from spikeinterface.sorters.tests.common_tests import SorterCommonTestSuite
except ImportError:
    class SorterCommonTestSuite:
        def test_with_run(self):
            pytest.skip("spikeinterface.sorters.tests.common_tests is not installed (SpikeInterface's wheel leaves "
                        "its tests out; a source install has them)")


class TestSpikeInterfaceSorterCommonTestSuite(SorterCommonTestSuite, unittest.TestCase):
    """SpikeInterface's test of every sorter: default params, 4 channels, 60 s (about 40 s on 2 CPU cores)."""

    SorterClass = si_ks2py.Ks2PySorter
