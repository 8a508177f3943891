"""Building and feeding the host emulations of the package's CUDA kernels (prelude.h, launch.h): the kernel source
is compiled with g++ into a library whose entry points launch it; its arrays live in shared mappings, which the
forked blocks see."""

import ctypes
import mmap
import re
import subprocess
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
GPU_SOURCES = HERE.parent.parent / "src" / "si_ks2py" / "gpu"
# dynamic shared memory becomes a static array of each block's process
DYNAMIC_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def build(folder: Path, source: str, driver: str, name: str) -> ctypes.CDLL:
    """Compile ``source`` (CUDA kernels, included by ``driver`` as kernel.cu) into folder/name.so and load it."""
    (folder / "kernel.cu").write_text(DYNAMIC_SHARED.sub(r"static \1 \2[1 << 16];", source))
    library = folder / f"{name}.so"
    subprocess.run(["g++", "-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                    f"-I{HERE}", f"-I{folder}", str(HERE / driver), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library))


def shared(array: np.ndarray, keep: list) -> np.ndarray:
    """A copy of array in a shared anonymous mapping (seen by the forked blocks)."""
    array = np.ascontiguousarray(array)
    buffer = mmap.mmap(-1, max(array.nbytes, 8))
    keep.append(buffer)
    out = np.frombuffer(buffer, dtype=array.dtype, count=array.size).reshape(array.shape)
    out[...] = array
    return out


def pointer(array: np.ndarray) -> ctypes.c_void_p:
    return ctypes.c_void_p(array.ctypes.data)
