"""CuPy's compiler identities kept on disk from one process to the next.

CuPy finds a compiled kernel in its disk cache (CUPY_CACHE_DIR) by a key that includes what NVRTC outputs for an
empty source with the kernel's options: the header that names the compiler's build. CuPy computes that once per
process and set of options (``cupy.cuda.compiler._empty_file_preprocess_cache``), so a fresh process's first
kernel waits for NVRTC to start even when every binary is cached. This module writes those outputs beside the
cache when the process exits and gives them back to CuPy when the GPU op table is imported. The identities
depend on the compiler only (the key also holds NVRTC's version and the options; the file is per CuPy version);
where CuPy lacks the table, nothing is done and CuPy computes them as usual.
"""

from __future__ import annotations

import ast
import contextlib
import os
from pathlib import Path

import cupy as cp
from cupy.cuda import compiler


def keys_path() -> Path:
    """The file beside CuPy's kernel cache (CuPy's rule for where that is)."""
    cache = os.environ.get("CUPY_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache")
    return Path(cache) / f"si_ks2py_compiler_keys_{cp.__version__}.txt"


def _table() -> dict | None:
    table = getattr(compiler, "_empty_file_preprocess_cache", None)
    return table if isinstance(table, dict) else None


def _read(path: Path) -> dict:
    """The saved table ({} when missing or unreadable): a Python literal of tuples and strings."""
    with contextlib.suppress(OSError, ValueError, SyntaxError, MemoryError, RecursionError):
        saved = ast.literal_eval(path.read_text())
        if isinstance(saved, dict):
            return saved
    return {}


def restore():
    """Give CuPy the identities saved by earlier processes (those it has already computed are kept)."""
    table = _table()
    if table is not None:
        for env, identity in _read(keys_path()).items():
            table.setdefault(env, identity)


def save():
    """Write CuPy's table with what the file held, when this process computed new entries (atomically: other
    processes may read or write it meanwhile); nothing where the cache folder cannot be written."""
    table = _table()
    if not table:
        return
    path = keys_path()
    merged = _read(path)
    if all(merged.get(env) == identity for env, identity in table.items()):
        return
    merged.update(table)
    partial = path.with_name(f"{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(repr(merged))
        os.replace(partial, path)
    except OSError:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
