"""Write an :class:`~nvembed.model.embedder.Embedder` as a self-contained Hugging Face model folder.

The Embedder's ``model`` already is the ``NVEmbedModel`` users load, with its config: export merges LoRA (into a new
state dict; the live model is not touched), saves config and weights as ``save_pretrained`` lays them out
(safetensors, sharded above ``max_shard_size``), the tokenizer, and copies the files of :mod:`nvembed.hf` as the
folder's remote code. The folder loads without ``nvembed`` installed:

* ``transformers.AutoModel.from_pretrained(DIR, trust_remote_code=True)`` -> ``NVEmbedModel`` (``encode``/``forward``),
  from ``config.json`` (``auto_map`` -> ``configuration_nvembed`` / ``modeling_nvembed``);
* ``sentence_transformers.SentenceTransformer(DIR, trust_remote_code=True)`` via ``modules.json`` -> ``st_nvembed``.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import Dict, Optional

import torch

from .. import hf as hf_package
from . import AUTO_MAP  # defined in the torch-free package module, for is_export

ST_MODULE = "st_nvembed.NVEmbedSTModule"
DEFAULT_QUERY_INSTRUCTION = "Given a question, retrieve passages that answer the question"
BACKBONE = "embedding_model."  # NVEmbedModel's attribute holding the (peft-wrapped in training) decoder


def _unwrap(embedder):
    """The nvembed Embedder under DDP/accelerate/DeepSpeed wrappers (``.module``)."""
    from ..model.embedder import Embedder

    while not isinstance(embedder, Embedder) and hasattr(embedder, "module"):
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
    """All weights of the exported ``NVEmbedModel`` (its own state-dict names): the backbone with LoRA merged, every
    other part as it is; on CPU, contiguous."""
    model = _unwrap(embedder).model
    out = {k: v for k, v in model.state_dict().items() if not k.startswith(BACKBONE)}
    out.update({BACKBONE + k: v for k, v in merged_backbone_state(model.embedding_model).items()})
    out = {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    # ZeRO-1/2 keep trainable parameters as views into one flat buffer, which safetensors refuses to save
    return {k: v.clone() if v.untyped_storage().nbytes() > v.numel() * v.element_size() else v
            for k, v in out.items()}


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


def export_config(embedder, max_seq_length: int, dtype: Optional[str] = None):
    """The model's own ``NVEmbedConfig`` with what only the export decides: ``max_seq_length``, the saved weights'
    dtype and the ``auto_map`` naming the copied files."""
    config = copy.deepcopy(_unwrap(embedder).model.config)
    config.max_seq_length = int(max_seq_length)
    if dtype:
        config.dtype = dtype
        config.text_config.dtype = dtype
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
    export_config(emb, max_seq_length, dtype).save_pretrained(folder)
    for name in hf_package.FILES:
        shutil.copyfile(os.path.join(hf_package.DIR, name), os.path.join(folder, name))
    save_tokenizer(emb, folder)
    write_sentence_transformers_files(folder, emb.cfg.query_template, max_seq_length)
    return folder
