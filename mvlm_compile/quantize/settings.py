"""Quantize settings, resolved once from the recipe and the command line, and validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from mvlm_compile.errors import MvlmError
from mvlm_compile.recipes import Recipe

METHODS = ("awq", "rtn")
DECODER_PRECISIONS = ("int4", "none")
FLOAT_PRECISIONS = ("fp16", "none")
# lm_head, kept out of INT4 (keep_fp16): as is, or weight-only INT8 per output channel, the form
# ONNX Runtime's CPU fuses into MatMulNBits (KL 6e-4 at 1.7B: benchmarks/lm_head_study.py; ~2 ms
# off a 36 ms decode step: docs/performance.md) and TensorRT's parser takes as a DequantizeLinear on a constant.
LM_HEAD_PRECISIONS = ("fp16", "int8")
FOLD_DOWN = ("up_proj", "mul")  # where AWQ's 1/s for down_proj goes (decoder.py explains)
FOLD_O = ("mul", "v_proj")  # where AWQ's 1/s for o_proj goes
# The embedding table is outside the decoder graph (the runtime gathers from it): a valid
# entry of keep_fp16 that names no Linear of the graph.
OUTSIDE_GRAPH = ("embed_tokens",)


@dataclass(frozen=True)
class QuantizeSettings:
    decoder: str = "int4"
    method: str = "awq"
    group_size: int = 128  # INT4 scale group along the input dimension
    keep_fp16: tuple[str, ...] = ("lm_head",)  # Linears left unquantized (names or dotted suffixes)
    lm_head: str = "fp16"
    vision: str = "fp16"
    projector: str = "fp16"
    # Nothing kept in FP32 in vision/projector: measured error vs golden is far inside the FP16
    # tolerance (1.7B vision 5.2e-4 of scale all-FP16, 4.4e-4 with LayerNormalization in FP32).
    keep_fp32_ops: tuple[str, ...] = ()
    clip: bool = True  # AWQ's per-group clipping search
    fold_down: str = "up_proj"
    fold_o: str = "mul"
    grid: int = 20  # AWQ alphas 0, 1/grid, ..., 1
    max_tokens: int = 512  # calibration tokens per Linear input used by the searches

    def __post_init__(self) -> None:
        choices = {
            "decoder": DECODER_PRECISIONS,
            "vision": FLOAT_PRECISIONS,
            "projector": FLOAT_PRECISIONS,
            "method": METHODS,
            "fold_down": FOLD_DOWN,
            "fold_o": FOLD_O,
            "lm_head": LM_HEAD_PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise MvlmError(
                    f"--{name.replace('_', '-')} {getattr(self, name)!r}: expected one of {', '.join(allowed)}"
                )
        if not isinstance(self.group_size, int) or self.group_size < 16 or self.group_size & (self.group_size - 1):
            raise MvlmError(
                f"--group-size {self.group_size}: expected a power of two >= 16 (TensorRT/ORT blocked INT4)"
            )
        if self.grid < 1 or self.max_tokens < 1:
            raise MvlmError(f"grid {self.grid} / max_tokens {self.max_tokens}: expected positive integers")
        if any(not isinstance(k, str) or not k.strip() for k in self.keep_fp16):
            raise MvlmError(f"--keep {list(self.keep_fp16)}: expected Linear names such as lm_head")
        if self.lm_head == "int8" and "lm_head" not in self.keep_fp16:
            raise MvlmError("--lm-head int8: lm_head must be kept out of INT4 (--keep lm_head)")

    @classmethod
    def resolve(cls, recipe: Recipe | None, **overrides: Any) -> QuantizeSettings:
        """The recipe's precision, then `overrides` (the command line's options; None means unset)."""
        values: dict[str, Any] = {}
        if recipe is not None:
            decoder = recipe.precision.get("decoder", {})
            values = {
                "decoder": decoder.get("weights", cls.decoder),
                "method": decoder.get("method", cls.method),
                "group_size": decoder.get("group_size", cls.group_size),
                "keep_fp16": tuple(decoder.get("keep_fp16", cls.keep_fp16)),
                "lm_head": decoder.get("lm_head", cls.lm_head),
                "vision": recipe.precision.get("vision", cls.vision),
                "projector": recipe.precision.get("projector", cls.projector),
            }
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown quantize settings {unknown}")
        values.update(
            {k: tuple(v) if k in ("keep_fp16", "keep_fp32_ops") else v for k, v in overrides.items() if v is not None}
        )
        return cls(**values)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
