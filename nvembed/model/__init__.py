"""Model: backbone loading and the bidirectional switch, pooling heads, input building, the Embedder."""

from .backbone import apply_lora, load_backbone, load_tokenizer, set_bidirectional
from .embedder import Embedder, build_embedder
from .inputs import build_prompt, tokenize
from .pooling import LatentAttentionPooling, Pooler

__all__ = ["Embedder", "build_embedder", "load_backbone", "load_tokenizer", "set_bidirectional", "apply_lora",
           "build_prompt", "tokenize", "Pooler", "LatentAttentionPooling"]
