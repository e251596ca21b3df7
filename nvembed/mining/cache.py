"""Resumable embedding cache: one :class:`~nvembed.mining.store.EmbeddingStore` per (model, instruction, texts).

``<cache_dir>/<key>/`` where ``key`` hashes the model name, the instruction, the storage dtype and the 16-byte digest
of every text (:func:`nvembed.mining.texts.digest`: the miner holds them already, so naming a store reads no text
back from disk). An interrupted encode resumes at the first chunk not written; a changed model, instruction or text
list gets a new key (never stale vectors). Stores written before the key hashed digests (their key hashed the texts)
are not found again: they are re-encoded under a new name and can be deleted. See :mod:`nvembed.mining.store` for
the layout (a ``.npy`` written chunk by chunk).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from nvembed.mining.store import encode_to_store
from nvembed.mining.texts import digest


def cache_key(model_name: str, texts: Optional[Sequence[str]], instruction: Optional[str] = None,
              dtype: str = "float32", *, hashes: Optional[np.ndarray] = None) -> str:
    """Key of ``texts`` (or of their ``hashes``, ``digest`` of each text in order: the same key without the texts)."""
    if hashes is None:
        hashes = np.frombuffer(b"".join(digest(t) for t in texts), dtype="S16")
    hashes = np.ascontiguousarray(hashes, dtype="S16")
    h = hashlib.sha256()
    # "keys=digests": a key of the earlier scheme (over the texts themselves) can never equal one of these
    h.update(f"keys=digests\x00model={model_name}\x00instruction={instruction!r}\x00n={len(hashes)}\x00"
             f"dtype={dtype}\x00".encode())
    h.update(hashes.tobytes())
    return h.hexdigest()[:24]


def store_folder(cache_dir, encoder, texts: Optional[Sequence[str]], instruction: Optional[str] = None,
                 dtype: str = "float32", *, hashes: Optional[np.ndarray] = None) -> Path:
    """Where the store of ``texts`` (given as ``hashes``: their digests) encoded by ``encoder`` (with
    ``instruction``) lives under ``cache_dir``."""
    name = getattr(encoder, "name", type(encoder).__name__)
    return Path(cache_dir) / cache_key(name, texts, instruction, np.dtype(dtype).name, hashes=hashes)


def encode_with_cache(encoder, texts: Sequence[str], *, instruction: Optional[str] = None,
                      cache_dir: Optional[str] = None, chunk_size: int = 4096, batch_size: int = 32,
                      show_progress: bool = False, desc: str = "encode", dtype: str = "float32") -> np.ndarray:
    """Encode ``texts`` into an in-RAM float32 array, through the resumable store under ``cache_dir`` if given.
    For corpora that do not fit in RAM use :func:`~nvembed.mining.store.encode_to_store` and search the store."""
    texts = list(texts)
    if cache_dir is None:
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size, show_progress=show_progress)
    store = encode_to_store(encoder, texts, store_folder(cache_dir, encoder, texts, instruction, dtype),
                            instruction=instruction, dtype=dtype, chunk_size=chunk_size, batch_size=batch_size,
                            show_progress=show_progress, desc=desc)
    return store[:] if store is not None else np.zeros((0, 0), dtype=np.float32)
