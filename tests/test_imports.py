"""The sort's critical path imports only what its first stages need: the post-processing stages' modules (numba's
correlograms, the host op table; about 0.3 s) are imported in the background once learning starts, and
spikeinterface.sorters (every sorter's and extractor's module) only by those who use it, with ks2py registered in
it whichever of the two is imported first."""

import pytest

import subprocess
import sys

LATER = ("si_ks2py.stages.merge", "si_ks2py.stages.split", "si_ks2py.stages.cutoff")
SCRIPT = f"""
import sys, time
from si_ks2py.demo import generate_demo_recording
from si_ks2py.pipeline import build_context, run_stages

later = {LATER!r}
recording, _ = generate_demo_recording(duration=5.0, num_channels=16, num_units=3, seed=1)
ctx = build_context(recording, sys.argv[1], {{"device": "cpu", "progress": False}}, verbose=False)
print("before the stages:", sorted(m for m in later if m in sys.modules))
print("spikeinterface.sorters imported:", "spikeinterface.sorters" in sys.modules)
run_stages(ctx, stop_after="learn")
for _ in range(200):  # the background import may still be running
    if all(m in sys.modules for m in later):
        break
    time.sleep(0.05)
print("after learning:", sorted(m for m in later if m in sys.modules))
"""


def test_post_processing_modules_are_imported_in_the_background_during_learning(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["before the stages"] == "[]"
    assert lines["spikeinterface.sorters imported"] == "False"
    assert lines["after learning"] == str(sorted(LATER))


@pytest.mark.parametrize("first", ["si_ks2py", "spikeinterface.sorters"])
def test_the_sorter_is_registered_whichever_package_is_imported_first(first):
    second = "spikeinterface.sorters" if first == "si_ks2py" else "si_ks2py"
    script = (f"import {first}, sys; print('sorters imported:', 'spikeinterface.sorters' in sys.modules)\n"
              f"import {second}; from spikeinterface.sorters import sorterlist, get_default_sorter_params\n"
              "print('registered:', sorterlist.sorter_dict.get('ks2py').__name__)\n"
              "print('params:', get_default_sorter_params('ks2py')['detect_threshold'])")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines() if ": " in line)
    assert lines["sorters imported"] == str(first == "spikeinterface.sorters")
    assert lines["registered"] == "Ks2PySorter"
    assert float(lines["params"]) > 0
