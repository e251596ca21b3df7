"""Load a decoder backbone (hub id, local folder, GGUF file, random config or NV-Embed checkpoint) and prepare it for
training: trimmed layers, bidirectional (the switch of :mod:`nvembed.hf.modeling_nvembed`, no modeling file copied),
gradient checkpointing, LoRA, ``torch.compile`` of the layers.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import nn

from ..config import ModelConfig
from ..hf.modeling_nvembed import set_bidirectional
from ..paths import is_package_path, package_path
from . import nvembed_layout

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_gguf(cfg: ModelConfig) -> Tuple[Optional[str], Optional[str]]:
    """Return (folder, file name) for ``gguf_file``; supports ``pkg://package/file.gguf``."""
    if not cfg.gguf_file:
        return cfg.name_or_path, None
    path = cfg.gguf_file
    if is_package_path(path):
        path = package_path(path, what="model.gguf_file")
    elif cfg.name_or_path and not os.path.isabs(path):
        path = os.path.join(cfg.name_or_path, path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model.gguf_file: no such file {path}")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def _gguf_cache_dir(path: str) -> str:
    import hashlib

    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("NVEMBED_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nvembed"))
    return os.path.join(root, "gguf", f"{os.path.basename(path)}-{key}")


def materialize_gguf(cfg: ModelConfig) -> Tuple[Optional[str], Optional[str]]:
    """(folder, gguf file or None): with ``gguf_cache``, the GGUF is converted once to a plain safetensors folder."""
    folder, gguf = resolve_gguf(cfg)
    if not gguf or not cfg.gguf_cache:
        return folder, gguf
    cache = _gguf_cache_dir(os.path.join(folder, gguf))
    if os.path.isfile(os.path.join(cache, ".complete")):
        return cache, None
    from transformers import AutoModel, AutoTokenizer

    print(f"[nvembed] converting {gguf} to {cache} (once)", flush=True)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModel.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    # the weights are de-quantised floats now: drop the GGUF "quantizer" so save_pretrained writes plain safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = f"{cache}.tmp{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    open(os.path.join(tmp, ".complete"), "w").close()
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process converted it meanwhile
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return cache, None


def trim_layers(model: nn.Module, num_layers: int) -> None:
    """Keep only the first ``num_layers`` decoder layers (a speed knob; the rest of the model is unchanged)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("model.num_layers: this backbone has no `.layers` list to trim")
    if num_layers < 1 or num_layers > len(layers):
        raise ValueError(f"model.num_layers={num_layers} but the backbone has {len(layers)} layers")
    model.layers = nn.ModuleList(list(layers)[:num_layers])
    model.config.num_hidden_layers = num_layers
    if hasattr(model.config, "layer_types") and model.config.layer_types:
        model.config.layer_types = model.config.layer_types[:num_layers]


def compile_layers(model: nn.Module) -> None:
    """``torch.compile`` every decoder layer in place (``model.compile``). Regional compilation: the layers run the
    same code, so dynamo compiles one graph per variant and reuses it for all of them; state-dict keys are unchanged.
    ``dynamic=True`` because length bucketing gives every call a new sequence length."""
    import torch._dynamo

    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError("model.compile: this backbone has no `.layers` list to compile")
    # variants per layer: first layer's input has no grad, sub-batches without padding have no mask, no-grad
    # evaluation / GradCache's first pass, batch of one: more than dynamo's default limit of 8, which falls back to
    # eager silently
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 32)
    for layer in layers:
        layer.compile(dynamic=True)


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    else:
        folder, gguf = materialize_gguf(cfg)
        if folder is None:
            raise ValueError("model.tokenizer must be set when the backbone is built from model.random_init")
        kwargs = {"gguf_file": gguf} if gguf else {}
        if not gguf and nvembed_layout.is_nvembed_checkpoint(folder):  # config.json is NV-Embed's, not the decoder's
            kwargs["config"] = nvembed_layout.decoder_config(folder)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code, **kwargs)
    if tok.pad_token is None:  # decoders often have none; NV-Embed pads with EOS
        tok.pad_token = tok.eos_token
    tok.padding_side = cfg.padding_side
    return tok


def load_backbone(cfg: ModelConfig, vocab_size: Optional[int] = None) -> nn.Module:
    """The base transformer (no LM head), in ``cfg.dtype``, bidirectional if asked."""
    from transformers import AutoConfig, AutoModel

    dtype = DTYPES[cfg.dtype]
    if cfg.random_init is not None:
        values = dict(cfg.random_init)
        model_type = values.pop("model_type")
        if vocab_size is not None:
            values.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(model_type, **values)
        config._attn_implementation = cfg.attn_implementation
        model = AutoModel.from_config(config, dtype=dtype, attn_implementation=cfg.attn_implementation)
    else:
        folder, gguf = materialize_gguf(cfg)
        kwargs = {"gguf_file": gguf} if gguf else {}
        if not gguf and nvembed_layout.is_nvembed_checkpoint(folder):  # published NV-Embed: its decoder
            model = nvembed_layout.load_backbone(folder, cfg, dtype)
        else:
            model = AutoModel.from_pretrained(folder, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                              trust_remote_code=cfg.trust_remote_code, **kwargs)
    if cfg.num_layers:
        trim_layers(model, cfg.num_layers)
    set_bidirectional(model, cfg.bidirectional)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap the backbone with peft LoRA (peft.get_peft_model directly; transformers' add_adapter needs newer peft)."""
    if not cfg.lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in cfg.lora.target_modules if t in present]
    if not targets:
        raise ValueError(f"model.lora.target_modules {list(cfg.lora.target_modules)} match no module of the backbone; "
                         f"linear layers present include: {sorted(n for n in present if 'proj' in n)[:12]}")
    lcfg = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lcfg)
    if cfg.gradient_checkpointing:
        # inputs of a frozen embedding carry no grad; checkpointed blocks need one to backpropagate into LoRA
        peft_model.enable_input_require_grads()
    return peft_model
