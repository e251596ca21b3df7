"""Resumable embedding cache.

Embeddings are written as ``chunk_{i:06d}.npy`` files (one per ``chunk_size`` texts) in
``<cache_dir>/<key>/`` where ``key`` hashes the model name, the instruction and every text. An interrupted run
resumes at the first missing chunk; a changed model, instruction or text list gets a new key (never stale vectors).
Each chunk is written to a temporary file and renamed, so a crash never leaves a truncated chunk behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm


def cache_key(model_name: str, texts: Sequence[str], instruction: Optional[str] = None) -> str:
    h = hashlib.sha256()
    h.update(f"model={model_name}\x00instruction={instruction!r}\x00n={len(texts)}\x00".encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\x00")
    return h.hexdigest()[:24]


def encode_with_cache(encoder, texts: Sequence[str], *, instruction: Optional[str] = None,
                      cache_dir: Optional[str] = None, chunk_size: int = 4096, batch_size: int = 32,
                      show_progress: bool = False, desc: str = "encode") -> np.ndarray:
    """Encode ``texts`` with ``encoder`` (a TextEncoder), reading/writing chunks under ``cache_dir`` if given."""
    texts = list(texts)
    if cache_dir is None:
        return encoder.encode(texts, instruction=instruction, batch_size=batch_size, show_progress=show_progress)
    folder = Path(cache_dir) / cache_key(getattr(encoder, "name", type(encoder).__name__), texts, instruction)
    folder.mkdir(parents=True, exist_ok=True)
    meta = folder / "meta.json"
    if not meta.exists():
        meta.write_text(json.dumps({"model": getattr(encoder, "name", ""), "instruction": instruction,
                                    "n": len(texts), "chunk_size": chunk_size}))
    else:
        chunk_size = int(json.loads(meta.read_text())["chunk_size"])
    parts = []
    n_chunks = (len(texts) + chunk_size - 1) // chunk_size
    for c in tqdm(range(n_chunks), desc=desc, disable=not show_progress):
        f = folder / f"chunk_{c:06d}.npy"
        part = texts[c * chunk_size:(c + 1) * chunk_size]
        if f.exists():
            arr = np.load(f)
            if len(arr) == len(part):
                parts.append(arr)
                continue
        arr = np.asarray(encoder.encode(part, instruction=instruction, batch_size=batch_size), dtype=np.float32)
        tmp = folder / f".chunk_{c:06d}.{os.getpid()}.tmp.npy"
        np.save(tmp, arr)
        os.replace(tmp, f)
        parts.append(arr)
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts, axis=0)
