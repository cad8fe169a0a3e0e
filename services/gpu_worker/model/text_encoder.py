"""A tiny bidirectional text encoder: the stand-in for umT5 that turns prompt tokens into a context sequence."""

from __future__ import annotations

import torch
from torch import nn

from services.gpu_worker.model.config import ModelConfig
from services.gpu_worker.model.layers import AffineLayerNorm, FeedForward, masked_attention


class _EncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm_attn = AffineLayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm_ffn = AffineLayerNorm(width)
        self.ffn = FeedForward(width, 4 * width)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm_attn(x)).view(batch, length, 3, self.heads, -1).unbind(dim=2)
        x = x + self.out(masked_attention(q, k, v, key_mask).reshape(batch, length, width))
        out: torch.Tensor = x + self.ffn(self.norm_ffn(x))
        return out


class TextEncoder(nn.Module):
    """Embedding table plus pre-norm transformer layers; padded positions never influence real ones."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.empty(config.text_vocab, config.text_dim))
        self.layers = nn.ModuleList(
            _EncoderLayer(config.text_dim, config.text_heads) for _ in range(config.text_layers)
        )
        self.norm_out = AffineLayerNorm(config.text_dim)

    def forward(self, tokens: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """tokens, key_mask [B, T] -> context [B, T, text_dim]."""
        x = self.table[tokens]
        for layer in self.layers:
            x = layer(x, key_mask)
        context: torch.Tensor = self.norm_out(x)
        return context
