"""The export stage: the reference's three components as ONNX graphs (host side, needs torch)."""
