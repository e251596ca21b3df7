"""Poolers: token states [B, L, H] + pool mask [B, L] -> one vector per text.

``pool_mask`` is the attention mask with instruction tokens zeroed: instruction tokens are attended to by the
backbone but never averaged into the embedding (NV-Embed section 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PoolingConfig


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    # clamp: a text made only of instruction tokens would otherwise divide by zero
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class MeanPooling(nn.Module):
    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(hidden, pool_mask)


class LastTokenPooling(nn.Module):
    """State of the last non-padding token (the appended EOS), for either padding side."""

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        last = (attention_mask.bool() * positions).amax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class GEGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        return x * F.gelu(gate)


class LatentAttentionPooling(nn.Module):
    """NV-Embed latent attention: tokens (queries) attend to a trainable latent array (keys/values).

    Shapes follow the public NV-Embed model: pre-norm on tokens and on latents, ``to_q`` hidden -> heads*head_dim,
    ``to_kv`` latent_dim -> 2*heads*head_dim, ``to_out`` back to hidden, no biases, residual; then a pre-norm GEGLU
    feed-forward (mult 4) with residual; then a masked mean over tokens. With hidden=4096, r=512, 8 heads and
    head_dim=4096 this is the 0.74 B-parameter head of NV-Embed; ``head_dim`` is configurable for small models.
    """

    def __init__(self, hidden_size: int, cfg: PoolingConfig):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim or hidden_size
        latent_dim = cfg.latent_dim or hidden_size
        inner = self.num_heads * self.head_dim
        self.latents = nn.Parameter(torch.randn(cfg.num_latents, latent_dim))
        self.norm = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(latent_dim)
        self.to_q = nn.Linear(hidden_size, inner, bias=False)
        self.to_kv = nn.Linear(latent_dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, hidden_size, bias=False)
        self.ff_norm = nn.LayerNorm(hidden_size)
        self.ff = nn.Sequential(nn.Linear(hidden_size, hidden_size * cfg.ff_mult * 2), GEGLU(),
                                nn.Linear(hidden_size * cfg.ff_mult, hidden_size))
        if cfg.zero_init_residual:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.ff[2].weight)
            nn.init.zeros_(self.ff[2].bias)

    def cross_attention(self, hidden: torch.Tensor) -> torch.Tensor:
        b, n, _ = hidden.shape
        q = self.to_q(self.norm(hidden))
        k, v = self.to_kv(self.norm_context(self.latents)).chunk(2, dim=-1)
        q = q.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # [B, h, L, dh]
        k = k.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)  # [B, h, r, dh]
        v = v.view(1, -1, self.num_heads, self.head_dim).transpose(1, 2).expand(b, -1, -1, -1)
        # every token attends to all latents only: no mask needed, padding never leaks into real tokens
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))

    def forward(self, hidden: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        hidden = hidden.to(self.to_q.weight.dtype) if not torch.is_autocast_enabled(hidden.device.type) else hidden
        hidden = self.cross_attention(hidden) + hidden
        hidden = self.ff(self.ff_norm(hidden)) + hidden
        return masked_mean(hidden, pool_mask)


class Pooler(nn.Module):
    """Dispatches to the configured pooling and L2-normalises."""

    def __init__(self, hidden_size: int, cfg: PoolingConfig):
        super().__init__()
        self.mode = cfg.mode
        self.normalize = cfg.normalize
        if cfg.mode == "latent_attention":
            self.head = LatentAttentionPooling(hidden_size, cfg)
        elif cfg.mode == "mean":
            self.head = MeanPooling()
        elif cfg.mode == "last_token":
            self.head = LastTokenPooling()
        else:
            raise ValueError(f"model.pooling.mode: unknown '{cfg.mode}' (latent_attention, mean, last_token)")

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, pool_mask: torch.Tensor) -> torch.Tensor:
        if self.mode == "last_token":
            emb = self.head(hidden, pool_mask, attention_mask)
        else:
            emb = self.head(hidden, pool_mask)
        emb = emb.float()
        return F.normalize(emb, p=2, dim=-1) if self.normalize else emb
