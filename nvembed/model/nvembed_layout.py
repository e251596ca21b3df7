"""Start from a published NV-Embed checkpoint (nvidia/NV-Embed-v1, -v2, or a folder saved in their layout).

``model.name_or_path`` may point at such a folder: the decoder becomes the backbone and the latent-attention head
becomes the pooling head, both trainable as usual (LoRA on the backbone, head fully). Their layout
(``configuration_nvembed.py`` / ``modeling_nvembed.py`` of the Hub repositories):

* ``config.json``: ``model_type: nvembed``, ``text_config`` (a Mistral config; ``model_type: bidir_mistral``, read
  here as ``mistral``), ``latent_attention_config`` (``num_latents_value`` 512, ``num_cross_heads`` 8,
  ``hidden_dim`` / ``latent_dim`` / ``cross_dim_head`` 4096: their defaults where a key is absent, as in v2).
* ``model.safetensors`` or shards listed in ``model.safetensors.index.json``; tokenizer files beside them.

Key map, NV-Embed -> nvembed's ``NVEmbedModel`` (d = decoder hidden size, r latents, h heads of width dh; ``L.``
stands for ``latent_attention_model.`` and ``B.`` for ``L.cross_attend_blocks.``):

* ``embedding_model.<k>``                  -> ``embedding_model.<k>`` (plain Mistral keys, shapes from ``text_config``)
* ``L.latents`` [r, d]                      -> ``L.latents``
* ``B.0.norm.{weight,bias}`` [d]            -> ``L.norm`` (LayerNorm of the token states)
* ``B.0.norm_context.{weight,bias}`` [d]    -> ``L.norm_context`` (LayerNorm of the latents)
* ``B.0.fn.to_q.weight`` [h*dh, d]          -> ``L.to_q.weight``
* ``B.0.fn.to_kv.weight`` [2*h*dh, d]       -> ``L.to_kv.weight``
* ``B.0.fn.to_out.weight`` [d, h*dh]        -> ``L.to_out.weight``
* ``B.1.norm.{weight,bias}`` [d]            -> ``L.ff_norm``
* ``B.1.fn.net.0.{weight,bias}`` [8d, d]    -> ``L.ff.0`` (into the GEGLU)
* ``B.1.fn.net.2.{weight,bias}`` [d, 4d]    -> ``L.ff.2``

nvembed's ``NVEmbedModel`` (:mod:`nvembed.hf`) has NV-Embed's two top-level parts under the same names
(``embedding_model``, ``latent_attention_model``); only the head's inner names differ (the map above). The key and
shape listing of a folder is read once per start (cached while its files are unchanged).

The computations agree term by term: token states are the attention queries (``norm`` then ``to_q``), the latents
the keys and values (``norm_context`` then ``to_kv``, K the first half of the rows, V the second), heads split as
contiguous ``dh``-wide slices, default ``1/sqrt(dh)`` scaling, no mask (tokens attend to latents only), residual;
then LayerNorm -> Linear -> GEGLU (first half times GELU of the second) -> Linear, residual; masked mean over
``pool_mask``. NV-Embed's head only runs with ``hidden_dim == latent_dim ==`` the decoder's hidden size (its
LayerNorms are sized that way), so ``model.pooling.latent_dim`` must resolve to that size too.

``model.pooling``'s defaults (512 latents, 8 heads, head_dim / latent_dim = hidden size, ff_mult 4, normalize) are
NV-Embed-v1/v2's, so ``model.name_or_path=/path/to/NV-Embed-v2`` needs no pooling settings; anything that does not fit
fails before any tensor is read, naming the file, the key and the settings that would fit. Queries: NV-Embed leaves
the first ``len(tokenizer.tokenize(instruction))`` positions out of pooling (a count without BOS); nvembed leaves out
BOS and every prompt token (found by character offsets). The two agree when the prompt's trailing space merges into
the first word (the usual case); otherwise NV-Embed also pools that lone space token.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import UserError

BACKBONE_PREFIX = "embedding_model."
HEAD_PREFIX = "latent_attention_model."
# NV-Embed's LatentAttentionConfig defaults (their configuration_nvembed.py); v2's config.json overrides none
HEAD_DEFAULTS = {"num_latents_value": 512, "num_cross_heads": 8, "hidden_dim": 4096, "latent_dim": 4096,
                 "cross_dim_head": 4096, "output_normalize": True}
FF_MULT = 4  # their FeedForward(dim) is always built with mult=4
HEAD_KEYS = {  # NV-Embed head key -> ours (both after HEAD_PREFIX, the same top-level name in both models)
    "latents": "latents",
    "cross_attend_blocks.0.norm.weight": "norm.weight",
    "cross_attend_blocks.0.norm.bias": "norm.bias",
    "cross_attend_blocks.0.norm_context.weight": "norm_context.weight",
    "cross_attend_blocks.0.norm_context.bias": "norm_context.bias",
    "cross_attend_blocks.0.fn.to_q.weight": "to_q.weight",
    "cross_attend_blocks.0.fn.to_kv.weight": "to_kv.weight",
    "cross_attend_blocks.0.fn.to_out.weight": "to_out.weight",
    "cross_attend_blocks.1.norm.weight": "ff_norm.weight",
    "cross_attend_blocks.1.norm.bias": "ff_norm.bias",
    "cross_attend_blocks.1.fn.net.0.weight": "ff.0.weight",
    "cross_attend_blocks.1.fn.net.0.bias": "ff.0.bias",
    "cross_attend_blocks.1.fn.net.2.weight": "ff.2.weight",
    "cross_attend_blocks.1.fn.net.2.bias": "ff.2.bias",
}
# buffers older transformers wrote into checkpoints and current models recompute
_IGNORED_BACKBONE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


class CheckpointLayoutError(UserError):
    """A folder in NV-Embed's layout whose config, keys or shapes do not fit (names the file and the key)."""

    kind = "checkpoint"


@dataclass
class NVEmbedCheckpoint:
    """What :func:`read_checkpoint` found in an NV-Embed folder."""

    folder: str
    """The checkpoint folder."""
    text_config: Dict
    """The decoder config (``model_type`` mapped to a transformers one: ``bidir_mistral`` -> ``mistral``;
    ``sliding_window`` dropped, as NV-Embed's bidirectional decoder never applies it)."""
    head: Dict
    """``latent_attention_config`` with NV-Embed's defaults filled in."""
    files: Dict[str, str]
    """Weight key -> safetensors file name (inside ``folder``)."""
    shapes: Dict[str, Tuple[int, ...]]
    """Weight key -> shape (read from the safetensors headers with the key listing)."""

    def path(self, name: str = "config.json") -> str:
        return os.path.join(self.folder, name)

    def shape(self, key: str) -> Tuple[int, ...]:
        return self.shapes[key]

    def tensors(self, keys: List[str]) -> Dict[str, torch.Tensor]:
        from safetensors import safe_open

        out: Dict[str, torch.Tensor] = {}
        by_file: Dict[str, List[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        for name, ks in by_file.items():
            with safe_open(self.path(name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in ks})
        return out


def is_nvembed_checkpoint(path: Optional[str]) -> bool:
    """True for a local folder whose ``config.json`` is NV-Embed's (``model_type`` nvembed with a
    ``latent_attention_config``; nvembed's own exports have no such key)."""
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        return False
    try:
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(c, dict) and c.get("model_type") == "nvembed" and "latent_attention_config" in c


def _listing(folder: str, name: str) -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of one safetensors file (its header only)."""
    from safetensors import safe_open

    with safe_open(os.path.join(folder, name), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _weight_files(folder: str) -> Tuple[Dict[str, str], Dict[str, Tuple[int, ...]]]:
    """(key -> file name, key -> shape) of the folder's weights, each file opened once."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointLayoutError(f"{index}: no 'weight_map' listing the weight files")
        shapes: Dict[str, Tuple[int, ...]] = {}
        for name in sorted(set(weight_map.values())):
            if not os.path.isfile(os.path.join(folder, name)):
                raise CheckpointLayoutError(f"{index}: lists {name}, which is not in {folder}")
            held = _listing(folder, name)
            absent = sorted(k for k, v in weight_map.items() if v == name and k not in held)
            if absent:
                raise CheckpointLayoutError(f"{index}: puts weight '{absent[0]}' in {name}, which does not hold it")
            shapes.update({k: v for k, v in held.items() if weight_map.get(k) == name})
        return dict(weight_map), shapes
    single = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(single):
        raise CheckpointLayoutError(f"{folder}: NV-Embed config.json but no model.safetensors or "
                                    f"model.safetensors.index.json (only safetensors weights are read)")
    shapes = _listing(folder, "model.safetensors")
    return {k: "model.safetensors" for k in shapes}, shapes


def _stamp(folder: str) -> Tuple:
    """What a cached listing depends on: name, size and mtime of the config and weight files."""
    out = []
    for name in sorted(os.listdir(folder)):
        if name == "config.json" or (name.startswith("model") and ".safetensors" in name):
            st = os.stat(os.path.join(folder, name))
            out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


def read_checkpoint(folder: str) -> NVEmbedCheckpoint:
    """Parse an NV-Embed folder's config and weight index (headers only, no tensors); cached while its files are
    unchanged, so the tokenizer, decoder and head loads of one start list the shards once."""
    return _read_checkpoint(os.path.abspath(folder), _stamp(folder), folder)


@functools.lru_cache(maxsize=4)
def _read_checkpoint(key: str, stamp: Tuple, folder: str) -> NVEmbedCheckpoint:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        c = json.load(f)
    text = c.get("text_config")
    if not isinstance(text, dict):
        raise CheckpointLayoutError(f"{path}: 'text_config' must be the decoder's config (a mapping), "
                                    f"got {type(text).__name__}")
    text = {k: v for k, v in text.items()
            if k not in ("_name_or_path", "architectures", "auto_map", "transformers_version", "torch_dtype", "dtype")}
    if "sliding_window" in text:  # their decoder builds its own padding-only mask: full attention at any length
        text["sliding_window"] = None
    model_type = str(text.get("model_type") or "mistral")
    text["model_type"] = model_type[len("bidir_"):] if model_type.startswith("bidir_") else model_type
    from transformers import CONFIG_MAPPING

    if text["model_type"] not in CONFIG_MAPPING:
        raise CheckpointLayoutError(f"{path}: text_config.model_type '{model_type}' is not a transformers "
                                    f"architecture (NV-Embed uses bidir_mistral, read as mistral)")
    head_cfg = c.get("latent_attention_config") or {}
    if not isinstance(head_cfg, dict):
        raise CheckpointLayoutError(f"{path}: 'latent_attention_config' must be a mapping")
    head = {k: head_cfg.get(k, v) for k, v in HEAD_DEFAULTS.items()}
    files, shapes = _weight_files(folder)
    return NVEmbedCheckpoint(folder=folder, text_config=text, head=head, files=files, shapes=shapes)


def _where(ck: NVEmbedCheckpoint, key: str) -> str:
    return ck.path(ck.files.get(key, "model.safetensors"))


def _check_backbone_keys(ck: NVEmbedCheckpoint, config) -> None:
    """Every decoder weight present with the shape ``text_config`` builds; nothing else under the prefix."""
    from transformers import AutoModel

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModel.from_config(config).state_dict().items()}
    got = {k[len(BACKBONE_PREFIX):]: k for k in ck.files if k.startswith(BACKBONE_PREFIX)}
    if not got:
        raise CheckpointLayoutError(f"{ck.folder}: no '{BACKBONE_PREFIX}*' weights (the decoder of an NV-Embed "
                                    f"checkpoint); keys start with {sorted({k.split('.')[0] for k in ck.files})}")
    for k in expected:
        if k not in got:
            raise CheckpointLayoutError(f"{ck.folder}: missing weight '{BACKBONE_PREFIX}{k}', which text_config in "
                                        f"{ck.path()} needs")
    for k, full in got.items():
        if _IGNORED_BACKBONE.search(k):
            continue
        if k not in expected:
            raise CheckpointLayoutError(f"{_where(ck, full)}: weight '{full}' has no place in the decoder that "
                                        f"text_config in {ck.path()} builds")
        shape = ck.shape(full)
        if shape != expected[k]:
            raise CheckpointLayoutError(f"{_where(ck, full)}: weight '{full}' has shape {list(shape)}, but "
                                        f"text_config in {ck.path()} builds {list(expected[k])}")
    others = [k for k in ck.files if not k.startswith((BACKBONE_PREFIX, HEAD_PREFIX))]
    if others:
        raise CheckpointLayoutError(f"{_where(ck, others[0])}: weight '{others[0]}' is neither "
                                    f"'{BACKBONE_PREFIX}*' nor '{HEAD_PREFIX}*'")


def decoder_config(folder: str):
    """The decoder's transformers config (e.g. ``MistralConfig``) from ``text_config``; also what the tokenizer is
    loaded with, because the folder's config.json is NV-Embed's (it would ask to run their remote code)."""
    from transformers import AutoConfig

    values = dict(read_checkpoint(folder).text_config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_backbone(folder: str, cfg: ModelConfig, dtype: torch.dtype) -> nn.Module:
    """The decoder of an NV-Embed checkpoint as a plain transformers model (bidirectional switch applied later)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    check_checkpoint(folder, cfg)  # all of it, before gigabytes are read
    config = decoder_config(folder)
    # transformers reads the shards (lazily, in the requested dtype); only the key prefix differs from a plain model.
    # Its load report would list the head's keys as unexpected: the keys were checked above, so keep it quiet.
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return AutoModel.from_pretrained(folder, config=config, dtype=dtype,
                                         attn_implementation=cfg.attn_implementation,
                                         key_mapping={rf"^{re.escape(BACKBONE_PREFIX)}": ""})
    finally:
        hf_logging.set_verbosity(level)


def _fix_for(ck: NVEmbedCheckpoint, hidden: int) -> str:
    """The pooling settings that rebuild this checkpoint's head, from its config and tensor shapes."""
    h = int(ck.head["num_cross_heads"])
    r, latent = ck.shape(HEAD_PREFIX + "latents")
    inner = ck.shape(HEAD_PREFIX + "cross_attend_blocks.0.fn.to_q.weight")[0]
    return (f"model.pooling: num_latents={r}, num_heads={h}, head_dim={inner // h}, "
            f"latent_dim={'null' if latent == hidden else latent}, ff_mult={FF_MULT}")


def _check_head(ck: NVEmbedCheckpoint, cfg: ModelConfig, hidden: int) -> None:
    """NV-Embed's head weights all present, with the shapes ``model.pooling`` builds and the same head split."""
    from ..hf.modeling_nvembed import LatentAttentionPooling

    present = {k[len(HEAD_PREFIX):] for k in ck.files if k.startswith(HEAD_PREFIX)}
    missing = [k for k in HEAD_KEYS if k not in present]
    if missing:
        raise CheckpointLayoutError(f"{ck.folder}: missing weight '{HEAD_PREFIX}{missing[0]}' of NV-Embed's "
                                    f"latent-attention head")
    extra = sorted(present - set(HEAD_KEYS))
    if extra:
        raise CheckpointLayoutError(f"{_where(ck, HEAD_PREFIX + extra[0])}: weight '{HEAD_PREFIX}{extra[0]}' is not "
                                    f"part of NV-Embed's latent-attention head")
    fix = _fix_for(ck, hidden)
    heads = int(ck.head["num_cross_heads"])
    if heads != cfg.pooling.num_heads:  # equal widths can still split into heads differently
        raise CheckpointLayoutError(f"{ck.path()}: latent_attention_config.num_cross_heads={heads} but "
                                    f"model.pooling.num_heads={cfg.pooling.num_heads}; set {fix}")
    with torch.device("meta"):  # shapes only, nothing allocated
        p = cfg.pooling
        head = LatentAttentionPooling(hidden, p.num_latents, p.num_heads, p.head_dim, p.latent_dim, p.ff_mult)
        own = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    for theirs, ours in HEAD_KEYS.items():
        shape = ck.shape(HEAD_PREFIX + theirs)
        if shape != own[ours]:
            raise CheckpointLayoutError(f"{_where(ck, HEAD_PREFIX + theirs)}: weight '{HEAD_PREFIX}{theirs}' has shape "
                                        f"{list(shape)}, but model.pooling builds {list(own[ours])} for "
                                        f"{HEAD_PREFIX}{ours}; set {fix}")


def check_checkpoint(folder: str, cfg: ModelConfig) -> None:
    """Every check of this module, before any tensor is read: decoder keys and shapes against ``text_config``, head
    keys and shapes against ``model.pooling`` (when it is latent attention)."""
    ck = read_checkpoint(folder)
    config = decoder_config(folder)
    _check_backbone_keys(ck, config)
    if cfg.pooling.mode == "latent_attention":
        _check_head(ck, cfg, config.hidden_size)


def load_head(model: nn.Module, folder: str, cfg: ModelConfig) -> None:
    """Copy NV-Embed's latent-attention head into ``model.latent_attention_model`` (an ``NVEmbedModel``; see the key
    map above); refuses a head whose configuration or shapes differ from ``model.pooling``, naming the file, the key
    and the settings that fit."""
    ck = read_checkpoint(folder)
    if cfg.pooling.mode != "latent_attention":
        print(f"[nvembed] model.pooling.mode={cfg.pooling.mode}: the latent-attention head of {folder} is not used",
              flush=True)
        return
    head = model.latent_attention_model
    _check_head(ck, cfg, head.hidden_size)
    own = head.state_dict()
    state = ck.tensors([HEAD_PREFIX + k for k in HEAD_KEYS])
    mapped = {ours: state[HEAD_PREFIX + theirs].to(own[ours].dtype) for theirs, ours in HEAD_KEYS.items()}
    params = [p for p in head.parameters() if hasattr(p, "ds_id")]
    if params:  # built under DeepSpeed zero.Init: write into the gathered full tensors
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            head.load_state_dict(mapped)
    else:
        head.load_state_dict(mapped)
