"""si_ks2py: Kilosort 2.0 in Python, as the SpikeInterface sorter "ks2py".

``import si_ks2py`` registers the sorter, so ``spikeinterface.sorters.run_sorter("ks2py", recording, folder=...)``
works.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

import wrapt  # noqa: E402

from .context import Bunch  # noqa: E402
from .logs import add_default_handler  # noqa: E402
from .params import default_params  # noqa: E402


def _register(sorters_module):
    """Add Ks2PySorter to SpikeInterface's sorter list (the objects run_sorter looks names up in)."""
    from spikeinterface.sorters import sorterlist

    from .sorter import Ks2PySorter

    if Ks2PySorter not in sorterlist.sorter_full_list:
        sorterlist.sorter_full_list.append(Ks2PySorter)
    sorterlist.sorter_dict[Ks2PySorter.sorter_name] = Ks2PySorter


# registered once spikeinterface.sorters is imported (at once if it is already): importing it loads every
# sorter's and extractor's module (about 0.8 s), which the pipeline itself does not need
wrapt.register_post_import_hook(_register, "spikeinterface.sorters")


def __getattr__(name):
    if name == "Ks2PySorter":
        from .sorter import Ks2PySorter

        return Ks2PySorter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(recording=None, output_folder=None, verbose: bool = True, *, dat_path=None, probe=None, dir_path=None,
        **params):
    """Sort without SpikeInterface's folder handling (an existing output folder is resumed, not deleted).

    - ``run(recording, output_folder, **params)``: a SpikeInterface recording with a probe.
    - ``run(dat_path, probe=probe, dir_path=dir_path, **params)``: pykilosort's call, a raw binary file of
      ``probe.NchanTOT`` interleaved channels and a probe Bunch (``binary.py``: the file params ``fs`` and
      ``dtype``, the cache in ``<dir_path>/.kilosort/context``, the output in ``<dir_path>/output``, or
      ``output_folder``). The file becomes a SpikeInterface binary recording, sorted as any other.

    Returns the sorting as a SpikeInterface NumpySorting (unit properties KSLabel, ContamPct, Amplitude) either way;
    ``pipeline.run`` and ``binary.run_binary`` return the run's Context instead.
    """
    from .context import folder_lock
    from .export.sorting import read_sorting
    from .pipeline import run as run_pipeline

    if dat_path is not None:
        if recording is not None:
            raise TypeError("run() takes a recording or dat_path=, not both")
        recording = dat_path
    if isinstance(recording, (str, os.PathLike)):
        from .binary import run_binary

        ctx = run_binary(recording, probe, dir_path, output_folder, verbose=verbose, **params)
    elif recording is None:
        raise TypeError("run() needs a SpikeInterface recording or the path of a raw binary file")
    else:
        if probe is not None or dir_path is not None:
            raise TypeError("probe= and dir_path= go with the path of a raw binary file; a SpikeInterface recording "
                            "carries its own probe (recording.set_probe(...))")
        if output_folder is None:
            raise TypeError("run(recording, output_folder, **params) needs the output folder")
        with folder_lock(output_folder, "output folder"):  # no other sort replaces the files before they are read
            ctx = run_pipeline(recording, output_folder, params, verbose=verbose)
            return read_sorting(ctx.output_folder, keep_good_only=ctx.user_params["keep_good_only"])
    return read_sorting(ctx.output_folder, keep_good_only=ctx.user_params["keep_good_only"])


__all__ = ["Bunch", "Ks2PySorter", "add_default_handler", "default_params", "run", "__version__"]
