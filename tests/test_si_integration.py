"""SpikeInterface knows "ks2py" in every process of an environment where si-ks2py is installed, with no
``import si_ks2py``: fresh interpreters, the workers of each run_sorter_jobs engine, the script of its slurm engine.

Each test runs a script in a fresh interpreter, so it needs the package installed (its si_ks2py.pth at start-up),
not only importable: the tests are skipped otherwise.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest


def installed_skip_reason() -> str | None:
    try:
        dist = importlib.metadata.distribution("si-ks2py")
    except importlib.metadata.PackageNotFoundError:
        return "si-ks2py is not installed in this interpreter (pip install -e '.[test]')"
    if not any(f.name == "si_ks2py.pth" for f in dist.files or ()):
        return "si-ks2py was installed without its si_ks2py.pth (an install older than it): reinstall it"
    return None


pytestmark = pytest.mark.skipif(installed_skip_reason() is not None, reason=str(installed_skip_reason()))

FAST = {"device": "cpu", "fig": False, "progress": False}  # fig=False: no drawing processes to wait for

# The scripts import spikeinterface only; `unregister()` then takes ks2py out of this process's sorter list, so a
# job that finds the sorter found it in a worker process of its own.
PRELUDE = """
import json, sys
from pathlib import Path
import spikeinterface.core as sc
from spikeinterface.sorters import sorterlist

def unregister():
    cls = sorterlist.sorter_dict.pop("ks2py")
    sorterlist.sorter_full_list.remove(cls)
"""


def run_script(tmp_path, body: str, *args, env=None, timeout=300) -> str:
    """Run PRELUDE + body as tmp_path/main.py (a file, as spawn workers re-import the main module)."""
    script = tmp_path / "main.py"
    script.write_text(PRELUDE + textwrap.dedent(body))
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def fresh_python(code: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture(scope="module")
def tiny_recording(tmp_path_factory):
    """8 s, 16 channels, 5 units, saved as binary: a path a fresh process can load."""
    import spikeinterface.core as sc

    recording, _ = sc.generate_ground_truth_recording(durations=[8.0], sampling_frequency=30000.0, num_channels=16,
                                                      num_units=5, seed=3)
    folder = tmp_path_factory.mktemp("tiny") / "recording"
    recording.save(folder=folder, verbose=False)
    return folder


def test_start_up_hook_imports_nothing_until_spikeinterface_sorters():
    done = fresh_python("import sys; print(sorted(m for m in ('si_ks2py', 'numpy', 'spikeinterface', "
                        "'_si_ks2py_startup') if m in sys.modules))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['_si_ks2py_startup']"


def test_fresh_process_knows_ks2py_through_spikeinterface_alone():
    done = fresh_python("from spikeinterface.sorters import get_default_sorter_params, installed_sorters\n"
                        "import sys; print('ks2py' in installed_sorters(), "
                        "get_default_sorter_params('ks2py')['detect_threshold'], 'si_ks2py.sorter' in sys.modules)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "6.0", "True"]


def test_a_failed_registration_is_a_warning_not_a_broken_spikeinterface():
    done = fresh_python("import sys; sys.modules['si_ks2py'] = None  # import si_ks2py fails\n"
                        "from spikeinterface.sorters import sorter_dict, run_sorter\n"
                        "print('ks2py' in sorter_dict, 'kilosort2' in sorter_dict)")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]
    assert "the sorter 'ks2py' could not be registered with SpikeInterface" in done.stderr


@pytest.mark.slow
def test_run_sorter_then_read_sorter_folder_in_fresh_processes(tiny_recording, tmp_path):
    out = run_script(tmp_path, f"""
        from spikeinterface.sorters import run_sorter
        sorting = run_sorter("ks2py", sc.load(sys.argv[1]), folder="sort", **{FAST!r})
        print(json.dumps({{"units": len(sorting.unit_ids), "spikes": int(sorting.count_total_num_spikes())}}))
        """, tiny_recording)
    sorted_ = json.loads(out.splitlines()[-1])
    assert sorted_["units"] > 0
    done = fresh_python(f"from spikeinterface.sorters import read_sorter_folder\n"
                        f"s = read_sorter_folder({str(tmp_path / 'sort')!r})\n"
                        "print(len(s.unit_ids), s.count_total_num_spikes())")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(sorted_["units"]), str(sorted_["spikes"])]


ENGINES = {
    "loop": "{}",
    "joblib": "{'n_jobs': 2, 'backend': 'loky'}",
    "processpoolexecutor": "{'max_workers': 1, 'mp_context': __import__('multiprocessing').get_context('spawn')}",
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_run_sorter_jobs_engines(engine, tiny_recording, tmp_path):
    out = run_script(tmp_path, f"""
        from spikeinterface.sorters import run_sorter_jobs
        if __name__ == "__main__":
            if {engine!r} != "loop":  # the job must find ks2py in the worker
                unregister()
            job = dict(sorter_name="ks2py", recording=sc.load(sys.argv[1]), folder="sort", **{FAST!r})
            sortings = run_sorter_jobs([job], engine={engine!r}, engine_kwargs={ENGINES[engine]}, return_output=True)
            print("units:", len(sortings[0].unit_ids))
        """, tiny_recording)
    assert int(out.split("units:")[-1]) > 0
    assert json.loads((tmp_path / "sort" / "spikeinterface_log.json").read_text())["error"] is False


@pytest.mark.slow
def test_run_sorter_jobs_dask_engine(tiny_recording, tmp_path):
    pytest.importorskip("distributed")
    run_script(tmp_path, f"""
        from spikeinterface.sorters import run_sorter_jobs
        from distributed import Client, LocalCluster
        if __name__ == "__main__":
            unregister()
            with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \\
                    Client(cluster) as client:
                job = dict(sorter_name="ks2py", recording=sc.load(sys.argv[1]), folder="sort", **{FAST!r})
                run_sorter_jobs([job], engine="dask", engine_kwargs={{"client": client}})
        """, tiny_recording)
    assert json.loads((tmp_path / "sort" / "spikeinterface_log.json").read_text())["error"] is False


@pytest.mark.slow
def test_run_sorter_jobs_slurm_script(tiny_recording, tmp_path):
    """The slurm engine writes a script that imports only spikeinterface and hands it to sbatch: a stand-in sbatch
    runs it at once."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    sbatch = bin_folder / "sbatch"
    sbatch.write_text('#!/bin/sh\nfor script; do :; done\nexec "$script"\n')  # the last argument is the script
    sbatch.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}"}
    run_script(tmp_path, f"""
        from spikeinterface.sorters import run_sorter_jobs, read_sorter_folder
        job = dict(sorter_name="ks2py", recording=sc.load(sys.argv[1]), folder=Path("sort").absolute(), **{FAST!r})
        run_sorter_jobs([job], engine="slurm", engine_kwargs={{"tmp_script_folder": "scripts"}})
        print("units:", len(read_sorter_folder("sort").unit_ids))
        """, tiny_recording, env=env)
    script = (tmp_path / "scripts" / "si_script_0.py").read_text()
    assert "si_ks2py" not in script
    assert json.loads((tmp_path / "sort" / "spikeinterface_log.json").read_text())["error"] is False


@pytest.mark.slow
def test_run_sorter_by_property_sorts_each_shank_in_spawned_workers(tmp_path):
    import probeinterface as pi
    import spikeinterface.core as sc

    probe = pi.generate_multi_shank(num_shank=2, num_columns=2, num_contact_per_column=8, xpitch=20,
                                   ypitch=20, shank_pitch=[100, 0])
    probe.set_device_channel_indices(np.arange(probe.get_contact_count()))
    recording, _ = sc.generate_ground_truth_recording(durations=[8.0], sampling_frequency=30000.0, probe=probe,
                                                      num_units=16, seed=4)
    recording.set_probe(probe, group_mode="by_shank")  # in place (SpikeInterface >= 0.105): the "group" property
    recording.save(folder=tmp_path / "recording", verbose=False)
    out = run_script(tmp_path, f"""
        import multiprocessing
        from spikeinterface.sorters import run_sorter_by_property
        if __name__ == "__main__":
            unregister()
            sorting = run_sorter_by_property("ks2py", sc.load(sys.argv[1]), "group", "by_shank",
                                             engine="processpoolexecutor",
                                             engine_kwargs={{"max_workers": 2,
                                                             "mp_context": multiprocessing.get_context("spawn")}},
                                             **{FAST!r})
            print("groups:", sorted(set(sorting.get_property("group").tolist())))
        """, tmp_path / "recording")
    assert out.split("groups:")[-1].strip() == "[0, 1]"
    for shank in (0, 1):
        params = json.loads((tmp_path / "by_shank" / str(shank) / "spikeinterface_params.json").read_text())
        assert params["sorter_name"] == "ks2py"
