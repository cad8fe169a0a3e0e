"""Small building blocks shared by the text encoder and the DiT, with parameter names the seeded init knows."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Wan's RMSNorm over the full width (used on queries and keys before attention)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.empty(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.norm_weight


class AffineLayerNorm(nn.Module):
    """LayerNorm with a learned scale and bias (the un-modulated norm before cross-attention)."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.norm_weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype) * self.norm_weight + self.bias


class FeedForward(nn.Module):
    """Linear, GELU, linear: Wan's FFN, with exact GELU where Wan uses the tanh form (3x cheaper on CPU)."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(width, hidden)
        self.fc_out = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc_out(F.gelu(self.fc_in(x)))
        return out


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """Attention of q [B, L, H, D] over k, v [B, T, H, D] where key_mask [B, T] is True; returns [B, L, H, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask[:, None, None, :]
    )
    return out.transpose(1, 2)
