import numpy as np
import pytest
from spikeinterface.sorters import get_default_sorter_params, get_sorter_params_description

import si_ks2py
from si_ks2py import params

# The options SpikeInterface's kilosort2 wrapper exposes, with its defaults.
KILOSORT2_WRAPPER_DEFAULTS = {
    "detect_threshold": 6, "projection_threshold": [10, 4], "preclust_threshold": 8, "whiteningRange": 32,
    "momentum": [20.0, 400.0], "car": True, "minFR": 0.1, "minfr_goodchannels": 0.1, "freq_min": 150,
    "sigmaMask": 30, "lam": 10.0, "nPCs": 3, "ntbuff": 64, "nfilt_factor": 4, "NT": None, "AUCsplit": 0.9,
    "wave_length": 61, "keep_good_only": False, "skip_kilosort_preprocessing": False, "scaleproc": None,
    "save_rez_to_mat": False, "delete_tmp_files": ("matlab_files",), "delete_recording_dat": False,
}


def test_defaults_include_kilosort2_wrapper_options_with_same_defaults():
    defaults = get_default_sorter_params("ks2py")
    for name, value in KILOSORT2_WRAPPER_DEFAULTS.items():
        assert defaults[name] == value or list(defaults[name]) == list(value), name
    # a kilosort2 params dict validates unchanged
    params.validate(KILOSORT2_WRAPPER_DEFAULTS)


def test_every_param_has_description_and_valid_default():
    descriptions = get_sorter_params_description("ks2py")
    defaults = get_default_sorter_params("ks2py")
    assert set(descriptions) == set(defaults)
    assert all(len(text) > 20 for text in descriptions.values())
    assert params.validate({}) == defaults


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("detect_treshold", 5, "unknown ks2py param"),
        ("detect_threshold", "6", "'detect_threshold' must be a finite number"),
        ("detect_threshold", -6, "'detect_threshold' = -6 is out of range"),
        ("projection_threshold", [10], "'projection_threshold' must be a list of two numbers"),
        ("projection_threshold", [10, "4"], "'projection_threshold[1]'"),
        ("nPCs", 2.5, "'nPCs' must be an integer"),
        ("nPCs", True, "'nPCs' must be an integer"),
        ("car", 1, "'car' must be True or False"),
        ("AUCsplit", 1.5, "'AUCsplit' = 1.5 is out of range"),
        ("wave_length", 60, "'wave_length' must be odd"),
        ("device", "gpu", "'device' must be one of"),
        ("delete_tmp_files", ("temp.dat",), "'delete_tmp_files'"),
        ("trange", [5, 2], "'trange'"),
        ("NT", 100, "'NT' = 100 is out of range"),
        ("lam", float("nan"), "'lam' must be a finite number"),
        ("minFR", None, "'minFR' must not be None"),
    ],
)
def test_bad_option_raises_naming_it(name, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        params.validate({name: value})


def test_checks_against_recording():
    with pytest.raises(ValueError, match="'freq_min' = 20000.0 Hz must be below the Nyquist"):
        params.validate({"freq_min": 20000.0}, sampling_frequency=30000.0)
    with pytest.raises(ValueError, match="'scaleproc' must be given"):
        params.validate({"skip_kilosort_preprocessing": True})
    with pytest.raises(ValueError, match="too short to sort"):
        params.resolve({"trange": [0, 0.001]}, 30000.0, 300000)


def test_resolve_derives_kilosort_sizes():
    p = params.resolve({}, 30000.0, 30000 * 10)
    assert p.NT == 64 * 1024 + 64 and p.NTbuff == p.NT + 256
    assert p.nt0 == 61 and p.nt0min == 20
    assert p.spkTh == -6.0 and p.Th == [10.0, 4.0] and p.scaleproc == 200.0
    assert p.Nbatch == int(np.ceil(300000 / 65536))
    q = params.resolve({"trange": [1.0, 4.0], "NT": 32768 + 64}, 30000.0, 30000 * 10)
    assert (q.t_start, q.t_stop, q.n_samples, q.Nbatch) == (30000, 120000, 90000, 3)


def test_docs_params_reference_is_generated_from_table():
    from pathlib import Path

    doc = Path(__file__).parents[1] / "docs" / "params.md"
    assert doc.read_text().strip() == params.markdown_reference().strip(), (
        "docs/params.md is stale: regenerate with si-ks2py params-doc > docs/params.md"
    )


def test_run_sorter_rejects_bad_param_before_work(small_recording, tmp_path):
    from spikeinterface.sorters import run_sorter

    recording, _ = small_recording
    with pytest.raises(ValueError, match="'lam'"):
        run_sorter("ks2py", recording, folder=tmp_path / "out", lam=-1.0)
    assert not (tmp_path / "out" / "sorter_output" / "cache").exists()
    assert si_ks2py.Ks2PySorter.get_sorter_version() == si_ks2py.__version__
