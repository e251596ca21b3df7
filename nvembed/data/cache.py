"""On-disk cache of checked data: every source is parsed and validated once into Arrow files that later starts, and
every rank, memory-map instead of reading the source again (issue #17: data that does not live in RAM).

An entry is keyed by everything its content depends on: the state (path, size, mtime, inode) of the files it was
built from (or a Hugging Face dataset's fingerprint), the spec keys that shape a row, and :data:`CACHE_VERSION`
(bump it when parsing or normalisation changes). Files are written under temporary names and renamed, the meta file
last, so a build that fails or is killed leaves no entry; builders of the same entry (the ranks of a node) wait on a
file lock, so one parses and the others map its result. Entries whose source files changed or vanished are removed
when a new entry is built. Folder: ``$NVEMBED_DATA_CACHE``, else ``$XDG_CACHE_HOME/nvembed/data`` (``~/.cache/...``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import mmap
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import pyarrow as pa

from ..errors import UserError

CACHE_VERSION = 1
ENV = "NVEMBED_DATA_CACHE"


class CacheError(UserError):
    """The data cache folder cannot be written (permissions, disk full)."""

    kind = "data cache"


def cache_dir() -> Path:
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nvembed" / "data"


def file_state(path: Path) -> Dict[str, Any]:
    """What says a file is unchanged: an edit changes size or mtime, a replacement (rename over it) the inode."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _current(states: Sequence[Dict[str, Any]]) -> bool:
    try:
        return all(file_state(Path(s["path"])) == s for s in states)
    except OSError:
        return False


class Table:
    """An Arrow IPC file, memory-mapped: opening reads only its footer, and rows are fetched by index one slice each
    (pyarrow's ``Table.take`` would first concatenate every chunk of a column into memory)."""

    DROP_EVERY = 512
    """Rows fetched between two releases of the mapped pages. A random row touches a page of every column buffer
    and the kernel maps up to 64 KB around each, so without releases an epoch of random reads would map (and count
    in RSS) the whole file; released pages stay in the page cache, a later touch maps them again without I/O."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # shared, read-only
        reader = pa.ipc.open_file(pa.BufferReader(pa.py_buffer(self._mm)))  # zero-copy: batches point into it
        self.schema = reader.schema
        self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        self.offsets = np.cumsum([0] + [b.num_rows for b in self.batches])
        self._fetched = 0

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def rows(self, idxs: Sequence[int], columns: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
        """Rows at ``idxs`` (in that order, repeats allowed) as dicts of Python values."""
        idxs = np.asarray(idxs, dtype=np.int64).reshape(-1)
        if not len(idxs):
            return []
        if idxs.min() < 0 or idxs.max() >= len(self):
            raise IndexError(f"row index out of range 0..{len(self) - 1}")
        which = np.searchsorted(self.offsets, idxs, side="right") - 1
        parts = []
        for b, i in zip(which.tolist(), idxs.tolist()):
            batch = self.batches[b]
            parts.append((batch.select(list(columns)) if columns is not None else batch).slice(i - self.offsets[b], 1))
        out = pa.Table.from_batches(parts).to_pylist()  # Python copies: nothing refers to the mapping any more
        self._fetched += len(idxs)
        if self._fetched >= self.DROP_EVERY:
            self._mm.madvise(mmap.MADV_DONTNEED)  # a file mapping: pages are unmapped from this process, not lost
            self._fetched = 0
        return out

    def column(self, name: str) -> pa.ChunkedArray:
        return pa.chunked_array([b.column(name) for b in self.batches], type=self.schema.field(name).type)


class Builder:
    """Handed to a build function: opens the entry's Arrow files under temporary names."""

    def __init__(self, folder: Path, key: str):
        self.folder, self.key = folder, key
        self.tmp: Dict[str, Path] = {}
        self._open: List[Any] = []

    def writer(self, part: str, schema: pa.Schema) -> "pa.ipc.RecordBatchFileWriter":
        path = self.folder / f".{self.key}.{part}.arrow.tmp-{os.getpid()}"
        self.tmp[part] = path
        sink = pa.OSFile(str(path), "wb")
        w = pa.ipc.new_file(sink, schema)
        self._open.append((w, sink))
        return w

    def close(self) -> None:
        for w, sink in self._open:
            try:
                w.close()
            finally:
                sink.close()
        self._open = []

    def discard(self) -> None:
        for w, sink in self._open:
            sink.close()
        self._open = []
        for p in self.tmp.values():
            p.unlink(missing_ok=True)


class Entry:
    """A complete cache entry: its meta (what the build recorded) and its memory-mapped tables."""

    def __init__(self, folder: Path, key: str, meta: Dict[str, Any], built: bool):
        self.folder, self.key, self.meta, self.built = folder, key, meta, built
        self.tables = {part: Table(folder / f"{key}.{part}.arrow") for part in meta["parts"]}


def _key(identity: Dict[str, Any], states: Sequence[Dict[str, Any]]) -> str:
    text = json.dumps({"version": CACHE_VERSION, "identity": identity, "files": list(states)}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cached(identity: Dict[str, Any], files: Sequence[Path], build: Callable[[Builder], Dict[str, Any]],
           log: Callable[[str], None] = lambda m: None) -> Entry:
    """The entry for ``identity`` and the current state of ``files``; built by ``build(builder)`` (which returns the
    meta to keep) when missing. A :class:`UserError` raised by ``build`` leaves nothing behind."""
    states = [file_state(Path(f)) for f in files]
    folder = cache_dir()
    key = _key(identity, states)
    meta_path = folder / f"{key}.json"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / f"{key}.lock", "a+")
    except OSError as e:
        raise CacheError(f"cannot use the data cache folder {folder} ({e}); set {ENV} to a writable folder") from None
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # another rank building this entry: wait, then map its result
        except OSError:  # a filesystem without locks: builders may duplicate work, renames keep entries whole
            pass
        if meta_path.exists():
            try:
                return Entry(folder, key, json.loads(meta_path.read_text()), built=False)
            except (OSError, ValueError, pa.ArrowInvalid):  # a part removed by hand: build it again
                pass
        t0 = time.time()
        builder = Builder(folder, key)
        try:
            meta = build(builder)
            builder.close()
            meta.update({"version": CACHE_VERSION, "identity": identity, "files": states, "parts": list(builder.tmp),
                         "build_s": round(time.time() - t0, 3), "created": time.time()})
            for part, tmp in builder.tmp.items():
                os.replace(tmp, folder / f"{key}.{part}.arrow")
            tmp_meta = folder / f".{key}.json.tmp-{os.getpid()}"
            tmp_meta.write_text(json.dumps(meta, default=str))
            os.replace(tmp_meta, meta_path)  # last: its presence means the entry is complete
        except OSError as e:
            builder.discard()
            raise CacheError(f"cannot write the data cache in {folder} ({e}); free space there or set {ENV} "
                             f"to another folder") from None
        except BaseException:
            builder.discard()
            raise
        _prune(folder, keep=key)
        log(f"built the data cache entry {meta_path.name} in {meta['build_s']:.1f} s")
        return Entry(folder, key, meta, built=True)


def _prune(folder: Path, keep: str) -> None:
    """Remove entries whose source files changed or vanished (a test's temporary files, an edited data file) and the
    temporary files of builds that were killed; an entry another process holds locked is left alone."""
    for tmp in folder.glob(".*.tmp-*"):
        key = tmp.name.split(".")[1]
        if key == keep:
            continue
        try:
            with open(folder / f"{key}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: no build of that entry is running
                tmp.unlink(missing_ok=True)
        except OSError:
            continue
    for meta_path in folder.glob("*.json"):
        key = meta_path.stem
        if key == keep:
            continue
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            continue
        if not meta.get("files") or _current(meta["files"]):
            continue  # hub datasets (no files) are keyed by fingerprint and kept
        try:
            with open(folder / f"{key}.lock", "a+") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                meta_path.unlink(missing_ok=True)
                for part in meta.get("parts", []):
                    (folder / f"{key}.{part}.arrow").unlink(missing_ok=True)
                (folder / f"{key}.lock").unlink(missing_ok=True)
        except OSError:
            continue
