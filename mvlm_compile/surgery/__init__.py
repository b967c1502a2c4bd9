"""Graph surgery on the exported ONNX graphs: named onnx-graphsurgeon passes (torch-free)."""

from __future__ import annotations

__all__ = ["OptimizeReport", "optimize_artifacts", "optimize_command_rows"]


def __getattr__(name: str):
    # Lazy, so that the runtime's import of surgery.peg_reference does not load onnx-graphsurgeon.
    if name in __all__:
        from mvlm_compile.surgery import optimize

        return getattr(optimize, name)
    raise AttributeError(name)
