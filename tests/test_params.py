import numpy as np
import pytest
from spikeinterface.sorters import get_default_sorter_params, get_sorter_params_description

import si_ks2py
from si_ks2py import params

def kilosort2_defaults() -> dict:
    """SpikeInterface's kilosort2 params, its job kwargs included (get_default_sorter_params("kilosort2"))."""
    from spikeinterface.sorters.external.kilosort2 import Kilosort2Sorter

    return Kilosort2Sorter.default_params()


def test_defaults_include_kilosort2_wrapper_options_with_same_defaults():
    defaults = get_default_sorter_params("ks2py")
    for name, value in kilosort2_defaults().items():
        assert name in defaults, name
        assert defaults[name] == value or list(defaults[name]) == list(value), name
    params.validate(kilosort2_defaults())  # a kilosort2 params dict validates unchanged


def test_every_kilosort2_param_sets_the_same_kilosort_option():
    """The Kilosort ops fields that SpikeInterface's kilosort2 wrapper sets from a params dict (its _check_params
    and _get_specific_options) are those ks2py resolves the same dict to. At 30 kHz: ks2py scales wave_length with
    the sampling rate (docs/stages.md), kilosort2 does not."""
    from spikeinterface.sorters.external.kilosort2 import Kilosort2Sorter

    user = {**kilosort2_defaults(), "detect_threshold": 5, "projection_threshold": [9, 3], "preclust_threshold": 7,
            "whiteningRange": 16, "momentum": [30.0, 300.0], "car": False, "minFR": 0.05, "minfr_goodchannels": 0.2,
            "freq_min": 300, "sigmaMask": 25, "lam": 20.0, "nPCs": 2, "ntbuff": 32, "nfilt_factor": 3,
            "NT": 40010, "AUCsplit": 0.8, "wave_length": 50, "scaleproc": 150}
    checked = Kilosort2Sorter._check_params(None, None, dict(user))
    ks2_ops = Kilosort2Sorter._get_specific_options({"CAR": 1.0 if checked["car"] else 0.0}, checked)
    ours = params.resolve(user, 30000.0, 30000 * 60)
    fields = ("fshigh", "minfr_goodchannels", "Th", "lam", "AUCsplit", "minFR", "momentum", "sigmaMask", "ThPre",
              "spkTh", "reorder", "nskip", "nfilt_factor", "ntbuff", "NT", "whiteningRange", "nSkipCov", "nPCs",
              "nt0", "scaleproc", "CAR")
    for field in fields:
        np.testing.assert_allclose(np.asarray(ours[field], dtype=float), np.asarray(ks2_ops[field], dtype=float),
                                   err_msg=field)
    assert (ours.NT, ours.nt0) == (40000, 51)  # rounded to a multiple of 32, made odd


def test_even_wave_length_and_unrounded_NT_are_adjusted_as_kilosort2_does(caplog):
    with caplog.at_level("WARNING", logger="si_ks2py"):
        full = params.validate({"wave_length": 60, "NT": 20010})
    assert (full["wave_length"], full["NT"]) == (61, 20000)
    assert "wave_length = 60 is even: 61 is used" in caplog.text
    assert "NT = 20010 is rounded down to 20000" in caplog.text
    caplog.clear()
    params.validate(full)
    assert caplog.text == ""  # what is already adjusted is left alone


@pytest.mark.slow
def test_spikeinterface_kilosort2_params_sort_unchanged(small_recording, tmp_path):
    from spikeinterface.sorters import run_sorter

    recording, _ = small_recording
    sorting = run_sorter("ks2py", recording, folder=tmp_path / "out", verbose=False,
                         **get_default_sorter_params("kilosort2"))
    assert len(sorting.unit_ids) > 0


def test_progress_bar_job_kwarg_hides_the_progress_bars(small_recording, tmp_path):
    from si_ks2py.pipeline import build_context

    recording, _ = small_recording
    shown = build_context(recording, tmp_path / "a", {"device": "cpu"}, verbose=True).show_progress
    hidden = build_context(recording, tmp_path / "b", {"device": "cpu", "progress_bar": False}, verbose=True)
    assert shown and not hidden.show_progress


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
        ("wave_length", 10, "'wave_length' = 10 is out of range"),
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
