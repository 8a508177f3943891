"""The SpikeInterface sorter "ks2py" (a BaseSorter subclass)."""

from __future__ import annotations

from pathlib import Path

from spikeinterface.sorters.basesorter import BaseSorter

from . import __version__, params


class Ks2PySorter(BaseSorter):
    """Kilosort 2.0 in Python: CuPy kernels on a GPU, NumPy on the CPU."""

    sorter_name = "ks2py"
    requires_locations = True
    gpu_capability = "nvidia-optional"
    requires_binary_data = False  # traces are read from the recording in batches: no binary copy
    compatible_with_parallel = {"loky": False, "multiprocessing": False, "threading": False}
    handle_multi_segment = False

    _default_params = params.default_params()
    _params_description = params.params_description()
    sorter_description = (
        "ks2py is Kilosort 2.0 (template matching with drift tracking by batch reordering) ported to Python: "
        "its kernels run as CuPy CUDA kernels on an NVIDIA GPU, or as their NumPy twins on the CPU."
    )
    installation_mesg = "pip install si-ks2py  (and 'si-ks2py[gpu]' for the CUDA kernels)"

    @classmethod
    def is_installed(cls):
        return True

    @classmethod
    def get_sorter_version(cls):
        return __version__

    @classmethod
    def use_gpu(cls, sorter_params):
        return sorter_params.get("device", "auto") != "cpu"

    @classmethod
    def initialize_folder(cls, recording, output_folder, verbose, remove_existing_folder):
        """SpikeInterface's, after a check that no sort is running in the folder it would delete first."""
        from .context import raise_if_in_use

        if output_folder is not None:
            raise_if_in_use(Path(output_folder) / "sorter_output", "output folder")
        return super().initialize_folder(recording, output_folder, verbose, remove_existing_folder)

    @classmethod
    def _check_params(cls, recording, output_folder, sorter_params):
        from .pipeline import check_recording

        check_recording(recording)
        validated = params.validate(sorter_params, recording.get_sampling_frequency())
        params.resolve(validated, recording.get_sampling_frequency(), recording.get_num_samples(0))
        return validated

    @classmethod
    def _setup_recording(cls, recording, sorter_output_folder, sorter_params, verbose):
        pass  # the recording itself (dumped by SpikeInterface) is read in batches: nothing to prepare

    @classmethod
    def _run_from_folder(cls, sorter_output_folder, sorter_params, verbose):
        from .pipeline import run

        sorter_output_folder = Path(sorter_output_folder)
        recording = cls.load_recording_from_folder(sorter_output_folder.parent, with_warnings=False)
        if recording is None:
            raise RuntimeError("the recording dumped by SpikeInterface could not be loaded back")
        run(recording, sorter_output_folder, sorter_params, verbose=verbose)

    @classmethod
    def _get_result_from_folder(cls, sorter_output_folder):
        import json

        from .export.sorting import read_sorting

        sorter_output_folder = Path(sorter_output_folder)
        params_file = sorter_output_folder.parent / "spikeinterface_params.json"
        keep_good_only = False
        if params_file.exists():
            keep_good_only = json.loads(params_file.read_text())["sorter_params"].get("keep_good_only", False)
        return read_sorting(sorter_output_folder, keep_good_only=keep_good_only)
