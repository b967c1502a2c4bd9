"""LDPv2 against an independent NumPy computation of the paper's eq. (3)."""

from __future__ import annotations

import math

import numpy as np
import torch

from mvlm_compile.model.ldpv2 import LDPNetV2Projector


def _erf_gelu(x: np.ndarray) -> np.ndarray:
    erf = np.vectorize(math.erf)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def ldpv2_numpy(x: np.ndarray, w0, b0, w2, b2, conv_w, conv_b) -> np.ndarray:
    """x [B, 576, in] -> [B, 144, out], written from the paper, loops where it helps clarity."""
    f0 = _erf_gelu(x @ w0.T + b0) @ w2.T + b2  # [B, 576, C]
    batch, _, channels = f0.shape
    grid = f0.reshape(batch, 24, 24, channels)
    pooled = grid.reshape(batch, 12, 2, 12, 2, channels).mean(axis=(2, 4))  # 2x2 average, stride 2
    padded = np.pad(pooled, ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = np.zeros_like(pooled)
    for dy in range(3):
        for dx in range(3):
            conv += padded[:, dy : dy + 12, dx : dx + 12, :] * conv_w[:, 0, dy, dx]
    out = pooled + conv + conv_b
    return out.reshape(batch, 144, channels)


def test_ldpv2_matches_independent_computation():
    torch.manual_seed(0)
    projector = LDPNetV2Projector(mm_hidden_size=24, hidden_size=16).double()
    with torch.no_grad():  # non-trivial biases and PEG weights
        for p in projector.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(2, 576, 24, dtype=torch.float64)
    expected = ldpv2_numpy(
        x.numpy(),
        projector.mlp.mlp[0].weight.detach().numpy(),
        projector.mlp.mlp[0].bias.detach().numpy(),
        projector.mlp.mlp[2].weight.detach().numpy(),
        projector.mlp.mlp[2].bias.detach().numpy(),
        projector.peg.peg[0].weight.detach().numpy(),
        projector.peg.peg[0].bias.detach().numpy(),
    )
    with torch.no_grad():
        got = projector(x).numpy()
    assert got.shape == (2, 144, 16)
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-10)


def test_ldpv2_state_dict_keys_are_the_published_ones():
    keys = set(LDPNetV2Projector(8, 4).state_dict())
    assert keys == {
        "mlp.mlp.0.weight",
        "mlp.mlp.0.bias",
        "mlp.mlp.2.weight",
        "mlp.mlp.2.bias",
        "peg.peg.0.weight",
        "peg.peg.0.bias",
    }
    assert tuple(LDPNetV2Projector(8, 4).peg.peg[0].weight.shape) == (4, 1, 3, 3)
