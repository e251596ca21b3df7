"""Readers: local JSONL/CSV/TSV/parquet, Hugging Face datasets, and a corpus looked up by id.

Rows stay in Arrow tables (``datasets.Dataset``, memory-mapped for HF and parquet) and are normalised to a canonical
per-task row only when a batch needs them. Small text files are parsed here so that every error can name the line.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import datasets

from .spec import DataSpec, SpecError

datasets.disable_progress_bars()  # a bar per small spec drowns the training log


class RowError(ValueError):
    def __init__(self, field: str, msg: str):
        super().__init__(msg)
        self.field, self.msg = field, msg


def get_path(row: Dict[str, Any], path: str) -> Any:
    """Value at ``a.b.0``: dicts are indexed by key, lists by int, or mapped over when the key is a name."""
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                raise KeyError(part)
            value = value[part]
        elif isinstance(value, (list, tuple)):
            if part.lstrip("-").isdigit():
                value = value[int(part)]
            else:
                value = [get_path(v, part) for v in value]
        else:
            raise KeyError(part)
    return value


def _text(value: Any, field: str) -> str:
    if value is None:
        raise RowError(field, "missing value (null)")
    if not isinstance(value, str):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        else:
            raise RowError(field, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty text")
    return value


def _cell_items(value: Any) -> List[Any]:
    """A cell as a list: None -> [], a JSON list written into a CSV cell -> its items, a scalar -> [scalar]."""
    if value is None:
        return []
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _texts(value: Any, field: str) -> List[str]:
    items = _cell_items(value)
    return [_text(v, f"{field}[{i}]") for i, v in enumerate(items)]


def _scores(value: Any, field: str, n: int) -> List[float]:
    """Teacher scores (a number or a list) that must align one-to-one with ``n`` texts of another column."""
    items = _cell_items(value)
    out = []
    for i, v in enumerate(items):
        try:
            if isinstance(v, bool):
                raise TypeError
            x = float(v)
        except (TypeError, ValueError):
            raise RowError(f"{field}[{i}]", f"score is not a number: {v!r}") from None
        if not math.isfinite(x):  # one NaN would turn the whole KL term into NaN and skip the step
            raise RowError(f"{field}[{i}]", f"score is not finite: {v!r}")
        out.append(x)
    if len(out) != n:
        raise RowError(field, f"{len(out)} scores for {n} texts (scores must align with the texts)")
    return out


def normalize(row: Dict[str, Any], spec: DataSpec, label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Raw source row -> canonical row of the spec's task. Raises RowError naming the (source) field."""
    out = _normalize(row, spec, label_names)
    if spec.fields.instruction:
        try:  # the column is optional per row: a missing or empty cell falls back to the spec's instruction
            value = get_path(row, spec.fields.instruction)
        except (KeyError, IndexError, TypeError):
            value = None
        out["instruction"] = value.strip() if isinstance(value, str) and value.strip() else None
    return out


def _normalize(row: Dict[str, Any], spec: DataSpec, label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    f = spec.fields

    def col(key: str, required: bool = True) -> Any:
        name = getattr(f, key)
        if not name:
            return None
        try:
            return get_path(row, name)
        except (KeyError, IndexError, TypeError):
            if required:
                raise RowError(name, "missing field") from None
            return None

    if spec.task == "retrieval":
        out = {"query": _text(col("query"), f.query),
               "positives": _texts(col("positive"), f.positive or "") if f.positive else [],
               "negatives": _texts(col("negatives", False), f.negatives or "") if f.negatives else [],
               "positive_ids": [str(v) for v in _texts(col("positive_ids"), f.positive_ids)] if f.positive_ids else [],
               "negative_ids": _texts(col("negative_ids", False), f.negative_ids) if f.negative_ids else []}
        if not out["positives"] and not out["positive_ids"]:
            raise RowError(f.positive or f.positive_ids or "positive", "no positive")
        if f.positive_scores:  # the spec guarantees both score columns, each aligned with one text/id column
            pos = out["positives"] or out["positive_ids"]
            neg = out["negatives"] or out["negative_ids"]
            out["positive_scores"] = _scores(col("positive_scores"), f.positive_scores, len(pos))
            out["negative_scores"] = _scores(col("negative_scores", False), f.negative_scores, len(neg))
        return out
    if spec.task == "sts":
        score = col("score")
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise RowError(f.score, f"score is not a number: {score!r}") from None
        return {"text1": _text(col("text1"), f.text1), "text2": _text(col("text2"), f.text2), "score": score}
    label = col("label")
    if label is None or (isinstance(label, str) and not label.strip()):
        raise RowError(f.label, "empty label")
    label_text = col("label_text", False) if f.label_text else None
    if label_text is None and label_names is not None and isinstance(label, int) and 0 <= label < len(label_names):
        label_text = label_names[label]  # HF ClassLabel
    return {"text": _text(col("text"), f.text), "label": str(label),
            "label_text": None if label_text is None else str(label_text)}


def _decode(path: Path, encoding: str) -> str:
    data = path.read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise SpecError(f"{path}:{line}: cannot decode as {encoding} ({e.reason}); "
                        f"set 'source.encoding' in the spec (e.g. latin-1)") from None
    except LookupError:
        raise SpecError(f"{path}: unknown encoding {encoding!r}") from None


def read_text_rows(path: Path, fmt: str, encoding: str, quoting: Optional[str], on_bad: Callable[[int, str], None]):
    """Yield (line number, raw dict) from a JSONL/CSV/TSV file; malformed lines go to ``on_bad``."""
    if not path.exists():
        raise SpecError(f"{path}: data file not found")
    text = _decode(path, encoding)
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                on_bad(n, f"malformed JSON ({e.msg})")
                continue
            if not isinstance(obj, dict):
                on_bad(n, "a JSON line must be an object")
                continue
            yield n, obj
        return
    delim = "\t" if fmt == "tsv" else ","
    q = quoting or ("none" if fmt == "tsv" else "minimal")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim,
                        quoting=csv.QUOTE_NONE if q == "none" else csv.QUOTE_MINIMAL)
    header = next(reader, None)
    if not header:
        raise SpecError(f"{path}:1: empty file (a header line is required)")
    for cells in reader:
        n = reader.line_num
        if not cells:
            continue
        if len(cells) != len(header):
            on_bad(n, f"{len(cells)} columns, header has {len(header)}")
            continue
        yield n, dict(zip(header, cells))


class Source:
    """Rows of one spec in an Arrow table; ``fetch`` returns canonical rows for a list of indices."""

    def __init__(self, table: datasets.Dataset, spec: DataSpec, canonical: bool, locate: Callable[[int], str],
                 label_names: Optional[Sequence[str]] = None):
        self.table, self.spec, self.canonical, self._locate = table, spec, canonical, locate
        self.label_names = label_names
        self.index: Optional[Sequence[int]] = None  # valid rows, set by validate()

    def __len__(self) -> int:
        return len(self.table)

    def locate(self, i: int) -> str:
        return self._locate(i)

    def raw(self, idxs: Sequence[int]) -> List[Dict[str, Any]]:
        cols = self.table[list(idxs)] if len(idxs) else {}
        keys = list(cols)
        return [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))] if keys else []

    def fetch(self, idxs: Sequence[int]) -> List[Dict[str, Any]]:
        rows = self.raw(idxs)
        if self.canonical:
            return rows
        return [normalize(r, self.spec, self.label_names) for r in rows]


def _label_names(ds: datasets.Dataset, spec: DataSpec) -> Optional[Sequence[str]]:
    feat = ds.features.get(spec.fields.label or "") if spec.fields.label else None
    return getattr(feat, "names", None)


def open_source(spec: DataSpec, on_bad: Callable[[str, str], None]) -> Source:
    """Open the spec's data. ``on_bad(location, reason)`` handles unparseable lines (raise or count)."""
    src = spec.source
    if src.hf:
        local = spec.resolve(src.hf)
        try:
            if local is not None and local.exists():
                ds = datasets.load_from_disk(str(local))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[src.split]
            else:
                ds = datasets.load_dataset(src.hf, src.config, split=src.split, revision=src.revision)
        except Exception as e:  # network, missing split/config: say which spec asked for it
            raise SpecError(f"{spec.path}: cannot load HF dataset {src.hf!r} (config={src.config}, "
                            f"split={src.split}, revision={src.revision}): {e}") from e
        where = f"{src.hf}[{src.config or '-'}/{src.split}]"
        return Source(ds, spec, False, lambda i: f"{where} row {i}", _label_names(ds, spec))
    path = spec.resolve(src.path)
    assert path is not None
    fmt = src.format or path.suffix.lstrip(".").lower()
    if fmt == "parquet":
        if not path.exists():
            raise SpecError(f"{path}: data file not found")
        try:  # the footer first: datasets would log its own multi-line error before raising
            import pyarrow.parquet as pq

            pq.read_schema(str(path))
        except Exception as e:  # pyarrow says what is wrong, not which spec asked for the file
            raise SpecError(f"{path}: cannot read as parquet ({type(e).__name__}: {e}); spec {spec.path}") from None
        ds = datasets.Dataset.from_parquet(str(path))
        return Source(ds, spec, False, lambda i: f"{path}:row {i + 1}", _label_names(ds, spec))
    rows, lines = [], []
    for n, raw in read_text_rows(path, fmt, src.encoding, src.quoting, lambda n, why: on_bad(f"{path}:{n}", why)):
        try:
            rows.append(normalize(raw, spec))
            lines.append(n)
        except RowError as e:
            on_bad(f"{path}:{n}: field '{e.field}'", e.msg)
    table = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({})
    return Source(table, spec, True, lambda i: f"{path}:{lines[i]}")


def validate(source: Source, on_bad: Callable[[str, str], None], chunk: int = 10000) -> List[int]:
    """Indices of rows that normalise; bad ones go to ``on_bad``. Local text sources were checked when read."""
    if source.canonical:
        return list(range(len(source)))
    good: List[int] = []
    for start in range(0, len(source), chunk):
        idxs = list(range(start, min(start + chunk, len(source))))
        for i, row in zip(idxs, source.raw(idxs)):
            try:
                normalize(row, source.spec, source.label_names)
                good.append(i)
            except RowError as e:
                on_bad(f"{source.locate(i)}: field '{e.field}'", e.msg)
    return good
