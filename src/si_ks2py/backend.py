"""The op table: ``get_ops(device)`` returns si_ks2py.gpu.ops (CuPy) or si_ks2py.cpu.ops (NumPy).

Stages call ``ops.<name>(...)`` and use ``ops.xp`` as their array module; they never import CuPy.
"""

from __future__ import annotations

import logging

logger = logging.getLogger("si_ks2py")


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver or no device: all mean "no GPU"
        return False


def resolve_device(device: str) -> str:
    """'auto' | 'cuda' | 'cpu' -> 'cuda' or 'cpu'; 'cuda' without a usable GPU is an error."""
    if device == "cpu":
        return "cpu"
    if gpu_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError(
            "device='cuda' was asked for, but CuPy sees no GPU: install the GPU extra "
            "(pip install 'si-ks2py[gpu]') on a machine with an NVIDIA GPU, or use device='auto' or 'cpu'"
        )
    logger.info("no GPU seen by CuPy: sorting on the CPU (NumPy)")
    return "cpu"


def get_ops(device: str = "auto"):
    if resolve_device(device) == "cuda":
        from .gpu import ops

        ops.start_device()
    else:
        from .cpu import ops
    return ops
