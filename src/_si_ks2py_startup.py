"""Makes "ks2py" known to SpikeInterface in every process of an environment where si-ks2py is installed.

``si_ks2py.pth``, installed beside this module in site-packages, imports it when the interpreter starts. It only
puts a finder on ``sys.meta_path`` that waits for the import of ``spikeinterface.sorters`` and, once that module
has run, adds the ks2py sorter to its sorter list. Until then nothing else is imported (not SpikeInterface, NumPy
nor si_ks2py), so a process that never imports spikeinterface.sorters pays for one small module. SpikeInterface
0.105 has no plugin mechanism for sorters (its sorter list is a fixed list in sorterlist.py), hence the hook.
"""

import sys

WATCHED = "spikeinterface.sorters"


def register(sorters_module):
    """Add ks2py to SpikeInterface's sorter list; a failure is logged, never raised into SpikeInterface's import."""
    try:
        import si_ks2py

        si_ks2py._register(sorters_module)
    except Exception as err:
        import logging

        logging.getLogger("si_ks2py").warning(
            "the sorter 'ks2py' could not be registered with SpikeInterface (%s: %s); run_sorter('ks2py', ...) "
            "will not find it", type(err).__name__, err)


class RegisteringLoader:
    """The loader of spikeinterface.sorters, with the registration run after the module."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self.loader  # later readers see the package's own loader
        self.loader.exec_module(module)
        register(module)


class RegisterOnImport:
    """A meta path finder that answers only for spikeinterface.sorters, once, with its real spec."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED:
            return None
        sys.meta_path.remove(self)  # one import to watch: later imports run as if the finder had never been there
        import importlib.util

        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = RegisteringLoader(spec.loader)
        return spec


if WATCHED in sys.modules:  # the .pth processed late (site.addsitedir in a running process)
    register(sys.modules[WATCHED])
else:
    sys.meta_path.insert(0, RegisterOnImport())
