"""The wheel carries the CUDA sources (the PyPI wheel of an earlier port lacked them)."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_contains_every_cuda_source(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
                   check=True)
    wheel = next(tmp_path.glob("si_ks2py-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (ROOT / "src" / "si_ks2py" / "gpu").glob("*.cu"))
    assert sources, "no .cu sources found"
    assert {f"si_ks2py/gpu/{name}" for name in sources} <= names
    assert "si_ks2py/gpu/ops.py" in names and "si_ks2py/cpu/ops.py" in names
