"""A sort killed with SIGKILL at any point resumes from its cache and gives the uninterrupted run's result."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from si_ks2py.demo import generate_demo_recording
from si_ks2py.export.sorting import read_sorting
from si_ks2py.pipeline import STAGES, run

pytestmark = pytest.mark.slow
PARAMS = {"device": "cpu", "progress": False}
SORT = "import sys, spikeinterface.core as sc, si_ks2py; si_ks2py.run(sc.load(sys.argv[1]), sys.argv[2], " \
       "verbose=False, device='cpu', progress=False)"
# The whitened file of a small recording is written in milliseconds, too fast to catch from outside: this sort
# kills itself with SIGKILL once half of the file's rows are on disk.
SORT_KILLED_WRITING = """
import os, signal, sys
from si_ks2py.stages import drift, preprocess

def write_half_then_die(f, data, rows=2 ** 16):
    f.write(memoryview(data[:len(data) // 2]))
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

preprocess.write_rows = drift.write_rows = write_half_then_die  # the drift stage writes it when it corrects
""" + SORT


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    recording, _ = generate_demo_recording(duration=12.0, num_units=6, seed=21)
    recording = recording.save(folder=base / "recording", verbose=False)
    run(recording, base / "reference", PARAMS, verbose=False)
    return recording, base


def stage_recorded(cache, stage: str) -> bool:
    """Whether the cache's manifest records ``stage`` as done (its arrays are written before it is)."""
    try:
        return stage in json.loads((cache / "manifest.json").read_text())["stages"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def kill_when(process, condition, timeout=120.0):
    """SIGKILL the process as soon as condition() holds; False if it ended first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and process.poll() is None:
        if condition():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait()
    return False


@pytest.mark.parametrize("point", ["writing temp_wh.dat"] + [f"{s} done" for s in STAGES[:-1]])
def test_killed_sort_resumes_to_the_same_result(saved, tmp_path, point):
    recording, base = saved
    out = tmp_path / "out"
    log = out / "ks2py.log"
    if point == "writing temp_wh.dat":
        process = subprocess.run([sys.executable, "-c", SORT_KILLED_WRITING, str(base / "recording"), str(out)])
        killed = process.returncode == -signal.SIGKILL and (out / "cache" / ".temp_wh.dat.part").exists()
    else:
        process = subprocess.Popen([sys.executable, "-c", SORT, str(base / "recording"), str(out)])
        stage = point.split()[0]  # killed once the stage is recorded and the whitened file (background) written
        killed = kill_when(process, lambda: stage_recorded(out / "cache", stage) and log.exists()
                           and "temp_wh.dat written" in log.read_text())
    assert killed, f"the sort was not killed at {point}"
    ctx = run(recording, out, PARAMS, verbose=False)
    if point != "writing temp_wh.dat":  # the stages finished before the kill are not run again
        finished = STAGES[:STAGES.index(point.split()[0]) + 1]
        assert not set(ctx.timings) & set(finished), ctx.timings
    resumed, reference = read_sorting(out), read_sorting(base / "reference")
    assert list(resumed.unit_ids) == list(reference.unit_ids)
    for unit in reference.unit_ids:
        np.testing.assert_array_equal(resumed.get_unit_spike_train(unit), reference.get_unit_spike_train(unit))
