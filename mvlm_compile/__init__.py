"""mvlm-compile: MobileVLM V2 -> ONNX -> TensorRT engines for NVIDIA Jetson Orin.

One package per stage: model (reference + checkpoints + golden), export, surgery,
quantize, build, verify, runtime. The CLI (cli.py) is a thin layer over them.
"""

__version__ = "0.1.0"
