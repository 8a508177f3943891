import json

import numpy as np
import pytest

from si_ks2py.context import Intermediate
from si_ks2py.pipeline import run, stage_fingerprints
from si_ks2py import params
from conftest import generate_recording


def test_second_run_skips_cached_stage_and_changed_param_recomputes(tmp_path):
    recording, _ = generate_recording(duration=4.0, seed=5)
    folder = tmp_path / "out"
    first = run(recording, folder, {}, verbose=False, stop_after="preprocess")
    assert "preprocess" in first.timings
    wrot = np.array(first.intermediate.Wrot)

    again = run(recording, folder, {}, verbose=False, stop_after="preprocess")
    assert again.timings == {}  # nothing ran
    np.testing.assert_array_equal(again.intermediate.Wrot, wrot)

    # a param of a later stage leaves preprocessing valid
    later = run(recording, folder, {"AUCsplit": 0.8}, verbose=False, stop_after="preprocess")
    assert later.timings == {}

    changed = run(recording, folder, {"freq_min": 300.0}, verbose=False, stop_after="preprocess")
    assert "preprocess" in changed.timings
    assert not np.allclose(changed.intermediate.Wrot, wrot)


def test_changed_recording_recomputes(tmp_path):
    folder = tmp_path / "out"
    run(generate_recording(duration=4.0, seed=5)[0], folder, {}, verbose=False, stop_after="preprocess")
    other = run(generate_recording(duration=4.0, seed=6)[0], folder, {}, verbose=False, stop_after="preprocess")
    assert "preprocess" in other.timings


def test_fingerprints_chain_through_stages():
    base = params.default_params()
    fps = stage_fingerprints("rec", base)
    learn_changed = stage_fingerprints("rec", {**base, "lam": 5.0})
    assert list(fps) == ["preprocess", "drift", "reorder", "learn", "extract", "merge", "split", "cutoff"]
    assert [fps[s] == learn_changed[s] for s in fps] == [True] * 3 + [False] * 5
    split_changed = stage_fingerprints("rec", {**base, "AUCsplit": 0.5})
    assert [fps[s] == split_changed[s] for s in fps] == [True] * 6 + [False] * 2
    drift_changed = stage_fingerprints("rec", {**base, "sig": 30.0})
    assert [fps[s] == drift_changed[s] for s in fps] == [True] + [False] * 7
    assert all(fps[s] != v for s, v in stage_fingerprints("other", base).items())
    # run-only params never invalidate
    assert stage_fingerprints("rec", {**base, "device": "cpu", "progress": False}) == fps


def test_without_drift_correction_the_chain_is_kilosort_2_0s():
    """do_correction=False (or nblocks=0) drops the drift stage from the chain: the later stages' fingerprints
    chain from preprocessing as they did before the stage existed, whatever the drift params say."""
    base = params.default_params()
    off = stage_fingerprints("rec", {**base, "do_correction": False})
    assert "drift" not in off
    assert off == stage_fingerprints("rec", {**base, "nblocks": 0, "sig": 40.0})
    on = stage_fingerprints("rec", base)
    assert off["preprocess"] == on["preprocess"] and off["reorder"] != on["reorder"]


def test_stale_or_half_written_arrays_are_never_read(tmp_path, monkeypatch):
    ir = Intermediate(tmp_path, {"preprocess": "a"})
    ir.current_stage = "preprocess"
    ir.Wrot = np.eye(3)
    assert ir.has("Wrot")
    ir.wait_for_files()  # written by the writer thread

    # same folder, another fingerprint for the stage: the array is stale
    stale = Intermediate(tmp_path, {"preprocess": "b"})
    assert not stale.has("Wrot")
    with pytest.raises(AttributeError, match="no valid intermediate 'Wrot'"):
        stale.Wrot

    # a write that dies half-way leaves the previous version and no record of the new one
    def dies(f, array, allow_pickle):
        f.write(b"\x93NUMPY garbage")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "save", dies)
    ir.Wrot = np.zeros((3, 3))
    with pytest.raises(KeyboardInterrupt):
        ir.wait_for_files()  # the writer thread's error, raised where the run waits for its writes
    monkeypatch.undo()
    fresh = Intermediate(tmp_path, {"preprocess": "a"})
    np.testing.assert_array_equal(fresh.Wrot, np.eye(3))
    assert not list(tmp_path.glob("*.part"))

    # a file being written is recorded only once complete
    with pytest.raises(RuntimeError):
        with ir.write_file("temp_wh.dat") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError
    assert not ir.has_file("temp_wh.dat")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert "temp_wh.dat" not in manifest["files"]


def test_array_written_in_pieces_is_recorded_only_when_complete(tmp_path):
    """write_array (the extraction's features, filled batch by batch from a spill file): a fill that fails leaves
    neither the array nor a record of it nor a temporary file; one that completes reads back equal."""
    ir = Intermediate(tmp_path, {"extract": "fp"})
    ir.current_stage = "extract"
    values = np.arange(24, dtype=np.float32).reshape(6, 2, 2)

    def fill_then_fail(out):
        out[:3] = values[:3]
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        ir.write_array("cProjPC", values.shape, np.float32, fill_then_fail)
    assert not ir.has("cProjPC") and list(tmp_path.iterdir()) == []

    def fill_in_two_pieces(out):
        out[:3], out[3:] = values[:3], values[3:]

    ir.write_array("cProjPC", values.shape, np.float32, fill_in_two_pieces)
    np.testing.assert_array_equal(ir.cProjPC, values)  # readable at once, while the writer syncs the file
    ir.wait_for_files()
    again = Intermediate(tmp_path, {"extract": "fp"})
    np.testing.assert_array_equal(again.cProjPC, values)


def test_stage_is_recorded_done_only_after_its_arrays_are_written(tmp_path, monkeypatch):
    """The writer thread writes in call order: a stage whose array write fails is not recorded as done, the error
    comes out of wait_for_files, and a kept array cannot change before it is written."""
    ir = Intermediate(tmp_path, {"reorder": "fp", "learn": "fq"})
    ir.current_stage = "reorder"
    iorig = np.arange(4)
    ir.iorig = iorig
    with pytest.raises(ValueError, match="read-only"):
        iorig[0] = 3
    ir.mark_stage_done("reorder")
    ir.wait_for_files()
    assert Intermediate(tmp_path, {"reorder": "fp"}).stage_is_done("reorder")

    def full_disk(f, array, allow_pickle):
        raise OSError(28, "No space left on device")

    ir.current_stage = "learn"
    monkeypatch.setattr(np, "save", full_disk)
    ir.W = np.ones(3)
    ir.mark_stage_done("learn")
    with pytest.raises(OSError, match="No space left"):
        ir.wait_for_files()
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="an earlier write failed"):
        ir.wait_for_files()  # the stage's record, queued after the failed write, is not written
    fresh = Intermediate(tmp_path, {"reorder": "fp", "learn": "fq"})
    assert fresh.stage_is_done("reorder") and not fresh.stage_is_done("learn") and not fresh.has("W")
