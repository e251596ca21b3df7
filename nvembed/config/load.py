"""From a composed recipe to a checked :class:`RunConfig`: OmegaConf merge and type check, unknown keys (with the
closest valid one), choices, ranges, cross-key checks; ``describe`` for ``--help-config``.

Nested types come from the schema's annotations (``typing.get_type_hints``): a dataclass field, a
``Dict[str, <dataclass>]`` (one level of names, e.g. ``stage_defs.<name>``) or a ``List[<dataclass>]``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from ..errors import UserError
from .schema import CHOICES, ModelConfig, RunConfig, StageConfig


class ConfigError(UserError, ValueError):
    """A recipe or an override is invalid; the message names the key and what would be valid."""

    kind = "config"


@functools.lru_cache(maxsize=None)
def _hints(schema: type) -> Dict[str, Any]:
    return typing.get_type_hints(schema)


def _below(tp: Any) -> Tuple[Optional[type], str]:
    """The dataclass whose fields a key of type ``tp`` holds below it, and how its keys are reached: ``"."``
    (a dataclass), ``".<name>."`` (a dict of them: one key of a free name first) or ``"[]."`` (a list of them).
    (None, "") for anything else: a leaf, or free-form like ``model.random_init``."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Union and len(args) == 1:  # Optional[X]
        tp, args = args[0], list(typing.get_args(args[0]))
    if dataclasses.is_dataclass(tp):
        return tp, "."
    origin = typing.get_origin(tp)
    if origin is dict and len(args) == 2 and dataclasses.is_dataclass(args[1]):
        return args[1], ".<name>."
    if origin is list and len(args) == 1 and dataclasses.is_dataclass(args[0]):
        return args[0], "[]."
    return None, ""


def check_key(dotted: str) -> None:
    """Raise ConfigError if ``dotted`` (e.g. ``stage_defs.stage1.lr``) is not a key of the schema."""
    parts = dotted.split(".")
    t: Optional[type] = RunConfig
    skip_name = False
    for i, part in enumerate(parts):
        if skip_name:  # the free name of a dict entry (``stage1``) or a list index
            skip_name = False
            continue
        if t is None:
            return  # free-form (e.g. model.random_init.*)
        valid = [f.name for f in dataclasses.fields(t)]
        if part not in valid:
            where = ".".join(parts[:i]) or "<top level>"
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{dotted}': '{part}' is not a field of {where}.{hint} "
                              f"Valid keys there: {', '.join(valid)}")
        t, how = _below(_hints(t)[part])
        skip_name = how != "."


def _walk_keys(node: Any, prefix: str = "") -> List[str]:
    out = []
    if isinstance(node, (dict, DictConfig)):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.append(key)
            out.extend(_walk_keys(v, key + "."))
    return out


def _check_choices(cfg: RunConfig) -> None:
    for pattern, choices in CHOICES.items():
        parts = pattern.split(".")

        # walks the dataclasses themselves: converting the config back to OmegaConf would double validate()'s time
        def visit(node: Any, i: int, path: List[str]) -> None:
            if i == len(parts):
                if node not in choices:
                    raise ConfigError(f"Invalid value {node!r} for '{'.'.join(path)}'; "
                                      f"valid choices: {', '.join(choices)}")
                return
            if parts[i] == "*" and isinstance(node, dict):
                for k, v in node.items():
                    visit(v, i + 1, path + [k])
            elif dataclasses.is_dataclass(node) and hasattr(node, parts[i]):
                visit(getattr(node, parts[i]), i + 1, path + [parts[i]])

        visit(cfg, 0, [])


def _first_line(e: Exception) -> str:
    """OmegaConf's message without the full_key/object_type lines it appends (errors are one line)."""
    return (str(getattr(e, "msg", "") or e).strip().splitlines() or [""])[0]


def _check_ranges(node: Any, prefix: str = "") -> None:
    """Every field with a :class:`Range` in its metadata, recursively (stage definitions included)."""
    for f in dataclasses.fields(node):
        value, key = getattr(node, f.name), f"{prefix}{f.name}"
        rng = f.metadata.get("range")
        if rng is not None:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            if any(v is not None and not rng.ok(v) for v in items):
                what = f"list values {rng}" if isinstance(value, (list, tuple)) else f"be {rng}"
                note = f" ({rng.note})" if rng.note else ""
                raise ConfigError(f"'{key}' must {what}{note}, got {value!r}")
        if dataclasses.is_dataclass(value):
            _check_ranges(value, key + ".")
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    _check_ranges(v, f"{key}.{k}.")


def _check_stage(name: str, st: StageConfig) -> None:
    """Checks across keys of one stage that is going to run."""
    key = f"stage_defs.{name}"
    if not st.datasets:
        raise ConfigError(f"'{key}.datasets' is empty: a stage needs at least one data spec")
    if not st.in_batch_negatives and st.num_hard_negatives == 0:
        raise ConfigError(f"'{key}' has no negatives at all (in_batch_negatives=false and num_hard_negatives=0): "
                          f"the contrastive loss would be constant; set '{key}.num_hard_negatives' >= 1")


@functools.lru_cache(maxsize=1)
def _schema() -> DictConfig:
    return OmegaConf.structured(RunConfig)


def validate(raw: Any) -> RunConfig:
    """Turn a plain/OmegaConf mapping (a composed recipe) into a checked :class:`RunConfig`."""
    if isinstance(raw, (DictConfig, ListConfig)):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = dict(raw or {})
    raw.pop("hydra", None)
    for key in _walk_keys(raw):
        check_key(key)
    try:
        merged = OmegaConf.merge(_schema(), raw)  # merge copies its first argument: the cached schema stays as is
    except ValidationError as e:  # wrong type
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"Invalid value for config key '{key}': {_first_line(e)}") from None
    except ConfigKeyError as e:
        raise ConfigError(f"Unknown config key: {_first_line(e)}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"Invalid config: {_first_line(e)}") from None
    try:
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:  # e.g. a mandatory value (???) left unset
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"Invalid value for config key '{key}': {_first_line(e)}") from None
    _check_choices(cfg)
    _check_ranges(cfg)
    for name in cfg.stages:
        if name not in cfg.stage_defs:
            raise ConfigError(f"'stages' names '{name}', which is not defined under 'stage_defs' "
                              f"(defined: {', '.join(cfg.stage_defs) or 'none'})")
        _check_stage(name, cfg.stage_defs[name])
    excluded = {x.spec: x for x in cfg.excluded_datasets}
    for x in cfg.excluded_datasets:
        if not x.reason.strip():
            raise ConfigError(f"'excluded_datasets': {x.spec} needs a 'reason' (shown by the dry run)")
    for name in cfg.stages:
        for sp in cfg.stage_defs[name].datasets:
            if sp in excluded:
                raise ConfigError(f"'stage_defs.{name}.datasets' lists {sp}, which 'excluded_datasets' leaves out "
                                  f"({excluded[sp].reason}); remove it from one of the two")
    m = cfg.model
    if not (m.name_or_path or m.random_init or m.gguf_file):
        raise ConfigError("Set 'model.name_or_path' (hub id or folder), 'model.gguf_file', or 'model.random_init'")
    if m.random_init is not None and "model_type" not in m.random_init:
        raise ConfigError("'model.random_init' needs 'model_type' (e.g. llama, mistral, qwen2)")
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Any config dataclass (a :class:`RunConfig`, a :class:`ModelConfig` ...) as plain dicts and lists."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def model_from_dict(d: Dict[str, Any]) -> ModelConfig:
    """The inverse of ``to_dict`` for the model section saved beside the weights (``model_config.json``)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), d))  # type: ignore[return-value]


def _field_docs(schema: type) -> Dict[str, str]:
    """Each field's docstring: the string literal right below it in the class body."""
    import ast
    import inspect
    import textwrap

    docs: Dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(schema))).body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if (isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr)
                and isinstance(getattr(b, "value", None), ast.Constant)):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    return docs


def describe(schema: type = RunConfig, prefix: str = "") -> str:
    """Every key with its type, default and docstring (for ``--help-config``)."""
    docs = _field_docs(schema)
    lines = []
    for f in dataclasses.fields(schema):
        rng = f.metadata.get("range")
        allowed = f" [{rng}{'; ' + rng.note if rng.note else ''}]" if rng is not None else ""
        lines.append(f"{prefix}{f.name} ({f.type}){allowed}: {docs.get(f.name, '')}")
        inner, how = _below(_hints(schema)[f.name])
        if inner is not None:
            lines.append(describe(inner, prefix + f.name + how))
    return "\n".join(lines)
