"""The passage collection of a FRet run without its texts in memory (issue #17).

:func:`read_passages` scans the file once, collecting per passage a byte offset, a line number and two 16-byte
hashes (text, id) in numpy arrays, and keeps offsets and line numbers: 24 bytes a passage (~110 at the peak of the
scan), against the texts themselves (5-10 GB of Python strings for 10 M passages). A text or id is read back from
disk when a chunk of work needs it (``pool[i]``, :meth:`PassagePool.fetch`); the encoder gets the texts chunk by
chunk through :attr:`PassagePool.texts`.
Exact duplicate texts are dropped (first occurrence kept) by a stable sort of the hashes, and a repeated id or
a line that is not a JSON object is an error naming the file and line.
"""

from __future__ import annotations

import hashlib
from array import array
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from .resume import stable_id

TEXT_KEYS = ("text", "passage", "contents", "corpus_text")
ID_KEYS = ("id", "_id", "doc_id", "corpus_id")


def _digest(s: str) -> bytes:
    return hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def first_occurrences(hashes: np.ndarray) -> np.ndarray:
    """Rows whose 16-byte hash has not appeared in an earlier row, in row order (a stable sort of the hashes as two
    uint64 columns: no copy of them as Python bytes)."""
    a = np.ascontiguousarray(hashes).view(np.uint64).reshape(-1, 2)
    order = np.lexsort((a[:, 1], a[:, 0]))  # stable: equal hashes keep their row order
    s = a[order]
    new = np.ones(len(order), dtype=bool)
    new[1:] = (s[1:] != s[:-1]).any(axis=1)
    return np.sort(order[new])


def jsonl_passage(row: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """``(id, text)`` of one JSONL row (``title`` prepended; id = content hash when the row has none), or None for a
    row without text."""
    text = next((row[k] for k in TEXT_KEYS if row.get(k)), None)
    if not isinstance(text, str) or not text.strip():
        return None
    if row.get("title"):
        text = f"{row['title']}\n{text}"
    pid = next((str(row[k]) for k in ID_KEYS if row.get(k) is not None), None)
    text = text.strip()
    return pid or stable_id(text), text


class _Column(Sequence):
    """A lazy column of the pool (texts or ids): ``col[a:b]`` reads those rows from disk."""

    def __init__(self, get: Callable[[int], str], n: int):
        self.get, self.n = get, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(self.n))]
        return self.get(range(self.n)[i])


class PassagePool(Sequence):
    """``pool[i] = (id, text)`` of passage ``i``, computed on access by ``get(i)``."""

    def __init__(self, n: int, get: Callable[[int], Tuple[str, str]], fingerprint: str, source: str = "<memory>",
                 close: Callable[[], None] = lambda: None):
        self.n, self._get, self._close = n, get, close
        self.fingerprint = fingerprint
        """A hash of every text in order: names the embedding store of this collection."""
        self.source = source
        self.texts = _Column(lambda i: self._get(i)[1], n)
        self.ids = _Column(lambda i: self._get(i)[0], n)

    @classmethod
    def from_pairs(cls, pairs: Sequence[Tuple[str, str]]) -> "PassagePool":
        """A pool over (id, text) pairs already in memory (taken as given: no deduplication)."""
        pairs = list(pairs)
        h = hashlib.sha256()
        for _, t in pairs:
            h.update(_digest(t))
        return cls(len(pairs), lambda i: (str(pairs[i][0]), pairs[i][1]), h.hexdigest()[:16])

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self._get(j) for j in range(*i.indices(self.n))]
        return self._get(range(self.n)[i])

    def fetch(self, rows: Iterable[int]) -> Dict[int, Tuple[str, str]]:
        """``{row: (id, text)}`` of the given rows, each read once, in file order."""
        return {r: self._get(r) for r in sorted({int(r) for r in rows})}

    def close(self) -> None:
        self._close()


def read_passages(path: str | Path) -> PassagePool:
    """The passages of a JSONL (``id``/``_id``/``doc_id``/``corpus_id`` + ``text``/``passage``/``contents``,
    ``title`` prepended) or TXT file (one passage per line; id = content hash), read in one pass; exact duplicate
    texts are dropped. A line that is not a JSON object, or an id used twice, is a ``SpecError`` naming file:line."""
    from nvembed.data.sources import json_object, text_lines
    from nvembed.data.spec import SpecError
    from nvembed.mining.texts import FileRows

    def parse_line(n: int, line: str) -> Dict[str, Any]:
        row, problem = json_object(line)
        if problem:
            raise SpecError(f"{p}:{n}: {problem}")
        return row

    p = Path(path)
    jsonl = p.suffix.lower() in (".jsonl", ".json")
    # per passage: byte offset of its line, line number, piece of the line (TXT: str.splitlines pieces)
    off, line_no, piece = array("q"), array("q"), array("q")
    t_buf, i_buf = bytearray(), bytearray()
    for o, n, line in text_lines(p):
        if jsonl:
            got = jsonl_passage(parse_line(n, line))
            found = [(0, *got)] if got else []
        else:
            found = [(j, stable_id(t.strip()), t.strip()) for j, t in enumerate(line.splitlines()) if t.strip()]
        for j, pid, text in found:
            off.append(o)
            line_no.append(n)
            piece.append(j)
            t_buf += _digest(text)
            i_buf += _digest(pid)
    t_hash = np.frombuffer(t_buf, dtype="S16")
    keep = first_occurrences(t_hash)  # of each text, in file order
    fingerprint = hashlib.sha256(t_hash[keep].tobytes()).hexdigest()[:16]
    off_k = np.frombuffer(off, dtype=np.int64)[keep]
    line_k = np.frombuffer(line_no, dtype=np.int64)[keep]
    piece_k = np.frombuffer(piece, dtype=np.int64)[keep]
    i_hash = np.frombuffer(i_buf, dtype="S16")[keep]
    del t_hash, t_buf, i_buf, off, line_no, piece
    rows = FileRows(p)

    def get(i: int) -> Tuple[str, str]:
        line = rows.line(int(off_k[i]))
        if jsonl:
            return jsonl_passage(parse_line(int(line_k[i]), line))
        t = line.splitlines()[int(piece_k[i])].strip()
        return stable_id(t), t

    id_first = first_occurrences(i_hash)
    if len(id_first) < len(i_hash):
        repeat = int(np.flatnonzero(~np.isin(np.arange(len(i_hash)), id_first))[0])
        earlier = int(np.flatnonzero(i_hash == i_hash[repeat])[0])
        pid = get(repeat)[0]
        rows.close()
        raise SpecError(f"{p}:{int(line_k[repeat])}: passage id {pid!r} is already the id of line "
                        f"{int(line_k[earlier])}: passage ids must be unique")
    return PassagePool(len(keep), get, fingerprint, str(p), rows.close)
