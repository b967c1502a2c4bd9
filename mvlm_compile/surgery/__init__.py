"""Graph surgery on the exported ONNX graphs: named onnx-graphsurgeon passes (torch-free)."""

from mvlm_compile.surgery.optimize import OptimizeReport, optimize_artifacts

__all__ = ["OptimizeReport", "optimize_artifacts"]
