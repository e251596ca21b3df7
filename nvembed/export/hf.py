"""Write an :class:`~nvembed.model.embedder.Embedder` as a self-contained Hugging Face model folder.

The folder loads without ``nvembed`` installed:

* ``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)`` -> ``NVEmbedModel`` (``encode``/``forward``),
  from ``config.json`` (``auto_map`` -> ``configuration_nvembed`` / ``modeling_nvembed`` copied into the folder);
* ``sentence_transformers.SentenceTransformer(DIR, trust_remote_code=True)`` via ``modules.json`` -> ``st_nvembed``.

Weights: the backbone with LoRA merged (computed from peft's ``get_delta_weight`` into a new state dict; the live
model is not touched) under ``embedding_model.``, the latent-attention head under ``latent_attention_model.``, in
safetensors (sharded above ``max_shard_size``).
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional

import torch

from . import AUTO_MAP  # defined in the torch-free package module, for is_export

REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_code")
REMOTE_FILES = ("configuration_nvembed.py", "modeling_nvembed.py", "st_nvembed.py")
ST_MODULE = "st_nvembed.NVEmbedSTModule"
DEFAULT_QUERY_INSTRUCTION = "Given a question, retrieve passages that answer the question"

# backbone config keys that describe where it came from rather than what it is
_DROP_BACKBONE_KEYS = ("_name_or_path", "_model_name_or_path", "transformers_version", "auto_map", "quantization_config", "gguf_file",
                       "_commit_hash", "architectures")


def _unwrap(embedder):
    """The nvembed Embedder under DDP/accelerate/DeepSpeed wrappers (``.module``)."""
    while not hasattr(embedder, "pooler") and hasattr(embedder, "module"):
        embedder = embedder.module
    return embedder


def merged_backbone_state(backbone: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """State dict of the plain transformers backbone with every active LoRA adapter merged into its base weights.

    Keys are those of the unwrapped model (``layers.0.self_attn.q_proj.weight``), i.e. what
    ``peft.merge_and_unload().state_dict()`` gives, but without modifying (or copying) the live model.
    """
    base = backbone.get_base_model() if hasattr(backbone, "get_base_model") else backbone
    state = dict(base.state_dict())
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft absent: nothing can be wrapped
        LoraLayer = ()
    for name, module in base.named_modules():
        if not (LoraLayer and isinstance(module, LoraLayer)):
            continue
        prefix = f"{name}." if name else ""
        for k in [k for k in state if k.startswith(prefix)]:
            del state[k]
        layer = module.get_base_layer()
        layer_state = {k: v.detach() for k, v in layer.state_dict().items()}
        weight = layer_state["weight"]
        if not getattr(module, "merged", False):
            merged = weight.float()
            for adapter in module.active_adapters:
                known = set(getattr(module, "lora_A", {}).keys()) | set(getattr(module, "lora_embedding_A", {}).keys())
                if adapter in known:
                    merged = merged + module.get_delta_weight(adapter).detach().float().to(merged.device)
            weight = merged.to(weight.dtype)
        layer_state["weight"] = weight
        for k, v in layer_state.items():
            state[prefix + k] = v
    return state


def export_state_dict(embedder) -> Dict[str, torch.Tensor]:
    """All weights of the exported ``NVEmbedModel``: merged backbone + pooling head, on CPU, contiguous."""
    emb = _unwrap(embedder)
    out: Dict[str, torch.Tensor] = {}
    for k, v in merged_backbone_state(emb.backbone).items():
        out[f"embedding_model.{k}"] = v
    head = getattr(emb.pooler, "head", None)
    if emb.pooler.mode == "latent_attention":
        for k, v in head.state_dict().items():
            out[f"latent_attention_model.{k}"] = v.detach()
    out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    # ZeRO-1/2 keep trainable parameters as views into one flat buffer, which safetensors refuses to save
    return {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
            for k, v in out.items()}


def backbone_config_dict(embedder, dtype: Optional[str] = None) -> Dict[str, Any]:
    """The backbone's transformers config (as trained: trimmed layers, bidirectional flag) as a plain dict."""
    emb = _unwrap(embedder)
    config = emb.base_model.config
    d = config.to_dict()
    for k in _DROP_BACKBONE_KEYS:
        d.pop(k, None)
    d["model_type"] = config.model_type
    d["is_causal"] = not emb.cfg.bidirectional
    d["dtype"] = dtype or emb.cfg.dtype
    d.pop("torch_dtype", None)
    return d


def default_max_seq_length(embedder, run_cfg=None) -> int:
    """512 (nvembed's ``encode`` default) or more when a stage trained longer texts, capped by the backbone's
    position limit."""
    length = 512
    stage_defs = getattr(run_cfg, "stage_defs", None) or {}
    for st in stage_defs.values():
        length = max(length, int(getattr(st, "query_max_length", 0) or 0), int(getattr(st, "doc_max_length", 0) or 0))
    limit = getattr(_unwrap(embedder).base_model.config, "max_position_embeddings", None)
    return int(min(length, limit)) if limit else length


def _state_dtype(state: Dict[str, torch.Tensor]) -> Optional[str]:
    """dtype name of the saved floating-point weights (what was trained, e.g. bf16 under DeepSpeed)."""
    for v in state.values():
        if v.is_floating_point():
            return str(v.dtype).replace("torch.", "")
    return None


def build_config(embedder, max_seq_length: int, dtype: Optional[str] = None):
    """The exported ``NVEmbedConfig`` (the class from ``remote_code``, the very file copied into the folder)."""
    from .remote_code.configuration_nvembed import NVEmbedConfig

    cfg = _unwrap(embedder).cfg
    p = cfg.pooling
    dtype = dtype or cfg.dtype
    config = NVEmbedConfig(
        text_config=backbone_config_dict(embedder, dtype), bidirectional=cfg.bidirectional, pooling_mode=p.mode,
        num_latents=p.num_latents, num_heads=p.num_heads, head_dim=p.head_dim, latent_dim=p.latent_dim,
        ff_mult=p.ff_mult, normalize=p.normalize, exclude_instruction=p.exclude_instruction,
        query_template=cfg.query_template, add_eos=cfg.add_eos, padding_side=cfg.padding_side,
        max_seq_length=max_seq_length, dtype=dtype)
    config.architectures = ["NVEmbedModel"]
    config.auto_map = dict(AUTO_MAP)
    return config


def save_tokenizer(embedder, folder: str) -> None:
    emb = _unwrap(embedder)
    tok = emb.tokenizer
    pad_before, side_before = tok.pad_token, tok.padding_side
    try:
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        tok.padding_side = emb.cfg.padding_side
        tok.save_pretrained(folder)
    finally:  # leave the live tokenizer as it was
        if pad_before is None:
            tok.pad_token = None
        tok.padding_side = side_before
    path = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(path):  # load-time flags of this machine must not travel (e.g. to the Hub)
        with open(path) as f:
            tc = json.load(f)
        for k in ("is_local", "local_files_only", "_commit_hash", "token", "use_auth_token", "cache_dir"):
            tc.pop(k, None)
        tc["padding_side"] = emb.cfg.padding_side
        with open(path, "w") as f:
            json.dump(tc, f, indent=2, ensure_ascii=False)


def write_sentence_transformers_files(folder: str, query_template: str, max_seq_length: int) -> None:
    from . import _versions

    with open(os.path.join(folder, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": ST_MODULE}], f, indent=2)
    with open(os.path.join(folder, "sentence_bert_config.json"), "w") as f:
        json.dump({"max_seq_length": max_seq_length}, f, indent=2)
    st_config = {
        "model_type": "SentenceTransformer",
        "__version__": _versions(),
        # encode_query() uses "query" by default; other tasks: prompt=query_template.format(instruction=...)
        "prompts": {"query": query_template.format(instruction=DEFAULT_QUERY_INSTRUCTION), "document": ""},
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    with open(os.path.join(folder, "config_sentence_transformers.json"), "w") as f:
        json.dump(st_config, f, indent=2)


def export_hf(embedder, folder: str, *, max_seq_length: Optional[int] = None, run_cfg=None,
              max_shard_size: str = "5GB") -> str:
    """Weights, configs, remote code and tokenizer (no model card) into ``folder``; returns ``folder``."""
    from huggingface_hub import save_torch_state_dict

    emb = _unwrap(embedder)
    os.makedirs(folder, exist_ok=True)
    max_seq_length = int(max_seq_length or default_max_seq_length(emb, run_cfg))
    for name in os.listdir(folder):  # a re-export must not leave shards of an older, bigger export behind
        if name.startswith("model") and (name.endswith(".safetensors") or name.endswith(".safetensors.index.json")):
            os.remove(os.path.join(folder, name))
    state = export_state_dict(emb)
    dtype = _state_dtype(state)
    save_torch_state_dict(state, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    del state
    config = build_config(emb, max_seq_length, dtype)
    config.save_pretrained(folder)
    for name in REMOTE_FILES:
        shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(folder, name))
    save_tokenizer(emb, folder)
    write_sentence_transformers_files(folder, emb.cfg.query_template, max_seq_length)
    return folder
