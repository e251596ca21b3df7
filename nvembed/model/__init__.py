"""Training's side of the model: backbone loading (hub id, folder, GGUF, random config, NV-Embed checkpoint), LoRA,
compile, gradient checkpointing, length bucketing, and the Embedder around the Hugging Face model of
:mod:`nvembed.hf` (config class, model, pooling heads, tokenisation, ``encode``: the one copy export ships)."""

from .backbone import apply_lora, load_backbone, load_tokenizer
from .embedder import Embedder, build_embedder, hf_config
from .inputs import build_prompt, tokenize

__all__ = ["Embedder", "build_embedder", "hf_config", "load_backbone", "load_tokenizer", "apply_lora",
           "build_prompt", "tokenize"]
