"""Data spec schema: one YAML file per dataset, parsed into typed dataclasses and validated up front.

Validation never reads the data source, so every shipped spec can be checked offline; errors name the spec file and
the offending key (with the valid keys), so a typo fails in milliseconds instead of hours into a run.
Tools that write training data (miner, synthesis, demo preparation) emit their spec with :func:`write_spec`, which
validates it as :func:`load_spec` will and writes what loads back unchanged: one schema, read and written here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..errors import UserError

TASKS = ("retrieval", "classification", "clustering", "sts")
LOCAL_FORMATS = ("jsonl", "csv", "tsv", "parquet")


class SpecError(UserError, ValueError):
    """A data spec or a row of its data is invalid; the message names the file, line (or row) and field."""

    kind = "data"


@dataclass
class SourceSpec:
    path: Optional[str] = None
    """Local file (.jsonl/.csv/.tsv/.parquet), relative to the spec file or absolute."""
    hf: Optional[str] = None
    """Hugging Face datasets id (or a local dataset folder) instead of ``path``."""
    config: Optional[str] = None
    """HF dataset configuration name (e.g. ``en``)."""
    split: str = "train"
    """HF split."""
    revision: Optional[str] = None
    """HF revision (commit or tag) to pin the data."""
    corpus: Optional[str] = None
    """Local file of documents (columns ``corpus_id``/``corpus_text``) that ``positive_ids``/``negative_ids`` refer to."""
    format: Optional[str] = None
    """Override the format guessed from the extension: jsonl, csv, tsv, parquet."""
    encoding: str = "utf-8"
    """Text encoding of local files (e.g. ``latin-1``)."""
    quoting: Optional[str] = None
    """CSV/TSV quote handling: ``minimal`` (csv default) or ``none`` (tsv default: TSV corpora contain bare quotes)."""


@dataclass
class FieldsSpec:
    """Column names in the source. A name may be a path: ``positive_passages.text`` takes ``text`` from every dict
    of a list column (Tevatron format), ``set.1`` indexes a list column."""

    query: Optional[str] = None
    positive: Optional[str] = None
    """Column with one positive text or a list of them (one is picked per use)."""
    negatives: Optional[str] = None
    """Column with hard-negative texts (a list, or one text)."""
    positive_ids: Optional[str] = None
    """Column with id(s) of positives in ``source.corpus``."""
    negative_ids: Optional[str] = None
    """Column with ids of hard negatives in ``source.corpus``."""
    positive_scores: Optional[str] = None
    """Column with teacher scores aligned with the positives column (a number or a list; score distillation)."""
    negative_scores: Optional[str] = None
    """Column with teacher scores aligned with the hard-negatives column (a number or a list)."""
    text: Optional[str] = None
    label: Optional[str] = None
    label_text: Optional[str] = None
    """Optional column holding the label's readable text (used by label-based conversion)."""
    text1: Optional[str] = None
    text2: Optional[str] = None
    score: Optional[str] = None
    id: Optional[str] = None
    """Optional row id column (only used in messages)."""
    instruction: Optional[str] = None
    """Optional column with a per-row task instruction (e.g. E5-style synthetic data); empty cells fall back to the
    spec's ``instruction``."""
    corpus_id: str = "id"
    corpus_text: str = "text"


@dataclass
class DataSpec:
    name: str
    task: str
    instruction: str
    source: SourceSpec = field(default_factory=SourceSpec)
    fields: FieldsSpec = field(default_factory=FieldsSpec)
    num_hard_negatives: Optional[int] = None
    """Cap on the row's own hard negatives used (the rest of the stage's count is filled with random documents)."""
    weight: float = 1.0
    max_examples: Optional[int] = None
    stages: List[str] = field(default_factory=list)
    """Stages allowed to use the spec; empty means any."""
    on_error: str = "raise"
    label_mode: str = "example"
    label_texts: Dict[str, str] = field(default_factory=dict)
    min_score: float = 4.0
    symmetric: Optional[bool] = None
    """Instruction on documents too; default True for sts, False otherwise."""
    description: str = ""
    """Free text (origin, license notes)."""
    provenance: Dict[str, Any] = field(default_factory=dict)
    """Free-form record of how the data was made (tool, teacher, mining rule, input files, counts), written by the
    tool that wrote the data; kept with the spec, never read by training."""
    path: str = ""
    """Where the spec was loaded from (set by load_spec, not a YAML key)."""

    @property
    def is_symmetric(self) -> bool:
        return self.task == "sts" if self.symmetric is None else bool(self.symmetric)

    def resolve(self, rel: Optional[str]) -> Optional[Path]:
        """A source path relative to the spec file."""
        if rel is None:
            return None
        p = Path(rel).expanduser()
        return p if p.is_absolute() or not self.path else Path(self.path).parent / p

    def to_dict(self) -> Dict[str, Any]:
        """The YAML mapping of this spec: keys at their default are left out, ``path`` is not a key."""
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("source", "fields"):
                value = {g.name: getattr(value, g.name) for g in dataclasses.fields(value)
                         if getattr(value, g.name) != _default(g)}
                if value or f.name == "source":  # source is required, even when (invalidly) empty
                    out[f.name] = value
            elif f.name != "path" and (_default(f) is dataclasses.MISSING or value != _default(f)):
                out[f.name] = value
        return out


def _default(f: "dataclasses.Field[Any]") -> Any:
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return f.default


REQUIRED_FIELDS = {
    "retrieval": (("query",), ("positive", "positive_ids")),
    "classification": (("text",), ("label",)),
    "clustering": (("text",), ("label",)),
    "sts": (("text1",), ("text2",), ("score",)),
}


def _build(cls: Any, raw: Any, where: str, file: str) -> Any:
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: '{where}' must be a mapping, got {type(raw).__name__}")
    internal = {"path"} if cls is DataSpec else set()  # DataSpec.path is set by load_spec, not by YAML
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in internal]
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise SpecError(f"{file}: unknown key '{where}{key}'.{hint} Valid keys: {', '.join(valid)}")
        kwargs[key] = value
    for f in dataclasses.fields(cls):
        if f.name in kwargs or f.name in internal:
            continue
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            raise SpecError(f"{file}: missing required key '{where}{f.name}'")
    return kwargs


def _check_type(file: str, key: str, value: Any, types: Any, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"{file}: '{key}' must be {types}, got a boolean")
    if not isinstance(value, types):
        raise SpecError(f"{file}: '{key}' has the wrong type ({type(value).__name__}: {value!r})")


def parse_spec(raw: Any, file: str) -> DataSpec:
    """Validate a spec mapping (no data is read)."""
    kw = _build(DataSpec, raw, "", file)
    src = SourceSpec(**_build(SourceSpec, kw.pop("source", {}) or {}, "source.", file))
    flds = FieldsSpec(**_build(FieldsSpec, kw.pop("fields", {}) or {}, "fields.", file))
    for f in dataclasses.fields(SourceSpec):
        _check_type(file, f"source.{f.name}", getattr(src, f.name), str)
    for f in dataclasses.fields(FieldsSpec):
        _check_type(file, f"fields.{f.name}", getattr(flds, f.name), str)
    spec = DataSpec(source=src, fields=flds, **kw)
    spec.path = file
    for key in ("name", "task", "instruction", "on_error", "label_mode", "description"):
        _check_type(file, key, getattr(spec, key), str, allow_none=False)
    _check_type(file, "weight", spec.weight, (int, float), allow_none=False)
    _check_type(file, "min_score", spec.min_score, (int, float), allow_none=False)
    _check_type(file, "num_hard_negatives", spec.num_hard_negatives, int)
    _check_type(file, "max_examples", spec.max_examples, int)
    _check_type(file, "symmetric", spec.symmetric, bool)
    _check_type(file, "stages", spec.stages, list, allow_none=False)
    _check_type(file, "label_texts", spec.label_texts, dict, allow_none=False)
    _check_type(file, "provenance", spec.provenance, dict, allow_none=False)
    spec.label_texts = {str(k): str(v) for k, v in spec.label_texts.items()}
    if not spec.name.strip():
        raise SpecError(f"{file}: 'name' is empty")
    if not spec.instruction.strip():
        raise SpecError(f"{file}: 'instruction' is empty (a one-sentence task definition is required)")
    if spec.task not in TASKS:
        raise SpecError(f"{file}: 'task' is {spec.task!r}; valid choices: {', '.join(TASKS)}")
    if spec.on_error not in ("raise", "skip"):
        raise SpecError(f"{file}: 'on_error' is {spec.on_error!r}; valid choices: raise, skip")
    if spec.label_mode not in ("example", "label"):
        raise SpecError(f"{file}: 'label_mode' is {spec.label_mode!r}; valid choices: example, label")
    if spec.weight <= 0:
        raise SpecError(f"{file}: 'weight' must be > 0, got {spec.weight}")
    if spec.max_examples is not None and spec.max_examples <= 0:
        raise SpecError(f"{file}: 'max_examples' must be > 0")
    if spec.num_hard_negatives is not None and spec.num_hard_negatives < 0:
        raise SpecError(f"{file}: 'num_hard_negatives' must be >= 0")
    if bool(src.path) == bool(src.hf):
        raise SpecError(f"{file}: set exactly one of 'source.path' or 'source.hf'")
    fmt = src.format or (Path(src.path).suffix.lstrip(".").lower() if src.path else None)
    if src.path and fmt not in LOCAL_FORMATS:
        raise SpecError(f"{file}: cannot tell the format of 'source.path' {src.path!r}; "
                        f"use one of {', '.join(LOCAL_FORMATS)} or set 'source.format'")
    if src.quoting not in (None, "minimal", "none"):
        raise SpecError(f"{file}: 'source.quoting' is {src.quoting!r}; valid choices: minimal, none")
    for group in REQUIRED_FIELDS[spec.task]:
        if not any(getattr(flds, g) for g in group):
            raise SpecError(f"{file}: task '{spec.task}' needs 'fields.{' or fields.'.join(group)}'")
    if (flds.positive_ids or flds.negative_ids) and not src.corpus:
        raise SpecError(f"{file}: 'fields.positive_ids'/'fields.negative_ids' need 'source.corpus'")
    if flds.positive_scores or flds.negative_scores:
        _check_scores(spec, file)
    return spec


def _check_scores(spec: DataSpec, file: str) -> None:
    f = spec.fields
    if spec.task != "retrieval":
        raise SpecError(f"{file}: 'fields.positive_scores'/'fields.negative_scores' are for task 'retrieval'")
    # a teacher distribution needs a score for the positive and for every negative
    if not (f.positive_scores and f.negative_scores):
        raise SpecError(f"{file}: set both 'fields.positive_scores' and 'fields.negative_scores' (or neither)")
    # scores align with one column: with texts and ids both set, the order of the merged list is ambiguous
    if bool(f.positive) == bool(f.positive_ids):
        raise SpecError(f"{file}: 'fields.positive_scores' needs exactly one of 'fields.positive' or "
                        f"'fields.positive_ids' (the column its scores align with)")
    if bool(f.negatives) == bool(f.negative_ids):
        raise SpecError(f"{file}: 'fields.negative_scores' needs exactly one of 'fields.negatives' or "
                        f"'fields.negative_ids' (the column its scores align with)")


def load_spec(path: str | Path) -> DataSpec:
    """Read and validate one spec YAML file (the data source is not touched)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(f"{p}: spec file not found") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{p}: invalid YAML: {e}") from None
    return parse_spec(raw, str(p))


def write_spec(spec: DataSpec, path: str | Path, *, comment: str = "") -> Path:
    """Write ``spec`` as YAML at ``path`` (``source.path``/``corpus`` relative to its folder, or absolute), with
    ``comment`` lines on top as ``#`` comments; returns the path.

    The text is validated as :func:`load_spec` will read it before anything is written (a bad spec raises
    :class:`SpecError` naming ``path`` and the key), must load back equal to ``spec``, and replaces any earlier file
    atomically, so an error never leaves a half-written or lost spec."""
    p = Path(path)
    head = "".join(f"# {line}".rstrip() + "\n" for line in comment.splitlines())
    text = head + yaml.safe_dump(spec.to_dict(), sort_keys=False, allow_unicode=True, width=120)
    back = parse_spec(yaml.safe_load(text), str(p))
    if dataclasses.replace(back, path="") != dataclasses.replace(spec, path=""):
        # a writer bug (a value YAML or the parser changes, e.g. a tuple or int label keys), not a user error
        raise ValueError(f"{p}: spec does not load back unchanged: {back.to_dict()} != {spec.to_dict()}")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, p)
    return p
