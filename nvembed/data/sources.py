"""Readers: local JSONL/CSV/TSV/parquet, Hugging Face datasets, and a corpus looked up by id.

Every source is read once into the data cache (:mod:`.cache`): rows are parsed and checked block by block (by worker
processes for a large line-delimited file), a bad row is named by file:line:field and raised or counted as the spec
says, and the valid rows are written as the task's canonical row (:func:`normalize`) to a memory-mapped Arrow file.
Later starts and the other ranks map that file and replay the recorded bad rows (same errors, counts and logs), so
nothing is parsed twice and a rank reads only the rows its batches fetch.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import json
import math
import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pyarrow as pa
import pyarrow.compute as pc

from .cache import Entry, Table, cached
from .spec import DataSpec, SpecError

BLOCK = 8 << 20  # bytes decoded at a time
RANGE = 32 << 20  # bytes per worker job
PARALLEL_MIN = 64 << 20  # smaller files are parsed in-process: starting workers would cost more than it saves
BATCH_ROWS = 8192  # rows per record batch of a cache file
KEEP_BAD = 5  # bad rows recorded in full (TaskData shows the first 5); the others are counted by reason
WORKERS_ENV = "NVEMBED_DATA_WORKERS"

OnBad = Callable[..., None]  # on_bad(location or None, reason, count=1): raise, or count (and log with a location)


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


# ---- canonical rows in Arrow -----------------------------------------------------------------------------------
def canonical_schema(spec: DataSpec) -> pa.Schema:
    """Columns of the cached rows of ``spec`` (what :func:`normalize` returns) plus ``_at``, the row's line in its
    file (or its index in a table source), kept for messages."""
    s, ls, lf = pa.string(), pa.list_(pa.string()), pa.list_(pa.float64())
    if spec.task == "retrieval":
        cols = [("query", s), ("positives", ls), ("negatives", ls), ("positive_ids", ls), ("negative_ids", ls)]
        if spec.fields.positive_scores:
            cols += [("positive_scores", lf), ("negative_scores", lf)]
    elif spec.task == "sts":
        cols = [("text1", s), ("text2", s), ("score", pa.float64())]
    else:
        cols = [("text", s), ("label", s), ("label_text", s)]
    if spec.fields.instruction:
        cols.append(("instruction", s))
    return pa.schema(cols + [("_at", pa.int64())])


CORPUS_SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("_at", pa.int64())])


def _corpus_row(raw: Dict[str, Any], fid: str, ftext: str) -> Dict[str, Any]:
    if fid not in raw:
        raise RowError(fid, "missing field")
    return {"id": str(raw[fid]), "text": _text(raw.get(ftext), ftext)}


class BadRows:
    """Rows left out of a source: the first few in full, every one counted by reason (in order of first
    occurrence). Recorded in the cache entry and replayed at every start, so a start that maps the cache raises,
    counts and logs exactly what the start that built it did."""

    def __init__(self, first: Sequence[Sequence[Any]] = (), counts: Optional[Dict[str, int]] = None):
        self.first: List[Tuple[int, Optional[str], str]] = [tuple(x) for x in first]  # (at, field, why)
        self.counts: Dict[str, int] = dict(counts or {})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, at: int, field: Optional[str], why: str) -> None:
        if len(self.first) < KEEP_BAD:
            self.first.append((at, field, why))
        self.counts[why] = self.counts.get(why, 0) + 1

    def merge(self, first: Sequence[Tuple[int, Optional[str], str]], counts: Dict[str, int], offset: int) -> None:
        """Add a worker's part (its first rows in full, all counted), lines shifted by the part's offset."""
        shown: Counter = Counter()
        for at, field, why in first:
            self.add(at + offset, field, why)
            shown[why] += 1
        for why, n in counts.items():
            if n > shown[why]:
                self.counts[why] = self.counts.get(why, 0) + n - shown[why]

    def to_json(self) -> Dict[str, Any]:
        return {"first": self.first, "counts": self.counts}

    def replay(self, on_bad: OnBad, locate: Callable[[int], str], suffix: str = "") -> None:
        shown: Counter = Counter()
        for at, field, why in self.first:
            on_bad(_where(locate(at), field), why + suffix)
            shown[why] += 1
        for why, n in self.counts.items():
            if n > shown[why]:
                on_bad(None, why + suffix, n - shown[why])


def _where(loc: str, field: Optional[str]) -> str:
    return f"{loc}: field '{field}'" if field else loc


# ---- text files: blocks -> records -> canonical rows -------------------------------------------------------------
@dataclass
class _Job:
    """One byte range of a text file to parse (a worker process gets one; a small file is one job, in-process)."""

    path: str
    fmt: str
    encoding: str
    quoting: str
    ascii_newlines: bool  # b"\\n" ends a line in this encoding, so the file can be cut at any newline
    start: int
    end: int
    header: Optional[List[str]]  # csv/tsv range after the header line: the header; else read from the range
    spec: Optional[DataSpec]  # rows of this spec; None: corpus rows
    corpus_fields: Tuple[str, str] = ("id", "text")
    stop_on_bad: bool = True


class _DecodeError(Exception):
    def __init__(self, line: int, reason: str):
        super().__init__(reason)
        self.line, self.reason = line, reason


def _blocks(job: _Job, state: Dict[str, int]) -> Iterator[Tuple[int, str]]:
    """(lines before the block, decoded text) over bytes [start, end), each block cut just after a newline."""
    if not job.ascii_newlines:  # e.g. utf-16: a newline is two bytes, decode the whole file at once as before
        data = Path(job.path).read_bytes()
        try:
            text = data.decode(job.encoding)
        except UnicodeDecodeError as e:
            raise _DecodeError(data[: e.start].count(b"\n") + 1, e.reason) from None
        state["lines"] = text.count("\n")
        yield 0, text
        return
    lines, carry = 0, b""
    with open(job.path, "rb") as f:
        f.seek(job.start)
        pos = job.start
        while True:
            data = f.read(min(BLOCK, job.end - pos)) if pos < job.end else b""
            pos += len(data)
            last = not data or pos >= job.end
            buf = carry + data
            cut = len(buf) if last else buf.rfind(b"\n") + 1
            chunk, carry = buf[:cut], buf[cut:]
            if chunk:
                try:
                    text = chunk.decode(job.encoding)
                except UnicodeDecodeError as e:
                    raise _DecodeError(lines + chunk[: e.start].count(b"\n") + 1, e.reason) from None
                yield lines, text
                lines += chunk.count(b"\n")
            if last:
                state["lines"] = lines
                return


def json_object(line: str) -> Tuple[Optional[dict], str]:
    """One JSONL line: ``(object, "")``, or ``(None, what is wrong)`` for the caller to report with file:line.
    The one JSON-line check of every reader (data sources, BEIR folders, the miner's inputs)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        return None, f"malformed JSON ({e.msg})"
    if not isinstance(obj, dict):
        return None, "a JSON line must be an object"
    return obj, ""


def text_lines(path) -> Iterator[Tuple[int, int, str]]:
    """``(byte offset, line number, text)`` of each non-blank line of a UTF-8 text file, streamed; a missing file or a
    line that is not UTF-8 is a :class:`SpecError` naming file:line. Only \\n ends a line (JSON strings hold no raw
    \\r or \\n); the offset lets callers read a row back later."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise SpecError(f"{path}: file not found") from None
    with f:
        off = 0
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SpecError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if line.strip():
                yield off, n, line
            off += len(raw)


def jsonl_objects(path) -> Iterator[Tuple[int, int, dict]]:
    """``(byte offset, line number, object)`` of each non-blank line of a JSONL file (:func:`text_lines`); a line
    that is not a JSON object is a :class:`SpecError` naming file:line. The one line reader of the BEIR folders
    (evaluation) and the miner's inputs."""
    for off, n, line in text_lines(path):
        obj, problem = json_object(line)
        if problem:
            raise SpecError(f"{path}:{n}: {problem}")
        yield off, n, obj


def _json_records(job: _Job, state: Dict[str, int]) -> Iterator[Tuple[int, Optional[dict], str]]:
    for before, text in _blocks(job, state):
        for k, line in enumerate(text.split("\n")):  # only \\n ends a line: a JSON text may hold U+2028 and co.
            if line.strip():
                yield (before + k + 1, *json_object(line))


def _csv_records(job: _Job, state: Dict[str, int]) -> Iterator[Tuple[int, Optional[dict], str]]:
    # csv's own line splitting and line numbers, as when the whole text was one StringIO (quoted cells may span lines)
    lines = (line for _, text in _blocks(job, state) for line in io.StringIO(text, newline=""))
    reader = csv.reader(lines, delimiter="\t" if job.fmt == "tsv" else ",",
                        quoting=csv.QUOTE_NONE if job.quoting == "none" else csv.QUOTE_MINIMAL)
    header = job.header
    if header is None:
        header = next(reader, None)
        if not header:
            raise SpecError(f"{job.path}:1: empty file (a header line is required)")
    for cells in reader:
        n = reader.line_num
        if not cells:
            continue
        if len(cells) != len(header):
            yield n, None, f"{len(cells)} columns, header has {len(header)}"
            continue
        yield n, dict(zip(header, cells)), ""
    state["lines"] = reader.line_num


def _parse(job: _Job) -> Iterator[Tuple[str, Any]]:
    """("bad", (line, field, why)) and ("batch", RecordBatch) in file order, then ("lines", lines in the range);
    line numbers count from the start of the range. Stops at the first bad row when ``job.stop_on_bad``."""
    state = {"lines": 0}
    records = _json_records(job, state) if job.fmt == "jsonl" else _csv_records(job, state)
    schema = canonical_schema(job.spec) if job.spec is not None else CORPUS_SCHEMA
    rows: List[Dict[str, Any]] = []
    for n, raw, why in records:
        try:
            if raw is None:
                raise RowError("", why)
            row = normalize(raw, job.spec) if job.spec is not None else _corpus_row(raw, *job.corpus_fields)
        except RowError as e:
            yield "bad", (n, e.field or None, e.msg)
            if job.stop_on_bad:
                return
            continue
        row["_at"] = n
        rows.append(row)
        if len(rows) == BATCH_ROWS:
            yield "batch", pa.RecordBatch.from_pylist(rows, schema=schema)
            rows = []
    if rows:
        yield "batch", pa.RecordBatch.from_pylist(rows, schema=schema)
    yield "lines", state["lines"]


def _run_job(job: _Job) -> Dict[str, Any]:
    """A worker's whole range: its batches, its first bad rows in full and all counted, its line count."""
    out: Dict[str, Any] = {"batches": [], "bad": [], "counts": {}, "lines": 0, "error": None}
    try:
        for kind, x in _parse(job):
            if kind == "batch":
                out["batches"].append(x)
            elif kind == "bad":
                if len(out["bad"]) < KEEP_BAD:
                    out["bad"].append(x)
                out["counts"][x[2]] = out["counts"].get(x[2], 0) + 1
            else:
                out["lines"] = x
    except _DecodeError as e:
        out["error"] = (e.line, e.reason)
    return out


def _ascii_newlines(path: Path, encoding: str) -> bool:
    try:
        enc = codecs.getincrementalencoder(encoding)()
    except LookupError:
        raise SpecError(f"{path}: unknown encoding {encoding!r}") from None
    enc.encode("a")  # past a byte-order mark
    return enc.encode("\n") == b"\n"


def _workers(size: int) -> int:
    if os.environ.get(WORKERS_ENV):
        return max(1, int(os.environ[WORKERS_ENV]))
    return min(8, os.cpu_count() or 1) if size >= PARALLEL_MIN else 1


def _ranges(path: Path, start: int, size: int, parts: int) -> List[Tuple[int, int]]:
    """``parts`` byte ranges covering [start, size), each ending just after a newline."""
    bounds = [start]
    step = (size - start) / parts
    with open(path, "rb") as f:
        for k in range(1, parts):
            f.seek(max(int(start + k * step), bounds[-1]))
            f.readline()
            if f.tell() >= size:
                break
            if f.tell() > bounds[-1]:
                bounds.append(f.tell())
    return list(zip(bounds, bounds[1:] + [size]))


def _build_text(builder, job: _Job, locate: Callable[[int], str], on_bad: OnBad,
                check: Optional[Callable[[pa.RecordBatch], pa.RecordBatch]] = None) -> Dict[str, Any]:
    """Parse ``job.path`` into the entry's ``rows`` file: in-process for a small file, else by worker processes over
    byte ranges, merged in file order (the same rows, line numbers and first error either way)."""
    path = Path(job.path)
    schema = canonical_schema(job.spec) if job.spec is not None else CORPUS_SCHEMA
    writer = builder.writer("rows", schema)
    bad, good = BadRows(), 0

    def decode_error(line: int, reason: str) -> SpecError:
        return SpecError(f"{path}:{line}: cannot decode as {job.encoding} ({reason}); "
                         f"set 'source.encoding' in the spec (e.g. latin-1)")

    def take(batch: pa.RecordBatch, offset: int) -> None:
        nonlocal good
        if offset:
            at = batch.schema.get_field_index("_at")
            batch = batch.set_column(at, "_at", pc.add(batch.column(at), pa.scalar(offset, pa.int64())))
        if check is not None:
            batch = check(batch)
        good += batch.num_rows
        writer.write_batch(batch)

    def bad_row(at: int, field: Optional[str], why: str) -> None:
        bad.add(at, field, why)
        if job.stop_on_bad:
            on_bad(_where(locate(at), field), why)  # raises

    size = path.stat().st_size
    line_delimited = job.fmt == "jsonl" or job.quoting == "none"
    workers = _workers(size) if line_delimited and job.ascii_newlines else 1
    if workers == 1:
        try:
            for kind, x in _parse(job):
                if kind == "batch":
                    take(x, 0)
                elif kind == "bad":
                    bad_row(*x)
        except _DecodeError as e:
            raise decode_error(e.line, e.reason) from None
        return {"rows": good, "bad": bad.to_json(), "rows_read": good + bad.total}
    start, offset, header = 0, 0, None
    if job.fmt != "jsonl":  # the header line is read here; every range gets it
        with open(path, "rb") as f:
            first = f.readline()
        try:
            header = next(csv.reader([first.decode(job.encoding)], delimiter="\t" if job.fmt == "tsv" else ",",
                                     quoting=csv.QUOTE_NONE), None)
        except UnicodeDecodeError as e:
            raise decode_error(1, e.reason) from None
        if not header:
            raise SpecError(f"{path}:1: empty file (a header line is required)")
        start, offset = len(first), 1
    parts = max(math.ceil((size - start) / RANGE), 2 * workers)
    parts = min(parts, max(1, (size - start) >> 16))  # ranges of at least 64 KB
    jobs = [dataclasses.replace(job, start=a, end=b, header=header) for a, b in _ranges(path, start, size, parts)]
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    ex = ProcessPoolExecutor(workers, mp_context=ctx)
    try:
        todo, pending = iter(jobs), deque()
        for _ in range(min(len(jobs), 2 * workers)):  # a bounded window: parsed ranges do not pile up here
            pending.append(ex.submit(_run_job, next(todo)))
        while pending:
            part = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(ex.submit(_run_job, nxt))
            if job.stop_on_bad and part["bad"]:
                at, field, why = part["bad"][0]
                on_bad(_where(locate(at + offset), field), why)  # raises
            bad.merge(part["bad"], part["counts"], offset)
            if part["error"]:
                raise decode_error(part["error"][0] + offset, part["error"][1])
            for batch in part["batches"]:
                take(batch, offset)
            offset += part["lines"]
    except BaseException:
        ex.shutdown(wait=False, cancel_futures=True)
        raise
    ex.shutdown()
    return {"rows": good, "bad": bad.to_json(), "rows_read": good + bad.total, "workers": workers}


# ---- table sources (HF datasets, parquet) -------------------------------------------------------------------------
def _build_rows(builder, spec: DataSpec, chunks: Iterator[Tuple[int, List[Dict[str, Any]]]],
                label_names: Optional[Sequence[str]], locate: Callable[[int], str], on_bad: OnBad) -> Dict[str, Any]:
    """Normalise a table source chunk by chunk into the entry's ``rows`` file."""
    schema = canonical_schema(spec)
    writer = builder.writer("rows", schema)
    bad, good = BadRows(), 0
    for first, raw_rows in chunks:
        out = []
        for i, raw in enumerate(raw_rows, first):
            try:
                row = normalize(raw, spec, label_names)
            except RowError as e:
                bad.add(i, e.field, e.msg)
                if spec.on_error == "raise":
                    on_bad(_where(locate(i), e.field), e.msg)
                continue
            row["_at"] = i
            out.append(row)
        if out:
            writer.write_batch(pa.RecordBatch.from_pylist(out, schema=schema))
            good += len(out)
    return {"rows": good, "bad": bad.to_json(), "rows_read": good + bad.total}


def _label_names(features: Any, spec: DataSpec) -> Optional[Sequence[str]]:
    feat = features.get(spec.fields.label or "") if spec.fields.label and features else None
    return getattr(feat, "names", None)


def _row_identity(spec: DataSpec, **more: Any) -> Dict[str, Any]:
    """What the canonical rows of a spec depend on besides its files (on_error is not: bad rows are replayed)."""
    return {"kind": "rows", "task": spec.task, "fields": dataclasses.asdict(spec.fields), **more}


def _open_hf(spec: DataSpec, on_bad: OnBad) -> Tuple[Entry, Callable[[int], str]]:
    import datasets

    datasets.disable_progress_bars()  # a bar per small spec drowns the training log
    src = spec.source
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

    def locate(i: int) -> str:
        return f"{where} row {i}"

    def chunks():
        for start in range(0, len(ds), 10000):
            cols = ds[start:start + 10000]
            keys = list(cols)
            yield start, [dict(zip(keys, vals)) for vals in zip(*(cols[k] for k in keys))]

    files = []  # a hub dataset is keyed by its fingerprint alone; a saved folder also by its state file
    if local is not None and local.exists():
        files = [p for p in (local / "state.json", local / "dataset_dict.json") if p.exists()]
    identity = _row_identity(spec, hf=src.hf, config=src.config, split=src.split, revision=src.revision,
                             fingerprint=ds._fingerprint)
    entry = cached(identity, files, lambda b: _build_rows(b, spec, chunks(), _label_names(ds.features, spec),
                                                          locate, on_bad))
    return entry, locate


def _open_parquet(spec: DataSpec, path: Path, on_bad: OnBad) -> Tuple[Entry, Callable[[int], str]]:
    import pyarrow.parquet as pq

    try:  # the footer first: say which file and spec when it is not parquet
        pf = pq.ParquetFile(str(path))
    except Exception as e:
        raise SpecError(f"{path}: cannot read as parquet ({type(e).__name__}: {e}); spec {spec.path}") from None

    def locate(i: int) -> str:
        return f"{path}:row {i + 1}"

    def chunks():
        first = 0
        for batch in pf.iter_batches(batch_size=10000):
            yield first, batch.to_pylist()
            first += batch.num_rows

    def build(b):
        names = None
        if spec.fields.label and b"huggingface" in (pf.schema_arrow.metadata or {}):
            import datasets  # a parquet file written by datasets keeps its ClassLabel names

            names = _label_names(datasets.Features.from_arrow_schema(pf.schema_arrow), spec)
        return _build_rows(b, spec, chunks(), names, locate, on_bad)

    return cached(_row_identity(spec, format="parquet"), [path], build), locate


def text_job(path: Path, spec: DataSpec, fmt: str, *, rows_of: Optional[DataSpec],
             stop_on_bad: bool) -> _Job:
    src = spec.source
    return _Job(path=str(path), fmt=fmt, encoding=src.encoding, quoting=src.quoting or
                ("none" if fmt == "tsv" else "minimal"), ascii_newlines=_ascii_newlines(path, src.encoding),
                start=0, end=path.stat().st_size, header=None, spec=rows_of,
                corpus_fields=(spec.fields.corpus_id, spec.fields.corpus_text), stop_on_bad=stop_on_bad)


def _open_text(spec: DataSpec, path: Path, fmt: str, on_bad: OnBad, corpus: Any) -> Tuple[Entry, Callable]:
    def locate(n: int) -> str:
        return f"{path}:{n}"

    job = text_job(path, spec, fmt, rows_of=spec, stop_on_bad=spec.on_error == "raise")
    ids_bad = BadRows()
    check = _ids_check(spec, corpus, ids_bad) if corpus is not None else None

    def build(b):
        meta = _build_text(b, job, locate, on_bad, check)
        meta["ids_bad"] = ids_bad.to_json()
        meta["rows_read"] += ids_bad.total
        return meta

    identity = _row_identity(spec, format=fmt, encoding=spec.source.encoding, quoting=job.quoting,
                             corpus=corpus.key if corpus is not None else None)
    files = [path] + ([corpus.path] if corpus is not None else [])
    return cached(identity, files, build), locate


def _ids_check(spec: DataSpec, corpus: Any, bad: BadRows) -> Callable[[pa.RecordBatch], pa.RecordBatch]:
    """Drop (and record) rows naming a document id the corpus lacks; vectorised over a batch."""
    field = spec.fields.positive_ids or spec.fields.negative_ids

    def check(batch: pa.RecordBatch) -> pa.RecordBatch:
        cols = [batch.column("positive_ids"), batch.column("negative_ids")]
        ids = pa.concat_arrays([pc.list_flatten(c) for c in cols])
        if not len(ids):
            return batch
        parents = pa.concat_arrays([pc.list_parent_indices(c) for c in cols]).to_numpy()
        found = corpus.lookup(ids.to_numpy(zero_copy_only=False)) >= 0
        rows = sorted(set(parents[~found].tolist()))
        if not rows:
            return batch
        keep = [True] * batch.num_rows
        for r in batch.select(["positive_ids", "negative_ids", "_at"]).take(pa.array(rows)).to_pylist():
            missing = [d for d in r["positive_ids"] + r["negative_ids"] if not corpus.has(d)]
            bad.add(r["_at"], field, f"id {missing[0]!r} not in corpus")  # the corpus path is added on replay
        for r in rows:
            keep[r] = False
        return batch.filter(pa.array(keep))

    return check


class Source:
    """Canonical rows of one spec, memory-mapped from the data cache; ``fetch`` reads only the rows asked for."""

    def __init__(self, entry: Entry, spec: DataSpec, locate: Callable[[int], str]):
        self.entry, self.spec, self._locate = entry, spec, locate
        self.table: Table = entry.tables["rows"]
        self.columns = [n for n in self.table.schema.names if n != "_at"]
        self.rows_read = int(entry.meta["rows_read"])

    def __len__(self) -> int:
        return len(self.table)

    def locate(self, i: int) -> str:
        """Where row ``i`` of the table came from (file:line, file:row n, or dataset row n)."""
        return self._locate(self.table.rows([i], ["_at"])[0]["_at"])

    def fetch(self, idxs: Sequence[int]) -> List[Dict[str, Any]]:
        return self.table.rows(idxs, self.columns)

    def column(self, name: str) -> pa.ChunkedArray:
        return self.table.column(name)

    @property
    def cache_note(self) -> str:
        m = self.entry.meta
        return f"cache built in {m['build_s']:.1f} s" if self.entry.built else "cache reused"


def open_source(spec: DataSpec, on_bad: OnBad, corpus: Any = None) -> Source:
    """Open the spec's data through the cache. ``on_bad(location, reason, count=1)`` gets every row left out
    (raise, or count); ``corpus`` (a :class:`~.corpus.Corpus`) checks the rows' document ids."""
    src = spec.source
    if src.hf:
        entry, locate = _open_hf(spec, on_bad)
    else:
        path = spec.resolve(src.path)
        assert path is not None
        if not path.exists():
            raise SpecError(f"{path}: data file not found")
        fmt = src.format or path.suffix.lstrip(".").lower()
        if fmt == "parquet":
            entry, locate = _open_parquet(spec, path, on_bad)
        else:
            entry, locate = _open_text(spec, path, fmt, on_bad, corpus)
    BadRows(**entry.meta["bad"]).replay(on_bad, locate)
    if "ids_bad" in entry.meta and corpus is not None:
        BadRows(**entry.meta["ids_bad"]).replay(on_bad, locate, suffix=f" {corpus.path}")
    return Source(entry, spec, locate)
