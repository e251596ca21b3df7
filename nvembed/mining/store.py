"""Embeddings on disk, written as they are encoded, resumable, shared by the ranks of an accelerate launch.

A store is a folder:

* ``embeddings.npy``: ``[n, dim]`` float16 or float32, a standard ``.npy`` (``np.load(path, mmap_mode="r")`` opens
  it). Rows are written with ``pwrite`` and read back with ``preadv`` into buffers of one chunk: never through one
  big mapping, so what the process holds (and its RSS) is one chunk, whatever ``n * dim`` (a mapping of the whole
  file counts every page it touched in the RSS).
* ``progress``: one byte per chunk of ``chunk_size`` rows, set to 1 after that chunk's rows are written and synced.
  A killed encode resumes at the chunks still 0; ranks write disjoint chunks (``chunk % world == rank``) of the same
  file, so a store encoded by 2 processes is byte-identical to one encoded by 1. Nodes share the store through a
  shared file system (one folder); after the ranks' last barrier each drops its cached pages of the files
  (:meth:`EmbeddingStore.drop_cached`) so that none reads back a page cached before another node wrote it.
* ``ids.txt``: one id per row (the corpus ``_id``, else the row number), ``meta.json``: model, instruction, n, dim,
  dtype, chunk size. The folder is created under a temporary name and renamed when complete, so a half-created store
  is never opened.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from nvembed.errors import UserError


class StoreError(UserError):
    """An embedding store that does not match what is asked of it (other texts, dim or dtype)."""

    kind = "embedding store"


class EmbeddingStore:
    """Read/write access to one store folder (see the module docstring). Slicing returns float32 arrays."""

    def __init__(self, folder):
        self.folder = Path(folder)
        meta_path = self.folder / "meta.json"
        if not meta_path.is_file():
            raise StoreError(f"{self.folder}: not an embedding store (no meta.json)")
        self.meta = json.loads(meta_path.read_text())
        self.n, self.dim = int(self.meta["n"]), int(self.meta["dim"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.chunk_size = int(self.meta["chunk_size"])
        self.offset = int(self.meta["header_bytes"])
        self.row_bytes = self.dim * self.dtype.itemsize
        self.path = self.folder / "embeddings.npy"

    # ------------------------------------------------------------------------------------------------ create

    @classmethod
    def create(cls, folder, *, n: int, dim: int, dtype="float32", chunk_size: int = 4096,
               ids: Optional[Sequence[str]] = None, meta: Optional[dict] = None) -> "EmbeddingStore":
        """Create an empty store (sparse file, progress all 0) atomically: built under a temporary name, renamed."""
        folder = Path(folder)
        tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        dtype = np.dtype(dtype)
        with open(tmp / "embeddings.npy", "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": (int(n), int(dim))})
            header = f.tell()
            f.truncate(header + int(n) * int(dim) * dtype.itemsize)  # sparse: no bytes written yet
        n_chunks = (int(n) + chunk_size - 1) // chunk_size
        (tmp / "progress").write_bytes(b"\x00" * n_chunks)
        with open(tmp / "ids.txt", "w", encoding="utf-8") as f:
            for i in range(int(n)):
                f.write(f"{ids[i] if ids is not None else i}\n")
        (tmp / "meta.json").write_text(json.dumps({**(meta or {}), "n": int(n), "dim": int(dim), "dtype": dtype.name,
                                                   "chunk_size": int(chunk_size), "header_bytes": header}, indent=1))
        if folder.exists():  # an older half-written folder without meta.json (create is only called then)
            shutil.rmtree(folder)
        os.rename(tmp, folder)
        return cls(folder)

    # ------------------------------------------------------------------------------------------------ progress

    @property
    def n_chunks(self) -> int:
        return (self.n + self.chunk_size - 1) // self.chunk_size

    def done_chunks(self) -> np.ndarray:
        return np.frombuffer((self.folder / "progress").read_bytes(), dtype=np.uint8).astype(bool)

    def complete(self) -> bool:
        return bool(self.done_chunks().all())

    def todo(self, rank: int = 0, world: int = 1) -> list:
        """Chunks not yet written that belong to ``rank`` (round-robin: chunk ``c`` goes to ``c % world``)."""
        done = self.done_chunks()
        return [c for c in range(rank, self.n_chunks, world) if not done[c]]

    def chunk_rows(self, c: int) -> Tuple[int, int]:
        return c * self.chunk_size, min(self.n, (c + 1) * self.chunk_size)

    def write_chunk(self, c: int, arr) -> None:
        """Write chunk ``c``'s rows, sync them, then mark the chunk done (a kill in between re-encodes it)."""
        lo, hi = self.chunk_rows(c)
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.shape != (hi - lo, self.dim):
            raise ValueError(f"chunk {c}: expected shape {(hi - lo, self.dim)}, got {arr.shape}")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view, pos = memoryview(arr).cast("B"), self.offset + lo * self.row_bytes
            while view:
                w = os.pwrite(fd, view, pos)
                view, pos = view[w:], pos + w
            os.fdatasync(fd)
        finally:
            os.close(fd)
        fd = os.open(self.folder / "progress", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x01", c)
            os.fdatasync(fd)
        finally:
            os.close(fd)

    def drop_cached(self) -> None:
        """Forget this host's cached pages of the store's files (``POSIX_FADV_DONTNEED``; our own writes are synced,
        so nothing is lost): on a shared file system (NFS) pages cached before other nodes wrote their chunks could
        otherwise be read back stale; the next reads come from the file server."""
        if not hasattr(os, "posix_fadvise"):
            return
        for path in (self.path, self.folder / "progress"):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    # ------------------------------------------------------------------------------------------------ read

    def __len__(self) -> int:
        return self.n

    @property
    def shape(self) -> Tuple[int, int]:
        return self.n, self.dim

    def _read(self, lo: int, hi: int) -> np.ndarray:
        out = np.empty((max(hi - lo, 0), self.dim), dtype=self.dtype)
        if hi > lo:
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.offset + lo * self.row_bytes)
                view, got = memoryview(out).cast("B"), 0
                while got < len(view):
                    r = f.readinto(view[got:])
                    if not r:
                        raise StoreError(f"{self.path}: truncated (rows {lo}-{hi} of {self.n})")
                    got += r
        return out

    def __getitem__(self, key) -> np.ndarray:
        """``store[a:b]`` -> float32 rows read from disk (only slices with step 1, and single rows)."""
        if isinstance(key, (int, np.integer)):
            k = int(key) + (self.n if key < 0 else 0)
            return self._read(k, k + 1)[0].astype(np.float32)
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise TypeError("EmbeddingStore supports store[i] and store[a:b]; use take(ids) for a list of rows")
        lo, hi, _ = key.indices(self.n)
        return self._read(lo, max(lo, hi)).astype(np.float32)

    def take(self, ids) -> np.ndarray:
        """float32 rows ``ids`` (any order, repeats allowed), reading each run of consecutive rows once."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if not len(ids):
            return out
        uniq, inv = np.unique(ids, return_inverse=True)
        rows = np.empty((len(uniq), self.dim), dtype=np.float32)
        breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
        for run in np.split(np.arange(len(uniq)), breaks):
            rows[run[0]:run[-1] + 1] = self._read(int(uniq[run[0]]), int(uniq[run[-1]]) + 1)
        out[:] = rows[inv]
        return out

    def ids(self) -> Iterator[str]:
        with open(self.folder / "ids.txt", encoding="utf-8") as f:
            for line in f:
                yield line.rstrip("\n")


def encode_to_store(encoder, texts: Sequence[str], folder, *, instruction: Optional[str] = None,
                    dtype="float32", chunk_size: int = 4096, batch_size: int = 32,
                    ids: Optional[Sequence[str]] = None, meta: Optional[dict] = None, rank: int = 0, world: int = 1,
                    barrier: Callable[[], None] = lambda: None, show_progress: bool = False,
                    desc: str = "encode") -> EmbeddingStore:
    """Encode ``texts`` into the store at ``folder``, resuming a partial one; with ``world`` ranks each encodes its
    chunks (``barrier`` = the launcher's wait-for-everyone). Rank 0 creates the store: it encodes chunk 0 first to
    learn the dimension. Returns the complete store on every rank."""
    folder = Path(folder)
    texts_n = len(texts)
    meta = {"model": getattr(encoder, "name", type(encoder).__name__), "instruction": instruction, **(meta or {})}

    def enc(c, store_chunk):
        lo, hi = c * store_chunk, min(texts_n, (c + 1) * store_chunk)
        return np.asarray(encoder.encode(list(texts[lo:hi]), instruction=instruction, batch_size=batch_size),
                          dtype=np.float32)

    if rank == 0:
        if (folder / "meta.json").is_file():
            store = EmbeddingStore(folder)
            if store.n != texts_n or np.dtype(dtype) != store.dtype:
                raise StoreError(f"{folder}: holds {store.n} {store.dtype.name} rows, asked for {texts_n} "
                                 f"{np.dtype(dtype).name}: use another cache folder")
        elif texts_n:
            first = enc(0, chunk_size)
            store = EmbeddingStore.create(folder, n=texts_n, dim=first.shape[1], dtype=dtype, chunk_size=chunk_size,
                                          ids=ids, meta=meta)
            store.write_chunk(0, first)
    barrier()  # the store exists (created by rank 0) before the other ranks open it
    if not texts_n:
        return None
    store = EmbeddingStore(folder)
    todo = store.todo(rank, world)
    for c in tqdm(todo, desc=desc, disable=not show_progress or rank != 0):
        store.write_chunk(c, enc(c, store.chunk_size))
    barrier()
    if world > 1:  # other processes (maybe on other nodes) wrote into the same files
        store.drop_cached()
    if not store.complete():
        raise StoreError(f"{folder}: chunks {np.flatnonzero(~store.done_chunks()).tolist()[:10]} were not written "
                         "by any rank")
    return store
