"""pykilosort's entry point: the example of its README (only the import line changed) sorts a raw binary file
of 385 interleaved int16 channels, 32 of them in chanMap (the others unsorted, the last a sync channel), and
finds the ground truth; a rerun resumes; a bad probe or file is refused before any work."""

import subprocess
import sys

import numpy as np
import pytest

import si_ks2py
from si_ks2py import Bunch
from si_ks2py.binary import check_file, check_probe, run_binary
from si_ks2py.demo import generate_demo_recording, score, summary
from si_ks2py.export.sorting import read_sorting
from si_ks2py.pipeline import STAGES

N_TOTAL = 385
CHAN_MAP = 10 + 3 * np.arange(32)  # file channels of the probe's sites; the other channels are not sorted
BITS_PER_UV = 4.0
N_UNITS = 8

# pykilosort's README example, its import line changed
README_EXAMPLE = """
from pathlib import Path
import numpy as np

from si_ks2py import add_default_handler, run, Bunch

add_default_handler(level='DEBUG')

dat_path = Path('imec_385_100s.bin')
dir_path = dat_path.parent
probe = Bunch()
probe.NchanTOT = 385
# WARNING: indexing mismatch with MATLAB hence the -1
probe.chanMap = np.load(dir_path / 'chanMap.npy').squeeze().astype(np.int64) - 1
probe.xc = np.load(dir_path / 'xc.npy').squeeze()
probe.yc = np.load(dir_path / 'yc.npy').squeeze()
probe.kcoords = np.load(dir_path / 'kcoords.npy').squeeze()

run(dat_path, probe=probe, dir_path=dir_path)
"""


def write_raw(folder, recording):
    """The recording as pykilosort's input: imec_385_100s.bin (int16 [n, 385], time rows; the sites' channels
    at CHAN_MAP, a square-wave sync channel last, zeros elsewhere) and Kilosort's chanMap.npy (1-based, as MATLAB
    wrote it, [32, 1]), xc.npy, yc.npy, kcoords.npy (float, 1 shank)."""
    n = recording.get_num_samples()
    with open(folder / "imec_385_100s.bin", "wb") as f:
        for start in range(0, n, 30000):
            traces = recording.get_traces(start_frame=start, end_frame=min(n, start + 30000))
            rows = np.zeros((len(traces), N_TOTAL), np.int16)
            rows[:, CHAN_MAP] = np.round(traces * BITS_PER_UV)
            rows[:, -1] = 64 * (((start + np.arange(len(traces))) // 15000) % 2)  # 1 Hz square wave
            f.write(rows.tobytes())
    locations = recording.get_channel_locations()
    np.save(folder / "chanMap.npy", (CHAN_MAP + 1).astype(np.float64)[:, None])
    np.save(folder / "xc.npy", locations[:, 0][:, None])
    np.save(folder / "yc.npy", locations[:, 1][:, None])
    np.save(folder / "kcoords.npy", np.ones((len(CHAN_MAP), 1)))


def probe_bunch(folder) -> Bunch:
    probe = Bunch(NchanTOT=N_TOTAL, chanMap=np.load(folder / "chanMap.npy").squeeze().astype(np.int64) - 1)
    for name in ("xc", "yc", "kcoords"):
        probe[name] = np.load(folder / f"{name}.npy").squeeze()
    return probe


@pytest.fixture(scope="module")
def readme_sort(tmp_path_factory):
    """The README example run as a script in a folder with the raw file and the probe's .npy files: a dict with
    folder, gt (ground-truth sorting), log (the script's stderr)."""
    folder = tmp_path_factory.mktemp("pykilosort")
    recording, gt = generate_demo_recording(duration=12.0, num_channels=32, num_units=N_UNITS, seed=11)
    write_raw(folder, recording)
    (folder / "sort.py").write_text(README_EXAMPLE)
    done = subprocess.run([sys.executable, "sort.py"], cwd=folder, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"folder": folder, "gt": gt, "log": done.stderr}


@pytest.mark.slow
def test_readme_example_finds_the_ground_truth_units(readme_sort):
    folder = readme_sort["folder"]
    # add_default_handler's console shows the run, each line once (run adds no console handler of its own)
    assert "extract    done" in readme_sort["log"] and readme_sort["log"].count("phy folder:") == 1
    assert (folder / ".kilosort" / "context" / "st3_c.npy").exists()  # pykilosort's cache, its suffixes
    sorting = read_sorting(folder / "output")
    result = summary(score(readme_sort["gt"], sorting))
    # as tests/test_sort.py asks of the demo: 80 % of the units at accuracy 0.8, most of them at 0.95
    assert result["accuracy_0.8"] >= 0.8 * N_UNITS, result
    assert result["accuracy_0.95"] >= N_UNITS - 2, result


def phy_params(folder) -> dict:
    params = {}
    exec((folder / "params.py").read_text(), params)
    return params


@pytest.mark.slow
def test_phy_folder_reads_the_corrected_data(readme_sort):
    """With drift correction (the default) Phy reads the corrected whitened data the templates were fit to."""
    folder = readme_sort["folder"] / "output"
    params = phy_params(folder)
    igood = np.load(readme_sort["folder"] / ".kilosort" / "context" / "igood.npy")  # the good channels
    assert params["n_channels_dat"] == igood.sum() and params["dtype"] == "int16" and params["hp_filtered"]
    assert params["dat_path"] == str((readme_sort["folder"] / ".kilosort" / "context" / "temp_wh.dat").absolute())
    assert (folder / "ks2py.log").exists() and (folder / "cluster_KSLabel.tsv").exists()


@pytest.mark.slow
def test_phy_folder_reads_the_raw_file_without_drift_correction(readme_sort, tmp_path):
    folder = readme_sort["folder"]
    si_ks2py.run(folder / "imec_385_100s.bin", probe=probe_bunch(folder), dir_path=tmp_path, verbose=False,
                 progress=False, do_correction=False)
    params = phy_params(tmp_path / "output")
    assert params["n_channels_dat"] == N_TOTAL and params["dtype"] == "int16" and not params["hp_filtered"]
    assert params["dat_path"] == str((folder / "imec_385_100s.bin").absolute())
    igood = np.load(tmp_path / ".kilosort" / "context" / "igood.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "output" / "channel_map.npy"), CHAN_MAP[igood])


@pytest.mark.slow
def test_rerun_on_the_same_dir_path_skips_every_stage(readme_sort):
    folder = readme_sort["folder"]
    ctx = run_binary(folder / "imec_385_100s.bin", probe_bunch(folder), folder, verbose=False, progress=False)
    assert not set(ctx.timings) & set(STAGES), ctx.timings
    assert ctx.raw_data.get_num_channels() == len(CHAN_MAP) and ctx.params.fs == 30000.0
    # si_ks2py.run on the path returns the same sorting as the first run's Phy folder
    sorting = si_ks2py.run(folder / "imec_385_100s.bin", probe=probe_bunch(folder), dir_path=folder,
                           verbose=False, progress=False)
    first = read_sorting(folder / "output")
    assert list(sorting.unit_ids) == list(first.unit_ids)
    for unit in first.unit_ids:
        np.testing.assert_array_equal(sorting.get_unit_spike_train(unit), first.get_unit_spike_train(unit))


# --- checks before any work -----------------------------------------------------------------------------------
def small_probe(**changes) -> Bunch:
    probe = Bunch(NchanTOT=8, chanMap=np.arange(6), xc=np.zeros(6), yc=20.0 * np.arange(6), kcoords=np.zeros(6))
    probe.update(changes)
    return probe


@pytest.fixture
def small_file(tmp_path):
    """A raw file of 100 samples of 8 int16 channels."""
    path = tmp_path / "raw.bin"
    np.zeros((100, 8), np.int16).tofile(path)
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"chanMap": np.arange(3, 9)}, r"chanMap holds \[8\], outside the file's channels 0 to 7 \(NchanTOT = 8\)"),
        ({"chanMap": np.arange(1, 9), "xc": np.zeros(8), "yc": np.zeros(8), "kcoords": np.zeros(8)},
         "looks 1-based"),
        ({"xc": np.zeros(5)}, r"lengths differ: \{'chanMap': 6, 'xc': 5, 'yc': 6, 'kcoords': 6\}"),
        ({"kcoords": np.zeros(7)}, "lengths differ"),
        ({"chanMap": np.array([0, 1, 2, 2, 4, 5])}, r"lists file channel\(s\) \[2\] more than once"),
        ({"chanMap": np.arange(6) + 0.5}, "chanMap must be a 1-D array of whole numbers"),
        ({"NchanTOT": 0}, "NchanTOT must be the number of channels in the file"),
    ],
)
def test_bad_probe_is_refused_before_any_work(small_file, changes, message):
    with pytest.raises(ValueError, match=message):
        si_ks2py.run(small_file, probe=small_probe(**changes), dir_path=small_file.parent)
    assert not (small_file.parent / "output").exists() and not (small_file.parent / ".kilosort").exists()


def test_missing_probe_fields_are_named():
    with pytest.raises(ValueError, match="no chanMap, yc"):
        check_probe(Bunch(NchanTOT=4, xc=np.zeros(4)))


def test_file_size_must_fit_nchantot_and_dtype(small_file):
    # 1600 bytes: 100 samples of 8 int16 channels; not whole samples of 7 channels, nor of 6 float64 channels
    with pytest.raises(ValueError, match=r"has 1600 bytes, not a whole number of samples of NchanTOT = 7 "
                                         r"channels of int16 \(14 bytes a sample\).*channel counts that fit this "
                                         r"size: \[8, 5, 4\]"):
        si_ks2py.run(small_file, probe=small_probe(NchanTOT=7), dir_path=small_file.parent)
    with pytest.raises(ValueError, match="NchanTOT = 6 channels of float64"):
        check_file(small_file, 6, "float64")
    assert not (small_file.parent / "output").exists()


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no raw data file .*nothere.bin"):
        si_ks2py.run(tmp_path / "nothere.bin", probe=small_probe(), dir_path=tmp_path)


def test_file_params_and_kilosort_names(small_file):
    with pytest.raises(ValueError, match="'sample_rate' and 'fs' name the same param"):
        si_ks2py.run(small_file, probe=small_probe(), sample_rate=25000, fs=30000)
    with pytest.raises(ValueError, match="'dtype' must name the file's sample type"):
        si_ks2py.run(small_file, probe=small_probe(), dtype="int17")
    with pytest.raises(ValueError, match="'Th' is 'projection_threshold'"):
        si_ks2py.run(small_file, probe=small_probe(), Th=[10, 4])
    assert not (small_file.parent / "output").exists()


def test_a_path_needs_the_probe(small_file):
    with pytest.raises(TypeError, match="needs the probe Bunch"):
        si_ks2py.run(small_file)


def test_recording_and_probe_do_not_mix(small_recording, tmp_path):
    recording, _ = small_recording
    with pytest.raises(TypeError, match="carries its own probe"):
        si_ks2py.run(recording, tmp_path / "out", probe=small_probe())


def test_probe_of_the_recording_is_the_bunch(small_file):
    from si_ks2py.binary import binary_recording
    from si_ks2py.io import whole_rows
    from si_ks2py.probe import probe_from_recording

    chan_map = np.array([5, 1, 2, 7])  # any order: the recording's channels follow the file's
    probe = small_probe(chanMap=chan_map, xc=np.array([0.0, 1, 2, 3]), yc=np.array([10.0, 11, 12, 13]),
                        kcoords=np.array([1.0, 0, 0, 1]))
    recording = binary_recording(small_file, probe, fs=20000.0)
    assert recording.get_sampling_frequency() == 20000.0 and recording.get_num_samples() == 100
    m = probe_from_recording(recording)
    order = np.argsort(chan_map)
    np.testing.assert_array_equal(m.xc, probe.xc[order])
    np.testing.assert_array_equal(m.yc, probe.yc[order])
    np.testing.assert_array_equal(m.kcoords, [0, 0, 1, 1])  # shanks numbered by first appearance
    source, file_channels = whole_rows(recording, m.chanMap)
    assert source.get_num_channels() == 8  # batches are read as the file's whole rows
    np.testing.assert_array_equal(file_channels, np.sort(chan_map))
