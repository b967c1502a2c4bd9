"""LDPv2, MobileVLM V2's projector, exactly as published (paper eq. 3, authors' code).

Submodule names mirror the authors' so that checkpoint keys
`model.mm_projector.{mlp.mlp.0, mlp.mlp.2, peg.peg.0}.*` load unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mvlm_compile.model.config import POOLED_GRID


class FeatureIRLayer(nn.Module):
    """f0 = Linear(GELU(Linear(x))), GELU being the exact (erf) one."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class TokenDownLayer(nn.Module):
    """f1 = adaptive average pooling of the token grid to (12, 12)."""

    def __init__(self, grid: tuple[int, int] = (POOLED_GRID, POOLED_GRID)) -> None:
        super().__init__()
        self.dwn = nn.Sequential(nn.AdaptiveAvgPool2d(grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        side = int(math.sqrt(tokens))
        x = x.permute(0, 2, 1).reshape(batch, channels, side, side)
        return self.dwn(x).flatten(2).transpose(1, 2)


class PosInjectLayer(nn.Module):
    """PEG: H = DWConv3x3(f1) + f1 (depthwise, stride 1, padding 1, with bias)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        side = int(math.sqrt(tokens))
        grid = x.transpose(1, 2).reshape(batch, channels, side, side)
        return (self.peg(grid) + grid).flatten(2).transpose(1, 2)


class LDPNetV2Projector(nn.Module):
    """[B, 576, mm_hidden] -> [B, 144, hidden]."""

    def __init__(self, mm_hidden_size: int, hidden_size: int) -> None:
        super().__init__()
        self.mlp = FeatureIRLayer(mm_hidden_size, hidden_size)
        self.dwn = TokenDownLayer()
        self.peg = PosInjectLayer(hidden_size)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.peg(self.dwn(self.mlp(image_features)))
