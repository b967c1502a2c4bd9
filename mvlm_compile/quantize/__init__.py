"""Quantize stage: INT4 weight-only decoder (RTN or AWQ, blocked DequantizeLinear) and FP16
vision/projector, torch-free."""

from __future__ import annotations

__all__ = ["QuantizeReport", "QuantizeSettings", "quantize_artifacts", "resolve_settings"]


def __getattr__(name: str):
    # Lazy, so that `mvlm_compile.quantize.int4` alone does not load ONNX Runtime.
    if name == "QuantizeSettings":
        from mvlm_compile.quantize.settings import QuantizeSettings

        return QuantizeSettings
    if name in __all__:
        from mvlm_compile.quantize import api

        return getattr(api, name)
    raise AttributeError(name)
