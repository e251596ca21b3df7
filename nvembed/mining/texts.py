"""The texts of a mining run without a Python list of them (issue #17): per row a byte offset into the input file and
a 16-byte BLAKE2b hash, in numpy arrays; a text is read back from disk when a chunk of work needs it.

* Query grouping (rows with the same query are merged) and the corpus deduplication (positives added to it) use
  ``np.unique`` over the hashes (first occurrence wins, as a dict would), never a dict of texts. Two different texts
  share a 128-bit hash with probability ~n^2 / 2^129: none for any corpus at hand.
* What stays in memory is numpy (hashes, offsets, the grouping's indices): ~140 bytes per corpus row + pair row
  measured, ~1.4 GB for 10 M of each, against 5-10 GB of Python strings for 10 M passages.
* :class:`TextTable` is a lazy ``Sequence[str]``: the embedding store slices it chunk by chunk, the miner indexes
  the few rows a block of results needs. The stores' cache key hashes the digests (``doc_hash``, ``query_hash``),
  never the texts.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from nvembed.data.sources import jsonl_objects, text_lines
from nvembed.data.spec import SpecError

QUERY_KEYS = ("query", "anchor", "question", "q")
POS_KEYS = ("positives", "positive", "pos", "document", "answer")


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _hashes(buf: bytearray) -> np.ndarray:
    return np.frombuffer(bytes(buf), dtype="S16")


def pair_keys(path, n: int, row: Dict[str, Any]) -> Tuple[str, str]:
    qk = next((k for k in QUERY_KEYS if k in row), None)
    pk = next((k for k in POS_KEYS if k in row), None)
    if qk is None or pk is None:
        raise SpecError(f"{path}:{n}: need a query key {QUERY_KEYS} and a positive key {POS_KEYS}")
    return qk, pk


def pair_positives(row: Dict[str, Any], pk: str) -> list:
    return row[pk] if isinstance(row[pk], list) else [row[pk]]


def pass_through(row: Dict[str, Any], qk: str, pk: str) -> Dict[str, Any]:
    """The fields of a pair row copied to its mined record (the first row of a query group)."""
    return {k: v for k, v in row.items() if k not in (qk, pk, "negatives")}


def corpus_text(row: Dict[str, Any]) -> str:
    t = row.get("text", "")
    return f"{row['title']}. {t}" if row.get("title") else t


def strip_eol(line: str) -> str:
    line = line[:-1] if line.endswith("\n") else line
    return line[:-1] if line.endswith("\r") else line  # as text mode reads "\r\n"


def _text(path, n: int, field: str, value) -> str:
    if not isinstance(value, str):
        raise SpecError(f"{path}:{n}: field {field} must be a string, got {type(value).__name__}")
    return value


class FileRows:
    """Random access to the lines of one file by byte offset (one open handle, closed by :meth:`close`)."""

    def __init__(self, path):
        self.path = Path(path)
        self._f = open(self.path, "rb")

    def line(self, off: int) -> str:
        self._f.seek(off)
        return self._f.readline().decode("utf-8")

    def row(self, off: int) -> Dict[str, Any]:
        return json.loads(self.line(off))

    def close(self) -> None:
        self._f.close()


class TextTable(Sequence):
    """``table[i] = getters[src[i]](key[i], sub[i])``, computed on access (texts or ids read from disk)."""

    def __init__(self, getters: Sequence[Callable[[int, int], str]], src, key, sub):
        self.getters, self.src, self.key, self.sub = getters, src, key, sub

    def __len__(self) -> int:
        return len(self.src)

    def _get(self, i: int) -> str:
        return self.getters[self.src[i]](int(self.key[i]), int(self.sub[i]))

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._get(i)

    def __iter__(self):
        return (self._get(i) for i in range(len(self)))


@dataclass
class MiningTexts:
    """What the miner needs about its texts, as arrays and lazy tables."""

    docs: TextTable
    """The documents searched: the corpus then the positives, deduplicated by text in first-seen order."""
    doc_ids: TextTable
    """Id of each document (the corpus ``_id`` / ``id`` / line number, else ``q{query}-pos{j}``)."""
    queries: TextTable
    """One text per query (group of rows with the same query)."""
    pos_ptr: np.ndarray
    """Positives of query ``g`` are ``pos_doc[pos_ptr[g]:pos_ptr[g + 1]]`` (document indices, first-seen order)."""
    pos_doc: np.ndarray
    """Concatenated document indices of every query's positives."""
    query_doc: np.ndarray
    """Per query, the document with the same text (excluded from its negatives), else -1."""
    extras: Optional[Callable[[int], Dict[str, Any]]] = None
    """``extras(g)``: the pass-through fields of query ``g`` (from its first input row), when read from a file."""
    files: Tuple[FileRows, ...] = ()
    """Open files the tables read from: :meth:`close` them."""
    doc_hash: Optional[np.ndarray] = None
    """16-byte digest of each document's text (``S16``): the embedding cache is keyed on these, not the texts."""
    query_hash: Optional[np.ndarray] = None
    """16-byte digest of each query's text."""

    def positives(self, g: int) -> List[int]:
        return self.pos_doc[self.pos_ptr[g]:self.pos_ptr[g + 1]].tolist()

    def close(self) -> None:
        for f in self.files:
            f.close()


def first_seen(hashes: np.ndarray):
    """First-seen order of distinct hashes, as a dict would give it: ``(first, label, uniq, rank)`` with ``first``
    the row of each distinct hash's first occurrence (in that order), ``label[i]`` the distinct index of row ``i``,
    ``uniq`` the sorted distinct hashes and ``rank`` their distinct index (for lookups by ``searchsorted``)."""
    uniq, first, inv = np.unique(hashes, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    by_first = np.argsort(first, kind="stable")
    rank[by_first] = np.arange(len(uniq))
    return first[by_first], rank[inv.reshape(-1)], uniq, rank


def _plan(c_hash, c_key, c_sub, q_hash, pe_group, pe_hash, pe_key, pe_sub, n_groups, doc_getters, id_getters,
          queries: TextTable, extras=None, files=()) -> MiningTexts:
    """Group positives per query (first occurrence per query kept) and deduplicate corpus + positives by hash."""
    perm = np.argsort(pe_group, kind="stable")  # entries by query, file order within one
    if len(pe_hash):
        _, hid = np.unique(pe_hash, return_inverse=True)
        g, h = pe_group[perm], hid.reshape(-1)[perm]
        o = np.lexsort((np.arange(len(perm)), h, g))
        first = np.ones(len(o), dtype=bool)
        first[1:] = (g[o][1:] != g[o][:-1]) | (h[o][1:] != h[o][:-1])
        kept = perm[np.sort(o[first])]
    else:
        kept = perm
    k_group = pe_group[kept]
    pos_ptr = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(k_group, minlength=n_groups), out=pos_ptr[1:])
    k_j = np.arange(len(kept)) - pos_ptr[k_group]  # index among the query's distinct positives
    n_c = len(c_hash)
    all_hash = np.concatenate([c_hash, pe_hash[kept]]).astype("S16")
    entries, label, uniq, rank = first_seen(all_hash)
    src = (entries >= n_c).astype(np.uint8)  # 0: a corpus row, 1: a positive
    docs = TextTable(doc_getters, src, np.concatenate([c_key, pe_key[kept]])[entries],
                     np.concatenate([c_sub, pe_sub[kept]])[entries])
    doc_ids = TextTable(id_getters, src, np.concatenate([c_key, k_group])[entries],
                        np.concatenate([c_sub, k_j])[entries])
    query_doc = np.full(len(q_hash), -1, dtype=np.int64)
    if len(uniq):
        at = np.minimum(np.searchsorted(uniq, q_hash), len(uniq) - 1)
        query_doc = np.where(uniq[at] == q_hash, rank[at], -1)
    return MiningTexts(docs, doc_ids, queries, pos_ptr, label[n_c:], query_doc.astype(np.int64), extras,
                       tuple(files), all_hash[entries], np.asarray(q_hash, dtype="S16"))


def from_lists(queries: Sequence[str], positives: Sequence[Sequence[str]], corpus: Optional[Sequence[str]] = None,
               corpus_ids: Optional[Sequence[str]] = None) -> MiningTexts:
    """The in-memory form (``mine_hard_negatives``): query ``i`` has positives ``positives[i]``, no grouping."""
    corpus = corpus or ()
    c_hash = _hashes(bytearray(b"".join(digest(t) for t in corpus)))
    c_idx = np.arange(len(corpus), dtype=np.int64)
    pe_group, pe_j, buf = [], [], bytearray()
    for qi, ps in enumerate(positives):
        for j, p in enumerate(ps):
            pe_group.append(qi)
            pe_j.append(j)
            buf += digest(p)
    pe_group, pe_j = np.asarray(pe_group, dtype=np.int64), np.asarray(pe_j, dtype=np.int64)
    q_hash = _hashes(bytearray(b"".join(digest(q) for q in queries)))
    qs = list(queries)
    q_table = TextTable([lambda i, _: qs[i]], np.zeros(len(qs), dtype=np.uint8), np.arange(len(qs)),
                        np.zeros(len(qs), dtype=np.int64))
    doc_get = [lambda i, _: corpus[i], lambda qi, j: positives[qi][j]]
    id_get = [lambda i, _: str(corpus_ids[i]) if corpus_ids is not None else str(i), lambda qi, j: f"q{qi}-pos{j}"]
    return _plan(c_hash, c_idx, c_idx, q_hash, pe_group, _hashes(buf), pe_group, pe_j, len(qs), doc_get, id_get,
                 q_table)


def from_files(pairs_path, corpus_path=None) -> MiningTexts:
    """Scan the pairs JSONL (rows grouped by query text) and the corpus (``.txt`` one per line, else JSONL with
    ``text`` / ``title`` / ``_id``): one pass each, keeping offsets and hashes; errors name file:line."""
    # array("q"): 8 bytes a row, not a Python int object each
    row_off, q_buf, pe_row, pe_j, p_buf = array("q"), bytearray(), array("q"), array("q"), bytearray()
    for off, n, row in jsonl_objects(pairs_path):
        qk, pk = pair_keys(pairs_path, n, row)
        q_buf += digest(_text(pairs_path, n, qk, row[qk]))
        for j, p in enumerate(pair_positives(row, pk)):
            pe_row.append(len(row_off))
            pe_j.append(j)
            p_buf += digest(_text(pairs_path, n, pk, p))
        row_off.append(off)
    row_off = np.frombuffer(row_off, dtype=np.int64)
    groups, row_group, _, _ = first_seen(_hashes(q_buf))
    pe_row = np.frombuffer(pe_row, dtype=np.int64)
    c_off, c_line, c_buf = array("q"), array("q"), bytearray()
    txt = corpus_path is not None and Path(corpus_path).suffix == ".txt"
    if corpus_path is not None:
        rows = text_lines(corpus_path) if txt else jsonl_objects(corpus_path)
        for off, n, r in rows:
            c_buf += digest(strip_eol(r) if txt else _text(corpus_path, n, "text", corpus_text(r)))
            c_off.append(off)
            c_line.append(n)
    pairs = FileRows(pairs_path)
    corpus = FileRows(corpus_path) if corpus_path is not None else None

    def positive(off, j):
        row = pairs.row(off)
        return pair_positives(row, pair_keys(pairs_path, 0, row)[1])[j]

    def query(off, _):
        row = pairs.row(off)
        return row[pair_keys(pairs_path, 0, row)[0]]

    def corpus_id(off, n):
        if txt:
            return str(n)
        row = corpus.row(off)
        return str(row.get("_id", row.get("id", n)))

    doc_get = [(lambda off, _: strip_eol(corpus.line(off))) if txt else (lambda off, _: corpus_text(corpus.row(off))),
               positive]
    id_get = [corpus_id, lambda g, j: f"q{g}-pos{j}"]
    first_row = row_off[groups]

    def extras(g):
        row = pairs.row(int(first_row[g]))
        return pass_through(row, *pair_keys(pairs_path, 0, row))

    q_table = TextTable([query], np.zeros(len(groups), dtype=np.uint8), first_row,
                        np.zeros(len(groups), dtype=np.int64))
    q_hash = _hashes(q_buf)[groups]
    pe_group = row_group[pe_row]
    return _plan(_hashes(c_buf), np.frombuffer(c_off, dtype=np.int64), np.frombuffer(c_line, dtype=np.int64),
                 q_hash, pe_group, _hashes(p_buf), row_off[pe_row], np.frombuffer(pe_j, dtype=np.int64), len(groups),
                 doc_get, id_get, q_table, extras, (pairs,) + ((corpus,) if corpus else ()))
