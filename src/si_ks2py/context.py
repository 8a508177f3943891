"""The run context (``ctx``) and the on-disk cache of intermediate arrays.

``ctx.intermediate.Wrot = array`` writes ``Wrot.npy`` into the cache folder atomically (temporary file, then
rename) and records in ``manifest.json`` which stage wrote it under which fingerprint; reading
``ctx.intermediate.Wrot`` loads it back. An array is only ever read back when its recorded fingerprint equals the
fingerprint the current run computes for that stage, so a changed param or recording never reuses a stale array,
and a file whose write was interrupted is never listed in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

logger = logging.getLogger("si_ks2py")


class Bunch(dict):
    """A dict whose keys are also attributes (``b.x is b["x"]``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        del self[name]


def fingerprint(*parts) -> str:
    """A stable hash of JSON-serialisable parts (numbers, strings, lists, dicts)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside ``path`` to write; when the block completes, the file is synced to disk and
    renamed into place; on an error it is removed."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should read like any other file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write(path: Path, write):
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    with _atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


class Intermediate:
    """Attribute access to the cached arrays of one run.

    ``stage_fingerprints`` maps each stage to the fingerprint this run computes for it; ``current_stage`` names
    the stage whose outputs are being written. Arrays kept in memory (``keep``) are not written to disk.
    """

    _own = ("folder", "stage_fingerprints", "current_stage", "_memory", "_manifest", "_lock", "_background")

    def __init__(self, folder, stage_fingerprints: dict[str, str]):
        object.__setattr__(self, "folder", Path(folder))
        object.__setattr__(self, "stage_fingerprints", dict(stage_fingerprints))
        object.__setattr__(self, "current_stage", None)
        object.__setattr__(self, "_memory", {})
        object.__setattr__(self, "_lock", threading.Lock())  # background file writes record themselves too
        object.__setattr__(self, "_background", [])
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"arrays": {}, "files": {}, "stages": {}}
        path = self.folder / "manifest.json"
        if path.exists():
            try:
                manifest.update(json.loads(path.read_text()))
            except json.JSONDecodeError:  # a manifest is replaced atomically; unreadable means foreign: start anew
                pass
        object.__setattr__(self, "_manifest", manifest)

    # --- bookkeeping -------------------------------------------------------------------------------------
    def _update_manifest(self, kind: str, name: str, value):
        """Set (or with value None, drop) one manifest entry and save the manifest atomically."""
        with self._lock:
            if value is None:
                self._manifest[kind].pop(name, None)
            else:
                self._manifest[kind][name] = value
            text = json.dumps(self._manifest, indent=1, sort_keys=True).encode()
            _atomic_write(self.folder / "manifest.json", lambda f: f.write(text))

    def _entry_is_valid(self, entry) -> bool:
        return entry is not None and self.stage_fingerprints.get(entry["stage"]) == entry["fingerprint"]

    def _record(self, kind: str, name: str, stage: str | None = None):
        stage = stage or self.current_stage
        if stage is None:
            raise RuntimeError(f"intermediate '{name}' written outside a stage")
        self._update_manifest(kind, name, {"stage": stage, "fingerprint": self.stage_fingerprints[stage]})

    def stage_is_done(self, stage: str) -> bool:
        return self._manifest["stages"].get(stage) == self.stage_fingerprints[stage]

    def mark_stage_done(self, stage: str):
        self._update_manifest("stages", stage, self.stage_fingerprints[stage])

    def has(self, name: str) -> bool:
        if name in self._memory:
            return True
        entry = self._manifest["arrays"].get(name)
        return self._entry_is_valid(entry) and (self.folder / f"{name}.npy").exists()

    # --- arrays ------------------------------------------------------------------------------------------
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in self._memory:
            return self._memory[name]
        if not self.has(name):
            raise AttributeError(f"no valid intermediate '{name}' in {self.folder}")
        path = self.folder / f"{name}.npy"
        # large arrays (spike features) are memory-mapped read-only so reading them costs no RAM up front
        value = np.load(path, mmap_mode="r" if path.stat().st_size > 100e6 else None, allow_pickle=False)
        self._memory[name] = value
        return value

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
            return
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"intermediate '{name}' must be a numeric array, got {type(value).__name__}")
        _atomic_write(self.folder / f"{name}.npy", lambda f: np.save(f, array, allow_pickle=False))
        self._memory[name] = array
        self._record("arrays", name)

    def write_array(self, name: str, shape: tuple, dtype, fill):
        """Write a large array without holding it in memory: ``fill(out)`` fills ``out``, a memory-mapped
        [shape] array in a temporary .npy file that is renamed into place and recorded once ``fill`` returns."""
        with _atomic_path(self.folder / f"{name}.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            fill(out)
            out.flush()
            del out
        self._memory.pop(name, None)  # read back (memory-mapped when large) on first use
        self._record("arrays", name)

    def keep(self, **arrays):
        """Hold arrays for later stages of this run without writing them (cheap to recompute)."""
        self._memory.update(arrays)

    # --- files (the whitened data) -----------------------------------------------------------------------
    def file_path(self, name: str) -> Path:
        """Path of a valid cached file, or FileNotFoundError."""
        path = self.folder / name
        if not (self._entry_is_valid(self._manifest["files"].get(name)) and path.exists()):
            raise FileNotFoundError(f"no valid cached file '{name}' in {self.folder}")
        return path

    def has_file(self, name: str) -> bool:
        try:
            self.file_path(name)
            return True
        except FileNotFoundError:
            return False

    @contextlib.contextmanager
    def write_file(self, name: str, stage: str | None = None):
        """Yield a temporary path to write; on success it is renamed to ``name`` and recorded (for ``stage``, by
        default the current one)."""
        final = self.folder / name
        tmp = self.folder / f".{name}.part"
        self._update_manifest("files", name, None)
        try:
            yield tmp
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._record("files", name, stage)
        logger.info("%s written", name)

    def write_file_in_background(self, name: str, write):
        """Like write_file, with ``write(file_object)`` run by a background thread: the file is recorded (and so
        only read back by a later run) once it is complete. ``wait_for_files`` waits for it."""
        stage = self.current_stage

        def job():
            with self.write_file(name, stage) as tmp, open(tmp, "wb") as f:
                write(f)

        executor = ThreadPoolExecutor(max_workers=1)
        self._background.append(executor.submit(job))
        executor.shutdown(wait=False)

    def wait_for_files(self):
        """Wait for the background writes (and raise their errors)."""
        while self._background:
            self._background.pop(0).result()

    def forget_file(self, name: str):
        """Delete a cached file (e.g. delete_tmp_files) and the record of it."""
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()
        self._update_manifest("files", name, None)


class Context(Bunch):
    """What a run carries: ``raw_data`` (the SpikeInterface recording), ``probe`` (see probe.py), ``params``
    (the resolved run parameters, Kilosort names), ``intermediate`` (cached arrays), ``ops`` (the op table of
    the chosen device), ``output_folder``, ``user_params`` (as given), ``timings`` (seconds per stage) and
    ``whitened`` (the whitened data in host memory when this run's preprocessing kept it there, else None) and
    ``figures`` (the process drawing the QC figures, plots.FigureProcess, or None)."""
