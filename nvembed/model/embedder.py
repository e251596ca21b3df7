"""The embedding model: backbone (optionally LoRA-wrapped) + pooling head, and its weight files.

Training checkpoints hold only what trains (LoRA + head, or everything for full fine-tuning) in safetensors, next to
the model config, so ``init_from`` rebuilds the same model and loads them. ``export`` writes merged weights for users.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ModelConfig
from .backbone import DTYPES, apply_lora, compile_layers, load_backbone, load_tokenizer
from .bucketing import bucketed_forward
from .inputs import build_prompt, tokenize
from .nvembed_layout import CheckpointLayoutError, is_nvembed_checkpoint, load_head
from .pooling import Pooler

WEIGHTS = "model.safetensors"
MODEL_CONFIG = "nvembed_model.json"


class Embedder(nn.Module):
    def __init__(self, backbone: nn.Module, pooler: Pooler, tokenizer, cfg: ModelConfig):
        super().__init__()
        self.backbone = backbone
        self.pooler = pooler
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.fixed_bucket_count = False
        """Always split into ``min(length_buckets, rows)`` sub-batches: set under ZeRO-3, where every backbone
        call is a collective weight gather and all ranks must make the same number of calls."""

    @property
    def hidden_size(self) -> int:
        return self.base_model.config.hidden_size

    @property
    def base_model(self) -> nn.Module:
        """The transformers backbone without the peft wrapper."""
        m = self.backbone
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        feats = {"input_ids": input_ids, "attention_mask": attention_mask, "pool_mask": pool_mask}
        return bucketed_forward(self._embed, feats, self.cfg.length_buckets, self.cfg.length_bucket_overhead,
                                exact=self.fixed_bucket_count)

    def _embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        # positions count real tokens only: with left padding a text then gets the same embedding in any batch
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        # use_cache=False: an embedder never decodes, and a KV cache would hold every layer's keys and values
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=False)
        return self.pooler(out.last_hidden_state, attention_mask, pool_mask)

    def features(self, texts: Sequence[str], instructions: Optional[Sequence[Optional[str]]] = None,
                 max_length: int = 512) -> Dict[str, torch.Tensor]:
        prompts = [build_prompt(i, self.cfg.query_template) for i in (instructions or [None] * len(texts))]
        return tokenize(self.tokenizer, texts, prompts, max_length=max_length, add_eos=self.cfg.add_eos,
                        exclude_prompt=self.cfg.pooling.exclude_instruction)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], instruction: Optional[str] = None, batch_size: int = 32,
               max_length: int = 512, show_progress: bool = False) -> np.ndarray:
        """Embed texts (a query when ``instruction`` is given: a bare task, wrapped in ``query_template``, or the
        whole prefix as NV-Embed takes it, used as given); float32, L2-normalised if configured. ``max_length``
        bounds the whole row, prompt included."""
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        # sort by length so batches pad little; restore order at the end
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out: List[np.ndarray] = [None] * len(texts)  # type: ignore[list-item]
        it = range(0, len(order), batch_size)
        if show_progress:
            from tqdm.auto import tqdm
            it = tqdm(it, desc="encode", leave=False)
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_bf16_ok(device))
        for s in it:
            idx = order[s:s + batch_size]
            feats = self.features([texts[i] for i in idx], [instruction] * len(idx), max_length)
            with autocast:
                emb = self(**{k: v.to(device) for k, v in feats.items()})
            for j, i in enumerate(idx):
                out[i] = emb[j].float().cpu().numpy()
        self.train(was_training)
        return np.stack(out) if out else np.zeros((0, self.hidden_size), np.float32)

    # ---- weights -------------------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> Dict[str, torch.Tensor]:
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items() if k in names}

    def save_weights(self, folder: str, state: Optional[Dict[str, torch.Tensor]] = None) -> None:
        os.makedirs(folder, exist_ok=True)
        save_file(state if state is not None else self.trainable_state_dict(), os.path.join(folder, WEIGHTS))
        from ..config import to_dict_model
        with open(os.path.join(folder, MODEL_CONFIG), "w") as f:
            json.dump(to_dict_model(self.cfg), f, indent=2)

    def load_weights(self, folder: str, strict: bool = True) -> None:
        path = os.path.join(folder, WEIGHTS)
        if is_nvembed_checkpoint(folder):  # its weights are a whole model (decoder + head), not a training state
            raise CheckpointLayoutError(f"init_from={folder} is a checkpoint in NV-Embed's layout: start from it with "
                                        f"model.name_or_path={folder} (decoder and latent-attention head are loaded)")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"init_from: no {WEIGHTS} in {folder} (expected an nvembed stage/checkpoint folder)")
        state = load_file(path)
        own = self.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown and strict:
            raise ValueError(f"init_from {folder}: {len(unknown)} weights do not fit this model "
                             f"(e.g. {unknown[:3]}); was it trained with a different model config?")
        mismatch = [k for k in state if k in own and own[k].shape != state[k].shape]
        if mismatch:
            raise ValueError(f"init_from {folder}: shape mismatch for {mismatch[:3]}")
        self.load_state_dict(state, strict=False)


def _bf16_ok(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return os.environ.get("NVEMBED_ENCODE_BF16", "0") == "1"


def build_embedder(cfg: ModelConfig, seed: Optional[int] = None) -> Embedder:
    """Tokenizer + backbone (+ LoRA) + pooling head, built from the model config."""
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer = load_tokenizer(cfg)
    backbone = load_backbone(cfg, vocab_size=len(tokenizer))
    backbone = apply_lora(backbone, cfg)
    hidden = backbone.config.hidden_size
    pooler = Pooler(hidden, cfg.pooling).to(DTYPES[cfg.dtype])
    if cfg.random_init is None and not cfg.gguf_file and is_nvembed_checkpoint(cfg.name_or_path):
        load_head(pooler, cfg.name_or_path, cfg)  # NV-Embed's trained latent-attention head, not a fresh one
    if not cfg.lora.enabled:
        for p in backbone.parameters():
            p.requires_grad_(True)
    embedder = Embedder(backbone, pooler, tokenizer, cfg)
    if cfg.compile:  # after LoRA, so its modules are inside the compiled layers
        compile_layers(embedder.base_model)
    return embedder
