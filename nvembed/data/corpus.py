"""Documents looked up by id (``positive_ids``/``negative_ids``): texts stay in Arrow, only the id map is in memory."""

from __future__ import annotations

from typing import List, Sequence

import datasets

from .sources import RowError, _text, read_text_rows
from .spec import DataSpec, SpecError


class Corpus:
    """Corpus file of one spec (local jsonl/csv/tsv/parquet)."""

    def __init__(self, spec: DataSpec):
        path = spec.resolve(spec.source.corpus)
        assert path is not None
        self.path = path
        fid, ftext = spec.fields.corpus_id, spec.fields.corpus_text
        fmt = path.suffix.lstrip(".").lower()
        if fmt == "parquet":
            self.table = datasets.Dataset.from_parquet(str(path))
            ids = [str(v) for v in self.table[fid]]
        else:
            def bad(n: int, why: str) -> None:
                raise SpecError(f"{path}:{n}: {why}")
            ids, texts = [], []
            for n, raw in read_text_rows(path, fmt, spec.source.encoding, spec.source.quoting, bad):
                if fid not in raw:
                    raise SpecError(f"{path}:{n}: field '{fid}': missing field")
                try:
                    texts.append(_text(raw.get(ftext), ftext))
                except RowError as e:
                    raise SpecError(f"{path}:{n}: field '{e.field}': {e.msg}") from None
                ids.append(str(raw[fid]))
            self.table = datasets.Dataset.from_dict({ftext: texts})
        self.text_col = ftext
        self.pos = {d: i for i, d in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.pos)

    def has(self, doc_id: str) -> bool:
        return doc_id in self.pos

    def texts(self, ids: Sequence[str]) -> List[str]:
        return self.texts_at([self.pos[d] for d in ids])

    def texts_at(self, idxs: Sequence[int]) -> List[str]:
        return list(self.table[list(idxs)][self.text_col]) if len(idxs) else []
