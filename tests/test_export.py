"""The Phy folder and the returned sorting: phylib and SpikeInterface load it and agree; post-processing helps."""

import time

import numpy as np
import pytest
import spikeinterface.extractors as se
from PIL import Image
from spikeinterface.core import NumpySorting

import si_ks2py
from si_ks2py import plots
from si_ks2py.context import Bunch, Intermediate
from si_ks2py.export import run_export
from si_ks2py.demo import generate_demo_recording, score, summary
from si_ks2py.pipeline import run

pytestmark = pytest.mark.slow


def output(demo_sort):
    return demo_sort["folder"] / "sorter_output"


def test_phylib_template_model_loads_and_agrees(demo_sort):
    from phylib.io.model import load_model

    sorting = demo_sort["sorting"]
    model = load_model(output(demo_sort) / "params.py")
    try:
        assert model.n_channels == 32 and model.sample_rate == 30000.0
        times = np.round(model.spike_times * model.sample_rate).astype(np.int64)
        for unit in sorting.unit_ids:
            np.testing.assert_array_equal(times[model.spike_clusters == unit], sorting.get_unit_spike_train(unit))
        assert set(np.unique(model.spike_clusters)) == set(sorting.unit_ids)
        assert model.sparse_templates.data.shape == (model.n_templates, 82, 32)
        assert model.sparse_features.data.shape == (model.n_spikes, 32, 3)  # phylib's layout of pc_features
        assert model.sparse_template_features.data.shape == (model.n_spikes, 32)
        labels = dict(zip(sorting.unit_ids.tolist(), sorting.get_property("KSLabel")))
        assert model.metadata["KSLabel"] == labels
        waveforms = model.get_waveforms(np.arange(5), np.arange(4))  # reads the recording's own file
        assert waveforms.shape == (5, 82, 4) and np.isfinite(waveforms).all()
    finally:
        model.close()


def test_read_kilosort_agrees_with_returned_sorting(demo_sort):
    sorting = demo_sort["sorting"]
    phy = se.read_kilosort(output(demo_sort))
    assert list(phy.unit_ids) == list(sorting.unit_ids)
    assert phy.count_num_spikes_per_unit() == sorting.count_num_spikes_per_unit()
    for unit in sorting.unit_ids:
        np.testing.assert_array_equal(phy.get_unit_spike_train(unit), sorting.get_unit_spike_train(unit))
    for name in ("KSLabel", "ContamPct", "Amplitude", "original_cluster_id"):
        np.testing.assert_array_equal(phy.get_property(name), sorting.get_property(name))
    good = se.read_kilosort(output(demo_sort), keep_good_only=True)
    assert list(good.unit_ids) == list(sorting.unit_ids[sorting.get_property("KSLabel") == "good"])


def test_extraction_leaves_its_features_complete_and_no_spill_file(demo_sort):
    """Extraction spills each batch's features to a file and copies them into place at the end: the cache holds
    one feature row per spike and no temporary file."""
    cache = output(demo_sort) / "cache"
    n_spikes = len(np.load(cache / "st3.npy"))
    assert np.load(cache / "cProjPC.npy", mmap_mode="r").shape[0] == n_spikes
    assert np.load(cache / "cProj.npy", mmap_mode="r").shape[0] == n_spikes
    assert sorted(p.name for p in cache.glob(".*")) == [".ks2py.lock"]  # the folder's lock, nothing temporary


def test_phy_files_have_kilosort_dtypes_and_shapes(demo_sort):
    folder = output(demo_sort)
    load = lambda name: np.load(folder / f"{name}.npy")  # noqa: E731
    n = len(load("spike_times"))
    n_templates = len(load("templates"))
    expected = {"spike_times": (np.uint64, (n,)), "spike_templates": (np.uint32, (n,)),
                "spike_clusters": (np.uint32, (n,)), "amplitudes": (np.float64, (n,)),
                "templates": (np.float32, (n_templates, 82, 32)), "templates_ind": (np.float64, (n_templates, 32)),
                "channel_map": (np.int32, (32,)), "channel_positions": (np.float64, (32, 2)),
                "similar_templates": (np.float32, (n_templates, n_templates)),
                "pc_features": (np.float32, (n, 3, 32)), "pc_feature_ind": (np.uint32, (n_templates, 32)),
                "template_features": (np.float32, (n, 32)), "template_feature_ind": (np.uint32, (n_templates, 32)),
                "whitening_mat": (np.float64, (32, 32)), "whitening_mat_inv": (np.float64, (32, 32))}
    for name, (dtype, shape) in expected.items():
        array = load(name)
        assert array.dtype == dtype and array.shape == shape, name
    assert np.all(np.diff(load("spike_times").astype(np.int64)) >= 0)
    np.testing.assert_allclose(load("whitening_mat") @ load("whitening_mat_inv"), np.eye(32), atol=1e-8)
    assert (folder / "cluster_KSLabel.tsv").read_text().startswith("cluster_id\tKSLabel\n")
    for figure in ("drift_map", "templates", "batch_similarity"):
        assert (folder / "qc" / f"{figure}.png").stat().st_size > 10_000


def test_post_processing_does_not_lose_units_or_add_bad_ones(demo_sort):
    cache = Intermediate(output(demo_sort) / "cache", {})
    before = np.load(cache.folder / "st3.npy")
    before = NumpySorting.from_samples_and_labels([before[:, 0].astype(np.int64)], [before[:, 1].astype(np.int64)],
                                                  30000.0)
    raw, final = summary(score(demo_sort["gt"], before)), summary(score(demo_sort["gt"], demo_sort["sorting"]))
    assert final["accuracy_0.8"] >= raw["accuracy_0.8"]
    # units that are redundant or false positive (the cutoff can turn a redundant unit into a false positive by
    # dropping its low-score spikes; the count of bad units must not grow)
    assert final["false_positive"] + final["redundant"] <= raw["false_positive"] + raw["redundant"], (raw, final)
    good = demo_sort["sorting"].get_property("KSLabel") == "good"
    good_units = summary(score(demo_sort["gt"], demo_sort["sorting"].select_units(demo_sort["sorting"].unit_ids[good])))
    assert good_units["false_positive"] == good_units["redundant"] == 0
    assert good_units["accuracy_0.8"] == final["accuracy_0.8"]


def test_changing_aucsplit_reruns_only_split_and_cutoff(tmp_path):
    recording, _ = generate_demo_recording(duration=12.0, num_channels=32, num_units=6, seed=3)
    first = run(recording, tmp_path / "out", {"device": "cpu", "progress": False}, verbose=False)
    outputs = {"export", "qc_figures"}  # written by every run
    assert set(first.timings) == {"preprocess", "drift", "reorder", "learn", "extract", "merge", "split",
                                  "cutoff"} | outputs
    again = run(recording, tmp_path / "out", {"device": "cpu", "progress": False, "AUCsplit": 0.8}, verbose=False)
    assert set(again.timings) == {"split", "cutoff"} | outputs
    sorting = si_ks2py.run(recording, tmp_path / "out", device="cpu", progress=False, verbose=False,
                           keep_good_only=True)
    assert set(sorting.get_property("KSLabel")) <= {"good"}


def small_export_context(folder, rng, n_templates=5, n_chan=16, n_batches=9):
    """A ctx with what run_export reads from the cache, and a write_phy stand-in that asks for the two figures with
    arrays of their size, as write_phy does."""
    xc, yc = np.tile([0.0, 32.0], n_chan // 2), np.repeat(np.arange(n_chan // 2) * 20.0, 2)
    ccb = rng.uniform(size=(n_batches, n_batches))
    ir = Bunch(xc=xc, yc=yc, good=np.arange(n_templates) % 2 == 0, ccb=ccb + ccb.T, iorig=rng.permutation(n_batches))
    ctx = Bunch(intermediate=ir, params=Bunch(fs=30000.0), output_folder=folder, timings={},
                user_params={"fig": True, "save_rez_to_mat": False, "delete_tmp_files": ("matlab_files",)})

    def write_phy(_, figures):  # as write_phy: the two figures from the arrays of its files
        n = 3000
        figures.draw("templates", templates=rng.normal(size=(n_templates, 82, n_chan)).astype(np.float32),
                     whitening_inv=np.eye(n_chan), counts=rng.integers(0, 1000, n_templates), good=ir.good, xc=xc,
                     yc=yc)
        figures.draw("drift_map", times_s=np.sort(rng.uniform(0, 10, n)), depths=rng.uniform(0, 160, n),
                     amplitudes=rng.uniform(10, 30, n))

    return ctx, write_phy


def test_qc_figures_are_drawn_while_the_phy_files_are_written(tmp_path, monkeypatch):
    ctx, write_small_phy = small_export_context(tmp_path, np.random.default_rng(0))
    batch_figure = tmp_path / "qc" / "batch_similarity.png"

    def write_phy(ctx, figures):
        deadline = time.monotonic() + 60
        while not batch_figure.exists():  # drawn by the figure process meanwhile (a sequential export hangs)
            assert time.monotonic() < deadline, "the batch figure was not drawn while the Phy files were written"
            time.sleep(0.01)
        write_small_phy(ctx, figures)

    monkeypatch.setattr("si_ks2py.export.phy.write_phy", write_phy)
    run_export(ctx)
    assert set(ctx.timings) == {"export", "qc_figures"}
    sizes = {name: Image.open(tmp_path / "qc" / f"{name}.png").size for name in
             ("drift_map", "templates", "batch_similarity")}
    assert sizes == {"drift_map": (1200, 600), "templates": (1440, 720), "batch_similarity": (1200, 540)}  # 120 dpi


def test_a_qc_figure_error_is_raised_by_the_export(tmp_path, monkeypatch):
    ctx, write_small_phy = small_export_context(tmp_path, np.random.default_rng(1))

    class BrokenTemplates:
        def draw(self, name, **arrays):
            if name == "templates":
                arrays["templates"] = np.zeros(3)  # not [K, nt, Nchan]: the figure fails
            ctx.figures.draw(name, **arrays)

    def write_phy(ctx, figures):
        ctx.figures = figures
        write_small_phy(ctx, BrokenTemplates())

    monkeypatch.setattr("si_ks2py.export.phy.write_phy", write_phy)
    with pytest.raises(RuntimeError, match="drawing the QC figures failed .*Error"):
        run_export(ctx)
    assert (tmp_path / "qc" / "figures.log").read_text().count("Traceback") == 1


def test_the_figure_process_stops_when_the_sort_fails(tmp_path):
    with pytest.raises(ValueError, match="a stage failed"):
        with plots.FigureProcess(tmp_path) as figures:
            figures.draw("batch_similarity", ccb=np.eye(4), iorig=np.arange(4))
            raise ValueError("a stage failed")
    assert all(process.returncode is not None for process in figures.processes)  # stopped, not left running


def test_spike_depths_in_chunks_equal_the_whole_computation(monkeypatch):
    rng = np.random.default_rng(2)
    pc_features = rng.normal(size=(1000, 3, 8)).astype(np.float32)
    pc_feature_ind = rng.integers(0, 16, (5, 8))
    spike_templates = rng.integers(0, 5, 1000)
    yc = rng.uniform(0, 400, 16)
    rows = rng.permutation(1000)
    weights = pc_features[rows, 0, :].astype(np.float64) ** 2
    expected = (weights * yc[pc_feature_ind[spike_templates]]).sum(axis=1) / np.maximum(weights.sum(axis=1), 1e-12)
    monkeypatch.setattr(plots, "SPIKES_PER_CHUNK", 97)
    assert plots.spike_depths(pc_features, rows, pc_feature_ind, spike_templates, yc).tobytes() == expected.tobytes()
