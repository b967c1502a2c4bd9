"""The llama.cpp peer benchmark's own logic, without llama.cpp (the benchmark itself never runs in
CI): the GGUF tensor names, the Q/K row permutation, and its exits for bad input and missing deps."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY_BUNDLE

sys.path.insert(0, str(REPO / "benchmarks"))
import llama_cpp_bench  # noqa: E402


def _rope_half(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """transformers' LLaMA RoPE on one head [head_dim]: rotate the two halves."""
    half = x.shape[-1] // 2
    angle = pos * base ** (-np.arange(half) / half)
    cos, sin = np.cos(np.concatenate([angle, angle])), np.sin(np.concatenate([angle, angle]))
    rotated = np.concatenate([-x[half:], x[:half]])
    return x * cos + rotated * sin


def _rope_pairs(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """llama.cpp's 'llama' RoPE (GGML's normal mode) on one head: rotate adjacent pairs."""
    half = x.shape[-1] // 2
    angle = pos * base ** (-np.arange(half) / half)
    even, odd = x[0::2], x[1::2]
    out = np.empty_like(x)
    out[0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[1::2] = even * np.sin(angle) + odd * np.cos(angle)
    return out


def test_rope_permute_keeps_attention_scores() -> None:
    """q.k after RoPE is the same for transformers' weights and the permuted GGUF weights: the
    permutation is what makes llama.cpp's pair rotation compute transformers' half rotation."""
    rng = np.random.default_rng(0)
    heads, head_dim, hidden = 2, 8, 16
    wq, wk = rng.standard_normal((2, heads * head_dim, hidden))
    x_q, x_k = rng.standard_normal((2, hidden))
    pq = llama_cpp_bench.rope_permute(wq, heads)
    pk = llama_cpp_bench.rope_permute(wk, heads)
    for h in range(heads):
        rows = slice(h * head_dim, (h + 1) * head_dim)
        expected = _rope_half((wq @ x_q)[rows], 7) @ _rope_half((wk @ x_k)[rows], 3)
        got = _rope_pairs((pq @ x_q)[rows], 7) @ _rope_pairs((pk @ x_k)[rows], 3)
        assert got == pytest.approx(expected, rel=1e-10)


def test_gguf_names() -> None:
    names = {llama_cpp_bench.gguf_name(f"model.layers.3.{n}.weight") for n in llama_cpp_bench._LAYER_NAMES}
    assert names == {f"blk.3.{n}.weight" for n in llama_cpp_bench._LAYER_NAMES.values()}
    assert llama_cpp_bench.gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert llama_cpp_bench.gguf_name("lm_head.weight") == "output.weight"


def test_missing_checkpoint_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    status = llama_cpp_bench.main(["--checkpoint", str(tmp_path / "none"), "--artifacts", str(TINY_BUNDLE)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"error: --checkpoint {tmp_path / 'none'}: not a checkpoint (no config.json)"]


def test_skips_with_install_hint_without_its_dependencies(tiny_checkpoint: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(llama_cpp_bench, "missing_deps", lambda: ["llama-cpp-python"])
    status = llama_cpp_bench.main(["--checkpoint", str(tiny_checkpoint), "--artifacts", str(TINY_BUNDLE)])
    assert status == llama_cpp_bench.EXIT_SKIPPED
    assert "skipped, llama-cpp-python not installed: pip install -e '.[bench]'" in capsys.readouterr().err
