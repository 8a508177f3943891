"""The project's metadata is in pyproject.toml; this file only adds si_ks2py.pth to wheels and editable installs.

si_ks2py.pth imports _si_ks2py_startup at interpreter start-up, which registers "ks2py" with SpikeInterface when
spikeinterface.sorters is imported. A .pth works only at the top of site-packages, which is the root of a wheel.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "si_ks2py.pth"  # sorts after setuptools' __editable__ .pth, which puts src/ on sys.path first
PTH_LINE = "import _si_ks2py_startup\n"


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        # a wheel's root is build_lib; an editable wheel links the sources instead of packing build_lib, and its
        # root is the folder its install step fills
        root = self.get_finalized_command("install").install_lib if self.editable_mode else self.build_lib
        Path(root, PTH_NAME).write_text(PTH_LINE)


setup(cmdclass={"build_py": BuildPyWithPth})
