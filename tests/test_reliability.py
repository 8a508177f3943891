"""Issue 30: shared folders, stale caches, lost outputs and silent wrong results."""

import numpy as np
import pytest

from si_ks2py.export.sorting import read_params_py, read_sorting


def write_phy_folder(folder, params_text):
    """The files read_sorting reads: two units, three spikes."""
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "spike_times.npy", np.array([10, 20, 30], dtype=np.uint64))
    np.save(folder / "spike_clusters.npy", np.array([0, 1, 0], dtype=np.uint32))
    for name, values in (("KSLabel", ("good", "mua")), ("ContamPct", ("1.0", "2.0")), ("Amplitude", ("3.0", "4.0"))):
        (folder / f"cluster_{name}.tsv").write_text(f"cluster_id\t{name}\n0\t{values[0]}\n1\t{values[1]}\n")
    (folder / "params.py").write_text(params_text)


PARAMS_PY = ("dat_path = '/data/rec.dat'\nn_channels_dat = 16\ndtype = 'int16'\noffset = 0\n"
             "sample_rate = 30000.0\nhp_filtered = False\n")


def test_params_py_is_parsed_as_literals_never_run(tmp_path):
    write_phy_folder(tmp_path / "ok", PARAMS_PY)
    assert read_params_py(tmp_path / "ok") == {"dat_path": "/data/rec.dat", "n_channels_dat": 16, "dtype": "int16",
                                               "offset": 0, "sample_rate": 30000.0, "hp_filtered": False}
    assert read_sorting(tmp_path / "ok").get_sampling_frequency() == 30000.0
    marker = tmp_path / "ran"
    for i, code in enumerate([f"open({str(marker)!r}, 'w').close()\n",
                              f"sample_rate = open({str(marker)!r}, 'w').close() or 30000.0\n",
                              f"import os\nsample_rate = 30000.0\n",
                              "sample_rate = 30000.0 +\n"]):
        folder = tmp_path / f"bad{i}"
        write_phy_folder(folder, PARAMS_PY + code)
        with pytest.raises(ValueError, match=r"params\.py"):
            read_sorting(folder)
    assert not marker.exists()


def test_sorter_folder_is_read_without_running_its_params_py(tmp_path):
    import spikeinterface.sorters  # noqa: F401  (registers the sorter)

    from si_ks2py import Ks2PySorter

    marker = tmp_path / "ran"
    write_phy_folder(tmp_path / "sorter_output", PARAMS_PY + f"x = __import__('os').mkdir({str(marker)!r})\n")
    with pytest.raises(ValueError, match="not a literal"):
        Ks2PySorter._get_result_from_folder(tmp_path / "sorter_output")
    assert not marker.exists()


@pytest.mark.parametrize("change, message", [
    ({"nt0min": 30}, r"'nt0min' = 30 must be smaller than the template length: at 10000 Hz .* 21 samples"),
    ({"projection_threshold": [4, 10]}, r"'projection_threshold' = \[4, 10\]: the first"),
    ({"cache_folder": ""}, r"'cache_folder' is empty"),
    ({"cache_folder": "  "}, r"'cache_folder' is empty"),
])
def test_inconsistent_params_are_refused_before_work(tmp_path, change, message):
    from si_ks2py import params
    from si_ks2py.pipeline import run

    recording = small_recording(sampling_frequency=10000.0)
    with pytest.raises(ValueError, match=message):
        params.validate(change, 10000.0)
    with pytest.raises(ValueError, match=message):
        run(recording, tmp_path / "out", {"device": "cpu", "progress": False, **change}, verbose=False)
    assert not (tmp_path / "out" / "cache").exists()
    params.validate({"nt0min": 20, "projection_threshold": [4, 4]}, 10000.0)  # consistent values pass


def small_recording(duration=10.0, sampling_frequency=30000.0, seed=0, **kwargs):
    """10 s, 16 channels, 8 units, in memory (not a binary recording)."""
    import spikeinterface.core as sc

    recording, _ = sc.generate_ground_truth_recording(durations=[duration], sampling_frequency=sampling_frequency,
                                                      num_channels=16, num_units=8, seed=seed, **kwargs)
    return recording


def test_deleted_whitened_file_is_not_named_as_phy_data_file(tmp_path):
    from si_ks2py.pipeline import run

    recording = small_recording(duration=4.0)
    ctx = run(recording, tmp_path / "out", {"device": "cpu", "progress": False, "fig": False,
                                            "delete_tmp_files": True}, verbose=False)
    assert not ctx.intermediate.has_file("temp_wh.dat")
    values = read_params_py(tmp_path / "out")
    assert values["dat_path"] == "" and values["hp_filtered"] is True
    assert "no data file" in (tmp_path / "out" / "params.py").read_text()
    from phylib.io.model import load_model

    model = load_model(tmp_path / "out" / "params.py")  # phy opens it, without raw data
    assert model.traces is None and model.n_templates > 0
    model.close()


# A sort that stops in learning (once preprocessing and reorder are done) and waits there to be killed.
SORT_THAT_WAITS = """
import sys, time
import spikeinterface.core as sc
import si_ks2py
from si_ks2py.stages import learn

def wait(ctx):
    print("learning", flush=True)
    time.sleep(120)

learn.run = wait
recording, _ = sc.generate_ground_truth_recording(durations=[4.0], sampling_frequency=30000.0, num_channels=16,
                                                  num_units=8, seed=0)
si_ks2py.run(recording, sys.argv[1], verbose=False, device="cpu", progress=False, fig=False,
             cache_folder=sys.argv[2])
"""


def test_a_folder_in_use_is_refused_at_once_and_a_killed_sort_leaves_no_lock(tmp_path):
    import subprocess
    import sys
    import time

    import si_ks2py
    from si_ks2py.context import FolderInUseError

    out, cache = tmp_path / "out" / "sorter_output", tmp_path / "cache"
    other = subprocess.Popen([sys.executable, "-c", SORT_THAT_WAITS, str(out), str(cache)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "learning"
        recording = small_recording(duration=4.0, seed=3)  # another recording
        params = {"device": "cpu", "progress": False, "fig": False}
        for folder, cache_folder, what in ((out, None, "output folder"), (tmp_path / "out2", cache, "cache folder")):
            t = time.perf_counter()
            with pytest.raises(FolderInUseError, match=f"the {what} .* is in use by another ks2py sort "
                                                       f"\\(process {other.pid}\\)"):
                si_ks2py.run(recording, folder, verbose=False, cache_folder=cache_folder, **params)
            assert time.perf_counter() - t < 5
        assert not (tmp_path / "out2" / "spike_times.npy").exists()
        # run_sorter would delete the folder before sorting (remove_existing_folder): refused before that
        from spikeinterface.sorters import run_sorter

        with pytest.raises(FolderInUseError, match=f"process {other.pid}"):
            run_sorter("ks2py", recording.save(folder=tmp_path / "saved", verbose=False), folder=tmp_path / "out",
                       remove_existing_folder=True, **params)
        assert (out / "ks2py.log").exists()  # the running sort's folder is still there
    finally:
        other.kill()  # SIGKILL: the system drops its locks
        other.wait()
    sorting = si_ks2py.run(recording, out, verbose=False, cache_folder=cache, **params)
    assert sorting.get_num_units() > 0


def test_changed_samples_or_shanks_are_noticed_and_everything_reruns(tmp_path, caplog):
    """Data changed outside every sampled window (of a binary recording: same size, the mtime put back; and of
    an in-memory recording), or other shank ids, rerun every stage; an unchanged recording reruns none."""
    import logging
    import os

    import spikeinterface.core as sc

    from si_ks2py import pipeline

    params = {"device": "cpu", "progress": False}
    recording = small_recording(duration=4.0).save(folder=tmp_path / "rec", verbose=False)
    out = tmp_path / "out"
    first = pipeline.run(recording, out, params, verbose=False, stop_after="reorder")
    assert set(first.timings) == {"preprocess", "drift", "reorder"}
    again = pipeline.run(sc.load(tmp_path / "rec"), out, params, verbose=False, stop_after="reorder")
    assert again.timings == {}
    path = recording.get_binary_description()["file_paths"][0]
    os.utime(path)  # touched, not changed: every sample compared (the digest of the read, not of preprocessing's)
    with caplog.at_level(logging.INFO, logger="si_ks2py"):
        touched = pipeline.run(sc.load(tmp_path / "rec"), out, params, verbose=False, stop_after="reorder")
    assert touched.timings == {} and "recording unchanged since the cached sort" in caplog.text

    # one sample changed away from every sampled window; the file keeps its size and modification time
    n = recording.get_num_samples()
    sampled = np.linspace(0, n - 256, 32).astype(int)  # the windows of the fingerprint (8 in earlier versions)
    t = int(sampled[3] + 256 + (sampled[4] - sampled[3] - 256) // 2)
    info = os.stat(path)
    traces = np.memmap(path, dtype=recording.get_dtype(), mode="r+", shape=(n, recording.get_num_channels()))
    traces[t, 5] += 1
    traces.flush()
    del traces
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    touched = pipeline.run(sc.load(tmp_path / "rec"), out, params, verbose=False, stop_after="reorder")
    assert touched.timings == {}  # the cheap identity cannot see it...
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # ...until the file's time says it changed
    changed = pipeline.run(sc.load(tmp_path / "rec"), out, params, verbose=False, stop_after="reorder")
    assert set(changed.timings) == {"preprocess", "drift", "reorder"}
    assert pipeline.run(sc.load(tmp_path / "rec"), out, params, verbose=False, stop_after="reorder").timings == {}

    # an in-memory recording: no cheap identity, every sample compared on each rerun
    memory = sc.NumpyRecording([recording.get_traces()], recording.sampling_frequency)
    memory.set_probe(recording.get_probe())
    pipeline.run(memory, tmp_path / "mem", params, verbose=False, stop_after="preprocess")
    assert pipeline.run(memory, tmp_path / "mem", params, verbose=False, stop_after="preprocess").timings == {}
    traces = recording.get_traces().copy()
    traces[t, 5] += 1
    edited = sc.NumpyRecording([traces], recording.sampling_frequency)
    edited.set_probe(recording.get_probe())
    assert "preprocess" in pipeline.run(edited, tmp_path / "mem", params, verbose=False,
                                        stop_after="preprocess").timings

    # other shanks (kcoords): the channel neighbourhoods change
    probe = recording.get_probe()
    probe.set_shank_ids(np.repeat(["0", "1"], 8))
    edited.set_probe(probe)
    shanks = pipeline.run(edited, tmp_path / "mem", params, verbose=False, stop_after="preprocess")
    assert "preprocess" in shanks.timings


def test_damaged_cache_files_are_named_and_recomputed_and_a_failed_export_keeps_the_old_files(tmp_path, caplog,
                                                                                               monkeypatch):
    import logging

    from si_ks2py.export import phy
    from si_ks2py.pipeline import run

    params = {"device": "cpu", "progress": False, "fig": False}
    recording = small_recording(duration=4.0)
    out = tmp_path / "out"
    run(recording, out, params, verbose=False)
    reference = {name: (out / name).read_bytes() for name in phy.PHY_FILES}

    # an export that fails half-way (a full disk) leaves the earlier export as it was
    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(phy, "write_tsv", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run(recording, out, params, verbose=False)
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in phy.PHY_FILES} == reference
    assert not (out / phy.STAGING).exists()

    # garbage of the right size in an array of the cutoff, then a truncated array of the split: each is named,
    # and its stage and those after it rerun, to the same result
    cache = out / "cache"
    size = (cache / "good.npy").stat().st_size
    (cache / "good.npy").write_bytes(b"\x93NUMPY" + b"\x01" * (size - 6))
    for name, stage, rerun in (("good", "cutoff", {"cutoff"}), ("W_s", "split", {"split", "cutoff"})):
        if name == "W_s":
            (cache / "W_s.npy").write_bytes((cache / "W_s.npy").read_bytes()[:100])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="si_ks2py"):
            ctx = run(recording, out, params, verbose=False)
        messages = "\n".join(r.getMessage() for r in caplog.records)
        assert f"cache file {cache / (name + '.npy')} is damaged" in messages, messages
        assert f"the '{stage}' stage reruns" in messages
        assert set(ctx.timings) - {"export"} == rerun
        assert {name: (out / name).read_bytes() for name in phy.PHY_FILES} == reference


def test_temporary_files_left_by_a_killed_sort_are_removed_by_the_next_and_the_whitened_file_is_synced(
        tmp_path, monkeypatch):
    import os
    import threading

    from si_ks2py import context
    from si_ks2py.context import FolderInUseError, folder_lock
    from si_ks2py.pipeline import run

    out = tmp_path / "out"
    cache, qc = out / "cache", out / "qc"
    cache.mkdir(parents=True)
    qc.mkdir()
    litter = [cache / ".Wrot.npy.k2j4x9_a.part", cache / ".temp_wh.dat.part", cache / ".extract_features_0.part",
              cache / ".manifest.json.abcdefgh.part", qc / ".templates.0123abcd.1.npz", out / ".phy-export.part"]
    for f in litter[:-1]:
        f.write_bytes(b"x")
    litter[-1].mkdir()
    (litter[-1] / "spike_times.npy").write_bytes(b"x")
    mine = [cache / "notes.part", cache / ".hidden", qc / ".mine.npz", qc / "templates.png", out / "data.part"]
    for f in mine:
        f.write_bytes(b"mine")
    recording = small_recording(duration=2.0)
    params = {"device": "cpu", "progress": False}

    # while another sort holds the folder, nothing is removed
    held, release = threading.Event(), threading.Event()

    def other_sort():
        with folder_lock(out):
            held.set()
            release.wait()

    thread = threading.Thread(target=other_sort)
    thread.start()
    held.wait()
    with pytest.raises(FolderInUseError):
        run(recording, out, params, verbose=False, stop_after="preprocess")
    release.set()
    thread.join()
    assert all(f.exists() for f in litter)

    synced, events = set(), []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    def recording_replace(a, b):
        events.append((str(b), str(a) in synced))
        replace(a, b)

    monkeypatch.setattr(context.os, "fsync", recording_fsync)
    monkeypatch.setattr(context.os, "replace", recording_replace)
    run(recording, out, params, verbose=False, stop_after="preprocess")
    assert not any(f.exists() for f in litter)
    assert all(f.read_bytes() == b"mine" for f in mine)
    assert (str(cache / "temp_wh.dat"), True) in events  # the whitened data synced before its rename
    assert all(was_synced for _, was_synced in events)


@pytest.mark.parametrize("fs, change, says, not_says", [
    (30000.0, {"detect_threshold": 0.5}, r"peaks below detect_threshold=0.5 .* none alone within long_range.*"
                                         r"Raise detect_threshold", "lower detect_threshold"),
    (30000.0, {"minFR": 1000}, r"seeded \d+ templates and dropped every one for firing below minFR=1000 Hz .*"
                               r"lower minFR", "projection_threshold"),
    (10000.0, {"fslow": 151}, r"passes a band of only 1 Hz.*Widen it", "scaling"),
    (10000.0, {"freq_min": 4999}, r"freq_min=4999 Hz.*passes a band of only 1 Hz", "scaling"),
])
def test_errors_name_the_cause_that_was_measured(tmp_path, fs, change, says, not_says):
    from si_ks2py.pipeline import run

    recording = small_recording(duration=4.0, sampling_frequency=fs)
    with pytest.raises(ValueError, match=says) as caught:
        run(recording, tmp_path / "out", {"device": "cpu", "progress": False, "fig": False, **change}, verbose=False)
    assert not_says not in str(caught.value)


def test_short_recordings_are_cut_into_enough_batches_and_sort_as_well_as_long_ones(tmp_path, caplog):
    import logging

    import spikeinterface.core as sc

    import si_ks2py
    from si_ks2py import params
    from si_ks2py.demo import score, summary

    for fs, seconds, NT, n_batch in ((30000.0, 4, 15104, 8), (10000.0, 10, 12608, 8), (30000.0, 1.5, 8256, 6)):
        resolved = params.resolve({}, fs, int(fs * seconds))
        assert (resolved.NT, resolved.Nbatch) == (NT, n_batch)
    for seconds in (7, 10, 600):  # 4 default batches or more: Kilosort's batch, results unchanged
        assert params.resolve({}, 30000.0, 30000 * seconds).NT == 64 * 1024 + 64
    assert params.resolve({"NT": 65600}, 30000.0, 120000).Nbatch == 2  # a given NT is kept

    # 4 s at 30 kHz: with the default batch (2 batches) learning found 2 of the 8 units; 20 s find 6
    recording, gt = sc.generate_ground_truth_recording(durations=[4.0], sampling_frequency=30000.0, num_channels=16,
                                                       num_units=8, seed=0)
    with caplog.at_level(logging.INFO, logger="si_ks2py"):
        sorting = si_ks2py.run(recording, tmp_path / "out", verbose=False, device="cpu", progress=False, fig=False)
    assert "NT=15104 (8 batches)" in caplog.text
    assert summary(score(gt, sorting))["accuracy_0.8"] >= 5


def test_float_recordings_sort_the_same_at_any_scale(tmp_path):
    """Whitening's regulariser was an absolute 1e-6: volts (x 1e-6) ended in "no isolated spikes" and x 1e-4 lost
    a unit. Now microvolts, x 1e-4 and x 1e-6 give the same sorting."""
    import spikeinterface.preprocessing as spre

    import si_ks2py

    recording = small_recording(duration=4.0)
    params = {"device": "cpu", "progress": False, "fig": False, "verbose": False}
    reference = si_ks2py.run(recording, tmp_path / "uV", **params)
    assert reference.get_num_units() >= 6
    for scale in (1e-4, 1e-6):
        sorting = si_ks2py.run(spre.scale(recording, gain=scale, dtype="float32"), tmp_path / f"{scale:g}", **params)
        assert list(sorting.unit_ids) == list(reference.unit_ids), scale
        for unit in reference.unit_ids:
            np.testing.assert_array_equal(sorting.get_unit_spike_train(unit), reference.get_unit_spike_train(unit))


def test_nt_is_bounded_by_the_recording_and_by_memory(tmp_path, monkeypatch):
    from si_ks2py import params, pipeline

    p = params.resolve({"NT": 2 ** 24}, 30000.0, 300000)  # 10 s: one batch of its length, not of 2**24 samples
    assert (p.NT, p.Nbatch) == (300032 + 64, 1)
    assert params.resolve({"NT": 2 ** 24}, 30000.0, 2 ** 25).NT == 2 ** 24  # a long enough recording keeps NT
    ctx = pipeline.run(small_recording(duration=2.0), tmp_path / "out", {"device": "cpu", "progress": False,
                                                                         "NT": 2 ** 24}, verbose=False,
                       stop_after="preprocess")
    assert ctx.params.NT == 60032 + 64

    # batches that would not fit in the memory available: refused before any work, naming NT and a value that fits
    monkeypatch.setattr(pipeline, "available_host_memory", lambda: 2 * 10 ** 9)
    long = small_recording(duration=600.0)
    with pytest.raises(ValueError, match=r"NT=16777216 needs about 25\.8 GB .* 2\.0 GB available: lower NT "
                                         r"\(e\.g\. NT=(\d+),") as caught:
        pipeline.run(long, tmp_path / "long", {"device": "cpu", "progress": False, "NT": 2 ** 24}, verbose=False)
    assert not (tmp_path / "long" / "cache" / "manifest.json").exists()
    fits = int(caught.value.args[0].split("e.g. NT=")[1].split(",")[0])
    pipeline.check_batch_memory(params.resolve({"NT": fits}, 30000.0, long.get_num_samples()), 16)


def test_a_figure_job_file_half_written_on_a_full_disk_is_removed(tmp_path, monkeypatch):
    from si_ks2py import plots

    def full_disk(path, **arrays):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plots.np, "savez", full_disk)
    with pytest.raises(OSError, match="No space left"):
        with plots.FigureProcess(tmp_path) as figures:
            figures.draw("batch_similarity", ccb=np.eye(4), iorig=np.arange(4))
    assert list((tmp_path / "qc").glob(".*.npz")) == []
