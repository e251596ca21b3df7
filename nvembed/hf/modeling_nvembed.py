"""The nvembed text embedder as a transformers model: what training builds on and what an export ships (this file is
copied into the folder as is: remote code that needs no ``nvembed`` install).

    from transformers import AutoModel
    model = AutoModel.from_pretrained(FOLDER, trust_remote_code=True)
    q = model.encode(["how do I reset my password?"], instruction="Given a question, retrieve passages that answer it")
    d = model.encode(["To reset your password, open Settings ..."])
    scores = q @ d.T                                    # cosine similarity (embeddings are L2-normalised)
    # NV-Embed's convention works too (same vectors): instruction="Instruct: Given a question, ...\nQuery: "

``encode`` returns a float32 ``torch.Tensor`` [n, hidden] on the CPU (``convert_to_numpy=True`` gives numpy).
``forward(input_ids, attention_mask, pool_mask)`` returns the pooled embeddings [batch, hidden] (float32).

The backbone is any transformers decoder (rebuilt from ``config.text_config``) made bidirectional exactly as in
training: ``config.is_causal=False`` and every module's ``is_causal`` flag cleared, so transformers builds a
padding-only mask. Pooling (NV-Embed latent attention, mean or last token) runs over ``pool_mask``: the attention
mask with the instruction prompt tokens zeroed (they are attended to but not pooled).
"""

import contextlib
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from .configuration_nvembed import NVEmbedConfig
from .inputs_nvembed import build_prompt, is_full_prompt, tokenize  # noqa: F401 (public here too)


# ---- bidirectional switch ------------------------------------------------------------------------------------------
def set_bidirectional(model: nn.Module, enabled: bool = True) -> None:
    """Switch a transformers decoder between causal and bidirectional attention, in place: transformers >= 5 builds a
    padding-only mask when ``config.is_causal`` is False; the attention modules' own ``is_causal`` flag is cleared too
    because SDPA / flash kernels use it when no mask is materialised (e.g. a batch without padding)."""
    configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "to_dict")}
    for c in configs.values():
        c.is_causal = not enabled
        for sub in ("text_config",):
            if hasattr(c, sub) and getattr(c, sub) is not None:
                getattr(c, sub).is_causal = not enabled
    for m in model.modules():
        if hasattr(m, "is_causal") and isinstance(getattr(m, "is_causal"), bool):
            m.is_causal = not enabled


# ---- pooling: token states [B, L, H] + pool mask [B, L] -> one vector per text --------------------------------------
def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    # clamp: a text made only of instruction tokens would otherwise divide by zero
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """State of the last non-padding token (the appended EOS), for either padding side."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.bool() * positions).amax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# every pooling mode with how a model card describes it; a new mode adds a line here, a branch in NVEmbedModel.pool
# (and its parameters, if any, in __init__) and its name to nvembed's config choices
POOLING_MODES = {
    "latent_attention": "NV-Embed latent attention, then masked mean",
    "mean": "masked mean",
    "last_token": "last token (EOS)",
}


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention: token states (queries) attend to a trainable latent array (keys/values), pre-norm,
    residual; then a pre-norm GEGLU feed-forward with residual; then a masked mean over ``pool_mask``.

    Shapes follow the public NV-Embed model: ``to_q`` hidden -> heads*head_dim, ``to_kv`` latent_dim ->
    2*heads*head_dim, ``to_out`` back to hidden, no biases; GEGLU feed-forward of width ff_mult*hidden. With
    hidden=4096, r=512, 8 heads and head_dim=4096 this is NV-Embed's 0.74 B-parameter head; ``head_dim`` and
    ``latent_dim`` default to the hidden size and are configurable for small models."""

    def __init__(self, hidden_size: int, num_latents: int, num_heads: int, head_dim: Optional[int],
                 latent_dim: Optional[int], ff_mult: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = head_dim or hidden_size
        latent_dim = latent_dim or hidden_size
        inner = self.num_heads * self.head_dim
        self.latents = nn.Parameter(torch.randn(num_latents, latent_dim))
        self.norm = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(latent_dim)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(latent_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.ff_norm = nn.LayerNorm(hidden_size)
        self.ff = nn.Sequential(nn.Linear(hidden_size, hidden_size * ff_mult * 2), GEGLU(),
                                nn.Linear(hidden_size * ff_mult, hidden_size))

    def cross_attention(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden.shape
        q = self.to_q(self.norm(hidden))
        k, v = self.to_kv(self.norm_context(self.latents)).chunk(2, dim=-1)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        v = v.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        out = F.scaled_dot_product_attention(q, k, v)  # tokens attend to latents only: no mask needed
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.to_q.weight.dtype) if not torch.is_autocast_enabled(hidden.device.type) else hidden
        hidden = self.cross_attention(hidden) + hidden
        hidden = self.ff(self.ff_norm(hidden)) + hidden
        return masked_mean(hidden, pool_mask)


# ---- the model ------------------------------------------------------------------------------------------------------
class NVEmbedPreTrainedModel(PreTrainedModel):
    config_class = NVEmbedConfig
    base_model_prefix = "nvembed"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module):  # every weight is in the checkpoint; this only serves fresh configs
        super()._init_weights(module)
        if isinstance(module, LatentAttentionPooling):
            with torch.no_grad():
                module.latents.normal_()


class NVEmbedModel(NVEmbedPreTrainedModel):
    """Bidirectional decoder backbone (``embedding_model``) + pooling head (``latent_attention_model`` for the
    latent-attention mode). ``encode`` embeds raw texts; ``forward`` embeds tokenized inputs.

    ``embedding_model``: a backbone built (and initialised or loaded) by the caller, e.g. nvembed's trainer, which
    loads a pretrained decoder and wraps it with LoRA first; default: a fresh one from ``config.text_config``."""

    def __init__(self, config: NVEmbedConfig, embedding_model: Optional[nn.Module] = None):
        super().__init__(config)
        given = embedding_model is not None
        self.embedding_model = embedding_model if given else AutoModel.from_config(config.text_config)
        if config.pooling_mode == "latent_attention":
            self.latent_attention_model = LatentAttentionPooling(
                config.text_config.hidden_size, config.num_latents, config.num_heads, config.head_dim,
                config.latent_dim, config.ff_mult)
        elif config.pooling_mode in POOLING_MODES:
            self.latent_attention_model = None
        else:
            raise ValueError(f"unknown pooling_mode '{config.pooling_mode}' ({', '.join(POOLING_MODES)})")
        self._tokenizer = None
        if given:  # the parts are initialised already (torch's init for the head): post_init must not draw them
            for m in self.modules():  # again (it would also re-draw LoRA's zero-initialised B matrices)
                m._is_hf_initialized = True
        self.post_init()
        set_bidirectional(self.embedding_model, config.bidirectional)

    # -- tokenizer --------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        """The tokenizer saved next to the weights (loaded on first use; pad = EOS when it has none)."""
        if self._tokenizer is None:
            source = getattr(self.config, "_name_or_path", None) or getattr(self, "name_or_path", None)
            if not source:
                raise ValueError("NVEmbedModel: no tokenizer; load the model with from_pretrained or set model.tokenizer")
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, tok) -> None:
        if tok is not None:
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            tok.padding_side = self.config.padding_side
        self._tokenizer = tok

    def build_prompt(self, instruction: Optional[str]) -> str:
        """The query prompt: a bare task is wrapped in ``config.query_template``; a full prefix in that form
        (NV-Embed's ``"Instruct: {task}\\nQuery: "``) is used as given; empty for no instruction."""
        return build_prompt(instruction, self.config.query_template)

    def tokenize(self, texts: Sequence[str], prompts: Optional[Sequence[str]] = None,
                 max_length: Optional[int] = None) -> Dict[str, torch.Tensor]:
        """Model inputs for ``prompts[i] + texts[i]`` with the prompt tokens left out of ``pool_mask``."""
        return tokenize(self.tokenizer, list(texts), prompts, max_length=max_length or self.config.max_seq_length,
                        add_eos=self.config.add_eos, exclude_prompt=self.config.exclude_instruction)

    # -- model ------------------------------------------------------------------------------------------------------
    def get_input_embeddings(self):
        return self.embedding_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.embedding_model.set_input_embeddings(value)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        mode = self.config.pooling_mode
        if mode == "latent_attention":
            emb = self.latent_attention_model(hidden, pool_mask)
        elif mode == "mean":
            emb = masked_mean(hidden, pool_mask)
        else:
            emb = last_token(hidden, attention_mask)
        emb = emb.float()
        return F.normalize(emb, p=2, dim=-1) if self.config.normalize else emb

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                pool_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        """Pooled embeddings [batch, hidden] (float32; L2-normalised if ``config.normalize``).
        ``pool_mask`` defaults to ``attention_mask`` (nothing excluded)."""
        if pool_mask is None:
            pool_mask = attention_mask
        if "position_ids" not in kwargs:  # as in training: positions count real tokens (left padding safe)
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs.setdefault("use_cache", False)  # no KV cache: embedding never decodes
        out = self.embedding_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return self.pool(out.last_hidden_state, attention_mask, pool_mask)

    @torch.no_grad()
    def encode(self, texts: Union[str, Sequence[str]], instruction: str = "", max_length: Optional[int] = None,
               batch_size: int = 32, prompt: Optional[str] = None, convert_to_numpy: bool = False,
               show_progress: bool = False, autocast_dtype: Optional[torch.dtype] = None, **kwargs):
        """Embed texts, called as NV-Embed's ``encode(texts, instruction, max_length)``. A query gets ``instruction``:
        NV-Embed's full prefix (``"Instruct: {task}\\nQuery: "``) is used as given, a bare task is wrapped in
        ``config.query_template``; both give the same embeddings. ``prompt`` is any other prefix, used verbatim.
        Documents get neither. The prefix tokens are attended to but not pooled. ``max_length`` bounds the whole row
        (BOS + prefix + text + EOS), as NV-Embed's does, EOS kept last (default ``config.max_seq_length``).
        ``autocast_dtype`` (e.g. ``torch.bfloat16``) runs the forward under ``torch.autocast``; default: the weights'
        own dtype. nvembed's training evaluation calls this very method, so its scores come from the same path.
        Returns a float32 CPU ``torch.Tensor`` [n, hidden] (numpy with ``convert_to_numpy=True``), L2-normalised if
        ``config.normalize``."""
        if isinstance(texts, str):
            texts = [texts]
        texts = list(texts)
        prefix = prompt if prompt is not None else self.build_prompt(instruction)
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # little padding per batch
        out: List[Optional[torch.Tensor]] = [None] * len(texts)
        starts = range(0, len(order), batch_size)
        if show_progress:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="encode", leave=False)
        precision = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
                     else contextlib.nullcontext())
        for s in starts:
            idx = order[s:s + batch_size]
            feats = self.tokenize([texts[i] for i in idx], [prefix] * len(idx), max_length)
            with precision:
                emb = self(**{k: v.to(device) for k, v in feats.items()})
            for j, i in enumerate(idx):
                out[i] = emb[j].float().cpu()
        self.train(was_training)
        result = torch.stack(out) if out else torch.zeros((0, self.config.text_config.hidden_size))
        return result.numpy() if convert_to_numpy else result


__all__ = ["NVEmbedModel", "NVEmbedPreTrainedModel", "LatentAttentionPooling", "POOLING_MODES", "set_bidirectional",
           "build_prompt", "is_full_prompt", "tokenize"]
