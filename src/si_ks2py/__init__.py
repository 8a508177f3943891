"""si_ks2py: Kilosort 2.0 in Python, as the SpikeInterface sorter "ks2py".

``import si_ks2py`` registers the sorter, so ``spikeinterface.sorters.run_sorter("ks2py", recording, folder=...)``
works.
"""

from __future__ import annotations

__version__ = "0.1.0"

import wrapt  # noqa: E402

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


def run(recording, output_folder, verbose: bool = True, **params):
    """Sort without SpikeInterface's folder handling (an existing output folder is resumed, not deleted).

    Returns the sorting as a SpikeInterface NumpySorting.
    """
    from .context import folder_lock
    from .export.sorting import read_sorting
    from .pipeline import run as run_pipeline

    with folder_lock(output_folder, "output folder"):  # no other sort replaces the files before they are read
        ctx = run_pipeline(recording, output_folder, params, verbose=verbose)
        return read_sorting(ctx.output_folder, keep_good_only=ctx.user_params["keep_good_only"])


__all__ = ["Ks2PySorter", "default_params", "run", "__version__"]
