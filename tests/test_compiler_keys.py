"""CuPy's compiler identities saved between processes (si_ks2py.gpu.compiler_keys): a restored identity must be
the one CuPy computes, or kernels would be compiled again under another cache key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

KERNEL = """
import cupy as cp
import si_ks2py.gpu.ops  # restores the saved identities, saves them at exit
from cupy.cuda import compiler
restored = len(compiler._empty_file_preprocess_cache)
x = cp.arange(5, dtype=cp.float32)
y = cp.ElementwiseKernel("float32 x", "float32 y", "y = 3 * x + 1", "si_ks2py_test_keys")(x)
assert cp.asnumpy(y).tolist() == [1.0, 4.0, 7.0, 10.0, 13.0]
print(restored)
"""


def run_kernel(cache: Path) -> int:
    """Run KERNEL in a fresh process with CuPy's cache in ``cache``; the number of identities it restored."""
    env = dict(os.environ, CUPY_CACHE_DIR=str(cache))
    done = subprocess.run([sys.executable, "-c", KERNEL], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


def test_saved_identities_find_the_cached_kernels(tmp_path):
    from si_ks2py.gpu import compiler_keys

    assert run_kernel(tmp_path) == 0  # nothing saved yet: CuPy computed the identities, which were saved at exit
    saved = compiler_keys._read(tmp_path / compiler_keys.keys_path().name)
    assert saved and all(isinstance(identity, str) and identity for identity in saved.values())
    binaries = sorted(p.name for p in tmp_path.rglob("*.cubin"))
    assert run_kernel(tmp_path) == len(saved)
    # the same cache keys: the kernel came from the disk cache, nothing was compiled again
    assert sorted(p.name for p in tmp_path.rglob("*.cubin")) == binaries


def test_unreadable_file_is_ignored(tmp_path):
    from si_ks2py.gpu import compiler_keys

    (tmp_path / compiler_keys.keys_path().name).write_text("{not python")
    assert run_kernel(tmp_path) == 0
    assert compiler_keys._read(tmp_path / compiler_keys.keys_path().name)  # replaced by what CuPy computed
