"""The run context (``ctx``) and the on-disk cache of intermediate arrays.

``ctx.intermediate.Wrot = array`` writes ``Wrot.npy`` into the cache folder atomically (temporary file, synced,
then renamed) and records in ``manifest.json`` which stage wrote it under which fingerprint; reading
``ctx.intermediate.Wrot`` loads it back. The writes are done by a writer thread, in call order, while the stages
go on (a small file's sync can take tens of milliseconds while the whitened file is being written back), and a
stage is recorded as done only after its arrays are; ``wait_for_files`` waits for them. An array is only ever
read back when its recorded fingerprint equals the fingerprint the current run computes for that stage, so a
changed param or recording never reuses a stale array, and a file whose write was interrupted is never listed in
the manifest.
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

try:
    import fcntl
except ImportError:  # not a POSIX system
    fcntl = None

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


def _temporary_beside(path: Path) -> str:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    return tmp


def _remove(tmp: str):
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _sync_into_place(tmp: str, path: Path):
    """Sync the written temporary file ``tmp`` to disk and rename it to ``path``; on an error it is removed."""
    try:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs should read like any other file
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def _atomic_path(path: Path):
    """Yield a temporary path beside ``path`` to write; when the block completes, the file is synced to disk and
    renamed into place; on an error it is removed."""
    tmp = _temporary_beside(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _sync_into_place(tmp, path)


def _atomic_write(path: Path, write):
    """Call ``write(file_object)`` on a temporary file beside ``path``, then rename it into place."""
    with _atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)


LOCK_FILE = ".ks2py.lock"
_held_locks: dict[Path, list] = {}  # folder -> [open lock file, owning thread id, depth]
_held_locks_guard = threading.Lock()


class FolderInUseError(RuntimeError):
    """Another sort holds the lock of an output or cache folder."""


def raise_if_in_use(folder, what: str = "folder"):
    """FolderInUseError when another process holds ``folder``'s lock (folder_lock); creates nothing."""
    path = Path(folder).absolute() / LOCK_FILE
    if fcntl is None or not path.exists():
        return
    with open(path) as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)  # dropped when the file closes
        except OSError:
            owner = f.read().strip() or "unknown"
            raise FolderInUseError(f"the {what} {path.parent} is in use by another ks2py sort (process {owner}): "
                                   "wait for it to end, or sort into another folder") from None


@contextlib.contextmanager
def folder_lock(folder, what: str = "folder"):
    """Hold an exclusive lock on ``folder`` (created if need be) for the block: ``flock`` on its ``.ks2py.lock``,
    which the system drops when the process ends, however it ends (a killed sort leaves no lock held). Another
    process, or another thread of this one, holding it gives FolderInUseError at once; the thread holding it may
    take it again (nested). The lock file holds the owner's pid, for the message."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    me = threading.get_ident()
    with _held_locks_guard:
        held = _held_locks.get(folder)
        if held is not None and held[1] == me:
            held[2] += 1
        elif held is not None:
            raise FolderInUseError(f"the {what} {folder} is in use by another sort in this process: wait for it to "
                                   "end, or sort into another folder")
        else:
            f = open(folder / LOCK_FILE, "a+")
            try:
                if fcntl is not None:  # not a POSIX system: no lock
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                owner = f.read().strip() or "unknown"
                f.close()
                raise FolderInUseError(
                    f"the {what} {folder} is in use by another ks2py sort (process {owner}): wait for it to end, "
                    "or sort into another folder (two sorts in one folder overwrite each other's files)") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            _held_locks[folder] = held = [f, me, 1]
    try:
        yield
    finally:
        with _held_locks_guard:
            held[2] -= 1
            if held[2] == 0:
                del _held_locks[folder]
                held[0].close()  # closing the file drops the flock


CHECKSUM_BYTES = 100e6  # cache files up to this size are recorded with a digest of their bytes, larger ones by size


def file_record(path: Path, with_digest: bool = True) -> dict:
    """{"bytes": size} of a cache file, and "digest" (io.chunk_digest of its bytes) when it is at most
    CHECKSUM_BYTES (and with_digest)."""
    size = path.stat().st_size
    record = {"bytes": size}
    if with_digest and size <= CHECKSUM_BYTES:
        from .io import chunk_digest

        record["digest"] = chunk_digest(np.fromfile(path, dtype=np.uint8)).hex()
    return record


class Intermediate:
    """Attribute access to the cached arrays of one run.

    ``stage_fingerprints`` maps each stage to the fingerprint this run computes for it; ``current_stage`` names
    the stage whose outputs are being written. Arrays kept in memory (``keep``) are not written to disk.
    """

    _own = ("folder", "stage_fingerprints", "current_stage", "_memory", "_manifest", "_lock", "_background",
            "_writer", "_write_failed", "_checked")

    def __init__(self, folder, stage_fingerprints: dict[str, str]):
        object.__setattr__(self, "folder", Path(folder))
        object.__setattr__(self, "stage_fingerprints", dict(stage_fingerprints))
        object.__setattr__(self, "current_stage", None)
        object.__setattr__(self, "_memory", {})
        object.__setattr__(self, "_lock", threading.Lock())  # background file writes record themselves too
        object.__setattr__(self, "_background", [])  # futures of the writes not waited for yet
        object.__setattr__(self, "_writer", None)  # the thread that writes arrays and the manifest, in order
        object.__setattr__(self, "_write_failed", False)
        object.__setattr__(self, "_checked", {})  # name -> whether its file matched its record (checked once)
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = {"arrays": {}, "files": {}, "stages": {}, "recording": {}}
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

    def _writing_stage(self, name: str, stage: str | None = None) -> str:
        stage = stage or self.current_stage
        if stage is None:
            raise RuntimeError(f"intermediate '{name}' written outside a stage")
        return stage

    def _record(self, kind: str, name: str, stage: str | None = None, path: Path | None = None):
        """Record a file written for ``stage``, with its size and (up to CHECKSUM_BYTES) a digest of its bytes."""
        stage = self._writing_stage(name, stage)
        entry = {"stage": stage, "fingerprint": self.stage_fingerprints[stage]}
        if path is not None:
            entry.update(file_record(path))
        self._checked.pop(name, None)
        self._update_manifest(kind, name, entry)

    def _intact(self, kind: str, name: str, path: Path) -> bool:
        """Whether the file of a valid entry is the one recorded (size, digest); checked once per run, and a
        damaged one (truncated, overwritten) is logged by name: its stage reruns."""
        if name not in self._checked:
            entry = self._manifest[kind][name]
            actual = file_record(path, with_digest="digest" in entry)
            problem = next((f"{key} {actual.get(key)} where {entry[key]} was recorded" for key in ("bytes", "digest")
                            if key in entry and actual.get(key) != entry[key]), None)
            if problem is not None:
                logger.warning("cache file %s is damaged (%s): the '%s' stage reruns", path, problem, entry["stage"])
            self._checked[name] = problem is None
        return self._checked[name]

    def _in_order(self, job):
        """Queue ``job()`` (a write of the cache) for the writer thread, after the writes queued before it; once
        one has failed, the later ones are not done (a stage is never recorded done without its arrays)."""
        if self._writer is None:
            object.__setattr__(self, "_writer", ThreadPoolExecutor(max_workers=1, thread_name_prefix="ks2py-cache"))

        def guarded():
            if self._write_failed:
                raise RuntimeError("not written to the cache: an earlier write failed")
            try:
                job()
            except BaseException:
                object.__setattr__(self, "_write_failed", True)
                raise

        self._background.append(self._writer.submit(guarded))

    def record_recording(self, identity, digest: str):
        """Record (in order with the stage's arrays) what preprocessing saw of the recording: its cheap identity
        (pipeline.recording_identity) and the digest of every sample (io.content_digest), for the preprocessing
        fingerprint of this run."""
        entry = {"preprocess": self.stage_fingerprints["preprocess"], "identity": identity, "digest": digest}
        self._in_order(lambda: self._update_manifest("recording", "content", entry))

    def recorded_recording(self) -> dict | None:
        """What record_recording recorded for this run's preprocessing fingerprint, or None."""
        entry = self._manifest["recording"].get("content")
        if entry is None or entry.get("preprocess") != self.stage_fingerprints.get("preprocess"):
            return None
        return entry

    def update_recorded_identity(self, identity):
        """The recording's content was found unchanged under another cheap identity: record that one."""
        self._update_manifest("recording", "content", {**self._manifest["recording"]["content"], "identity": identity})

    def forget_everything(self):
        """Drop every record of the manifest (the files stay, never read again): every stage reruns."""
        with self._lock:
            for kind in ("arrays", "files", "stages", "recording"):
                self._manifest[kind] = {}
        self._update_manifest("stages", "-", None)  # saved

    def stage_is_done(self, stage: str) -> bool:
        return self._manifest["stages"].get(stage) == self.stage_fingerprints[stage]

    def mark_stage_done(self, stage: str):
        """Record ``stage`` as done, once the writes of its arrays queued before are complete."""
        self._in_order(lambda: self._update_manifest("stages", stage, self.stage_fingerprints[stage]))

    def has(self, name: str) -> bool:
        if name in self._memory:
            return True
        entry = self._manifest["arrays"].get(name)
        path = self.folder / f"{name}.npy"
        return self._entry_is_valid(entry) and path.exists() and self._intact("arrays", name, path)

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
        try:
            value = np.load(path, mmap_mode="r" if path.stat().st_size > 100e6 else None, allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise RuntimeError(f"cache file {path} could not be read ({type(err).__name__}: {err}); delete it and "
                               "sort again: the stage that wrote it reruns") from err
        self._memory[name] = value
        return value

    def __setattr__(self, name, value):
        if name in self._own:
            object.__setattr__(self, name, value)
            return
        array = np.asarray(value)
        if array.dtype == object:
            raise TypeError(f"intermediate '{name}' must be a numeric array, got {type(value).__name__}")
        stage = self._writing_stage(name)
        array.flags.writeable = False  # written later by the writer thread: what it writes is what is kept
        self._memory[name] = array

        def write():
            _atomic_write(self.folder / f"{name}.npy", lambda f: np.save(f, array, allow_pickle=False))
            self._record("arrays", name, stage, self.folder / f"{name}.npy")

        self._in_order(write)

    def write_array(self, name: str, shape: tuple, dtype, fill):
        """Write a large array without holding it in memory: ``fill(out)`` fills ``out``, a memory-mapped
        [shape] array in a temporary .npy file; once ``fill`` returns, the file is read back memory-mapped and
        the writer thread syncs it, renames it into place and records it."""
        path = self.folder / f"{name}.npy"
        stage = self._writing_stage(name)
        tmp = _temporary_beside(path)
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=tuple(shape))
            fill(out)
            del out  # unmapped: its pages are the file's, synced by the writer
            self._memory[name] = np.load(tmp, mmap_mode="r", allow_pickle=False)  # the same file once renamed
        except BaseException:
            _remove(tmp)
            raise

        def finish():
            _sync_into_place(tmp, path)
            self._record("arrays", name, stage, path)

        self._in_order(finish)

    def keep(self, **arrays):
        """Hold arrays for later stages of this run without writing them (cheap to recompute)."""
        self._memory.update(arrays)

    # --- files (the whitened data) -----------------------------------------------------------------------
    def file_path(self, name: str) -> Path:
        """Path of a valid cached file, or FileNotFoundError."""
        path = self.folder / name
        if not (self._entry_is_valid(self._manifest["files"].get(name)) and path.exists()
                and self._intact("files", name, path)):
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
            _sync_into_place(str(tmp), final)  # the data is on disk before the manifest names the file
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._record("files", name, stage, final)
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
        """Wait for the background writes (arrays, manifest, files) and raise their errors."""
        while self._background:
            self._background.pop(0).result()
        if self._writer is not None:
            self._writer.shutdown()
            object.__setattr__(self, "_writer", None)

    def forget_file(self, name: str):
        """Delete a cached file (e.g. delete_tmp_files) and the record of it."""
        with contextlib.suppress(FileNotFoundError):
            (self.folder / name).unlink()
        self._update_manifest("files", name, None)


class Context(Bunch):
    """What a run carries: ``raw_data`` (the SpikeInterface recording), ``probe`` (see probe.py), ``params``
    (the resolved run parameters, Kilosort names), ``intermediate`` (cached arrays), ``ops`` (the op table of
    the chosen device), ``output_folder``, ``user_params`` (as given), ``timings`` (seconds per stage) and
    ``whitened`` (the whitened data in host memory when this run's preprocessing kept it there, else None),
    ``whitened_pinning`` (the future of its page-locking, see io.pin_when_populated, or None), ``figures``
    (the process drawing the QC figures, plots.FigureProcess, or None), ``kernels_loading`` (the thread loading
    preprocessing's kernels on the GPU, see preprocess.load_kernels, or None), ``recording_identity`` (the
    recording's cheap identity, pipeline.recording_identity, or None) and ``whitened_file_by_drift`` (set by
    run_stages: the drift stage of this run writes the whitened file, from the copy it corrects, so preprocessing
    does not)."""
