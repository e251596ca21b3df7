"""The training model: the Hugging Face ``NVEmbedModel`` (:mod:`nvembed.hf`) wrapped with what only training adds.

Why a wrapper and not a subclass: the ``NVEmbedModel`` inside (``Embedder.model``) stays exactly the class an export
ships, with the config an export writes, so export is a LoRA merge plus ``save_pretrained``-style files, and
``encode`` is the very method users call. The wrapper holds the training ``ModelConfig``, length bucketing around
``forward``, and the training weight files. Everything else (backbone loading, LoRA, compile, gradient
checkpointing) is applied to the parts before they are assembled, in :func:`build_embedder`.

Training checkpoints hold only what trains (LoRA + head, or everything for full fine-tuning) in safetensors, next to
the model config, so ``init_from`` rebuilds the same model and loads them. Checkpoints of the earlier layout
(``backbone.*`` / ``pooler.head.*`` keys) are renamed on load by :func:`upgrade_legacy_keys`, the one place that
knows the old names.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig
from ..hf.configuration_nvembed import NVEmbedConfig
from ..hf.modeling_nvembed import NVEmbedModel
from ..rundir import MODEL_CONFIG, WEIGHTS  # noqa: F401  (file names of the run-folder layout; re-exported)
from .backbone import DTYPES, apply_lora, compile_layers, load_backbone, load_tokenizer
from .bucketing import bucketed_forward
from .nvembed_layout import CheckpointLayoutError, is_nvembed_checkpoint, load_head

# backbone config keys that describe where it came from rather than what it is
_PROVENANCE_KEYS = ("_name_or_path", "_model_name_or_path", "transformers_version", "auto_map", "quantization_config",
                    "gguf_file", "_commit_hash", "architectures", "torch_dtype")
# weight-name prefixes of checkpoints written before the model was one NVEmbedModel (old -> new)
_LEGACY_PREFIXES = (("backbone.", "model.embedding_model."), ("pooler.head.", "model.latent_attention_model."))


def hf_config(cfg: ModelConfig, backbone_config) -> NVEmbedConfig:
    """The one mapping from the training ``ModelConfig`` (+ the built backbone's config) to ``NVEmbedConfig``: the
    config the model runs with and that an export writes (export only sets ``max_seq_length`` and ``dtype``)."""
    text = backbone_config.to_dict()
    for k in _PROVENANCE_KEYS:
        text.pop(k, None)
    text.update(model_type=backbone_config.model_type, is_causal=not cfg.bidirectional, dtype=cfg.dtype)
    p = cfg.pooling
    config = NVEmbedConfig(
        text_config=text, bidirectional=cfg.bidirectional, pooling_mode=p.mode, num_latents=p.num_latents,
        num_heads=p.num_heads, head_dim=p.head_dim, latent_dim=p.latent_dim, ff_mult=p.ff_mult,
        normalize=p.normalize, exclude_instruction=p.exclude_instruction, query_template=cfg.query_template,
        add_eos=cfg.add_eos, padding_side=cfg.padding_side, dtype=cfg.dtype)
    config.architectures = ["NVEmbedModel"]
    return config


def upgrade_legacy_keys(state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with weight names of the earlier layout (``backbone.*``, ``pooler.head.*``) renamed to this one."""
    out = {}
    for k, v in state.items():
        for old, new in _LEGACY_PREFIXES:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out


class Embedder(nn.Module):
    def __init__(self, model: NVEmbedModel, cfg: ModelConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.fixed_bucket_count = False
        """Always split into ``min(length_buckets, rows)`` sub-batches: set under ZeRO-3, where every backbone
        call is a collective weight gather and all ranks must make the same number of calls."""
        # DeepSpeed's resume calls load_state_dict itself: old checkpoints' names are upgraded there too
        self._register_load_state_dict_pre_hook(_upgrade_hook, with_module=True)

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        self.model.tokenizer = tok

    @property
    def backbone(self) -> nn.Module:
        """The transformers backbone, peft-wrapped when LoRA is on."""
        return self.model.embedding_model

    @property
    def base_model(self) -> nn.Module:
        """The transformers backbone without the peft wrapper."""
        m = self.backbone
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    @property
    def hidden_size(self) -> int:
        return self.base_model.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        feats = {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}
        return bucketed_forward(self.model, feats, self.cfg.length_buckets, self.cfg.length_bucket_overhead,
                                exact=self.fixed_bucket_count)

    def features(self, texts: Sequence[str], instructions: Optional[Sequence[Optional[str]]] = None,
                 max_length: int = 512) -> Dict[str, torch.Tensor]:
        prompts = [self.model.build_prompt(i) for i in (instructions or [None] * len(texts))]
        return self.model.tokenize(texts, prompts, max_length=max_length)

    def encode(self, texts: Sequence[str], instruction: Optional[str] = None, batch_size: int = 32,
               max_length: int = 512, show_progress: bool = False,
               autocast_dtype: Optional[torch.dtype] = None) -> np.ndarray:
        """``NVEmbedModel.encode`` (the exported model's own path) as a float32 numpy array: a query when
        ``instruction`` is given (a bare task or NV-Embed's whole prefix); ``autocast_dtype`` as there (default:
        the weights' dtype)."""
        out = self.model.encode(list(texts), instruction=instruction or "", max_length=max_length,
                                batch_size=batch_size, convert_to_numpy=True, show_progress=show_progress,
                                autocast_dtype=autocast_dtype)
        return np.asarray(out, dtype=np.float32)

    # ---- weights -------------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k in names}

    def save_weights(self, folder: str, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        os.makedirs(folder, exist_ok=True)
        save_file(state if state is not None else self.trainable_state_dict(), os.path.join(folder, WEIGHTS))
        from ..config import to_dict
        with open(os.path.join(folder, MODEL_CONFIG), "w") as f:
            json.dump(to_dict(self.cfg), f, indent=2)

    def load_weights(self, folder: str, strict: bool = True) -> None:
        path = os.path.join(folder, WEIGHTS)
        if is_nvembed_checkpoint(folder):  # its weights are a whole model (decoder + head), not a training state
            raise CheckpointLayoutError(f"init_from={folder} is a checkpoint in NV-Embed's layout: start from it with "
                                        f"model.name_or_path={folder} (decoder and latent-attention head are loaded)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_from: no {WEIGHTS} in {folder} (expected an nvembed stage/checkpoint folder)")
        state = upgrade_legacy_keys(load_file(path))
        own = self.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown and strict:
            raise ValueError(f"init_from {folder}: {len(unknown)} weights do not fit this model "
                             f"(e.g. {unknown[:3]}); was it trained with a different model config?")
        mismatch = [k for k in state if k in own and own[k].shape != state[k].shape]
        if mismatch:
            raise ValueError(f"init_from {folder}: shape mismatch for {mismatch[:3]}")
        self.load_state_dict(state, strict=False)


def _upgrade_hook(module, state_dict, prefix, *args) -> None:
    """load_state_dict pre-hook: rename keys of the earlier layout in place (see :func:`upgrade_legacy_keys`)."""
    mine = {k: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for k, v in upgrade_legacy_keys({k[len(prefix):]: v for k, v in mine.items()}).items():
        state_dict[prefix + k] = v


def build_embedder(cfg: ModelConfig, seed: Optional[int] = None) -> Embedder:
    """Tokenizer + backbone (+ LoRA) + pooling head, built from the model config (random draws in this order:
    backbone, LoRA, head)."""
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = load_tokenizer(cfg)
    backbone = load_backbone(cfg, vocab_size=len(tokenizer))
    config = hf_config(cfg, backbone.config)
    backbone = apply_lora(backbone, cfg)
    if not cfg.lora.enabled:
        for p in backbone.parameters():
            p.requires_grad_(True)
    model = NVEmbedModel(config, embedding_model=backbone)
    head = model.latent_attention_model
    if head is not None:
        head.to(DTYPES[cfg.dtype])
        if cfg.pooling.zero_init_residual:  # starts as mean pooling; the zeroed branches still get gradients
            nn.init.zeros_(head.to_out.weight)
            nn.init.zeros_(head.ff[2].weight)
            nn.init.zeros_(head.ff[2].bias)
    model.tokenizer = tokenizer
    if cfg.random_init is None and not cfg.gguf_file and is_nvembed_checkpoint(cfg.name_or_path):
        load_head(model, cfg.name_or_path, cfg)  # NV-Embed's trained latent-attention head, not a fresh one
    embedder = Embedder(model, cfg)
    if cfg.compile:  # after LoRA, so its modules are inside the compiled layers
        compile_layers(embedder.base_model)
    return embedder
