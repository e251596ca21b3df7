"""Documents looked up by id (``positive_ids``/``negative_ids``). Ids and texts stay in the memory-mapped data cache;
the id index is two 64-bit hashes per document, sorted, in the same cache entry: no dict of every id in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pyarrow as pa

from .cache import cached
from .sources import CORPUS_SCHEMA, _build_text, text_job
from .spec import DataSpec, SpecError

# two independent siphash keys (16 bytes each): an id matches on 128 bits, so distinct ids never collide in practice
_KEYS = ("nvembed-corpus-1", "nvembed-corpus-2")
INDEX_SCHEMA = pa.schema([("h1", pa.uint64()), ("h2", pa.uint64()), ("pos", pa.int64())])


def _hashes(ids: Any) -> Tuple[np.ndarray, np.ndarray]:
    from pandas.util import hash_array  # stable across processes and runs, unlike hash()

    arr = np.asarray(ids, dtype=object)
    return tuple(hash_array(arr, hash_key=k, categorize=False) for k in _KEYS)  # type: ignore[return-value]


def _raise(where: str, why: str, n: int = 1) -> None:
    raise SpecError(f"{where}: {why}")


class Corpus:
    """Corpus file of one spec (local jsonl/csv/tsv/parquet), read once into the data cache."""

    def __init__(self, spec: DataSpec):
        path = spec.resolve(spec.source.corpus)
        assert path is not None
        self.path = path
        if not path.exists():
            raise SpecError(f"{path}: data file not found")
        fid, ftext = spec.fields.corpus_id, spec.fields.corpus_text
        fmt = path.suffix.lstrip(".").lower()
        hashes: List[Tuple[np.ndarray, np.ndarray]] = []

        def collect(batch: pa.RecordBatch) -> pa.RecordBatch:
            hashes.append(_hashes(batch.column("id").to_numpy(zero_copy_only=False)))
            return batch

        def build(b) -> Dict[str, Any]:
            if fmt == "parquet":
                meta = _build_parquet(b, path, fid, ftext, collect)
            else:
                job = text_job(path, spec, fmt, rows_of=None, stop_on_bad=True)
                meta = _build_text(b, job, lambda n: f"{path}:{n}", _raise, collect)
            h1 = np.concatenate([h[0] for h in hashes]) if hashes else np.zeros(0, np.uint64)
            h2 = np.concatenate([h[1] for h in hashes]) if hashes else np.zeros(0, np.uint64)
            pos = np.arange(len(h1), dtype=np.int64)
            order = np.lexsort((pos, h2, h1))  # by hash, a repeated id's rows in file order
            h1, h2, pos = h1[order], h2[order], pos[order]
            b.writer("index", INDEX_SCHEMA).write_batch(
                pa.record_batch([pa.array(h1), pa.array(h2), pa.array(pos)], INDEX_SCHEMA))
            meta["ids"] = int(np.count_nonzero((h1[1:] != h1[:-1]) | (h2[1:] != h2[:-1]))) + 1 if len(h1) else 0
            return meta

        identity = {"kind": "corpus", "format": fmt, "id": fid, "text": ftext, "encoding": spec.source.encoding,
                    "quoting": spec.source.quoting}
        entry = cached(identity, [path], build)
        self.key = entry.key
        self.table = entry.tables["rows"]
        self._len = int(entry.meta["ids"])
        index = entry.tables["index"].batches[0]  # one batch: zero-copy numpy views of the mapped file
        self._h1, self._h2, self._pos = (index.column(i).to_numpy() for i in range(3))

    def __len__(self) -> int:
        """Distinct ids. Random documents are drawn from the first that many rows (a repeated id's earlier rows are
        unreachable by id, so a corpus behaves as the id -> text map it was before the cache)."""
        return self._len

    def lookup(self, ids: Sequence[str]) -> np.ndarray:
        """Row of each id in the corpus file, -1 where missing; a repeated id gives its last row (as a dict would)."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids), dtype=object)
        out = np.full(len(arr), -1, dtype=np.int64)
        if not len(arr) or not len(self._h1):
            return out
        h1, h2 = _hashes(arr)
        lo, hi = np.searchsorted(self._h1, h1, "left"), np.searchsorted(self._h1, h1, "right")
        j = np.minimum(lo, len(self._h1) - 1)
        hit = (hi - lo == 1) & (self._h2[j] == h2)
        out[hit] = self._pos[j[hit]]
        for k in np.nonzero(hi - lo > 1)[0]:  # a repeated id
            same = [int(self._pos[p]) for p in range(lo[k], hi[k]) if self._h2[p] == h2[k]]
            out[k] = max(same) if same else -1
        return out

    def has(self, doc_id: str) -> bool:
        return bool(self.lookup([doc_id])[0] >= 0)

    def texts(self, ids: Sequence[str]) -> List[str]:
        pos = self.lookup(ids)
        if (pos < 0).any():
            raise KeyError(list(ids)[int(np.argmin(pos))])
        return self.texts_at(pos.tolist())

    def texts_at(self, idxs: Sequence[int]) -> List[str]:
        return [r["text"] for r in self.table.rows(idxs, ["text"])]


def _build_parquet(b, path: Path, fid: str, ftext: str, check) -> Dict[str, Any]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(str(path))
    except Exception as e:
        raise SpecError(f"{path}: cannot read as parquet ({type(e).__name__}: {e})") from None
    for name, key in ((fid, "corpus_id"), (ftext, "corpus_text")):
        if name not in pf.schema_arrow.names:
            raise SpecError(f"{path}: no column '{name}' (fields.{key}); columns: {', '.join(pf.schema_arrow.names)}")
    writer = b.writer("rows", CORPUS_SCHEMA)
    n = 0
    for batch in pf.iter_batches(batch_size=8192, columns=[fid, ftext]):
        ids = [str(v) for v in batch.column(fid).to_pylist()]
        rows = pa.record_batch([pa.array(ids, pa.string()), batch.column(ftext).cast(pa.string()),
                                pa.array(range(n, n + batch.num_rows), pa.int64())], CORPUS_SCHEMA)
        writer.write_batch(check(rows))
        n += batch.num_rows
    return {"rows": n, "bad": {"first": [], "counts": {}}, "rows_read": n}
