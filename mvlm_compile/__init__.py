"""mvlm-compile: MobileVLM V2 -> ONNX -> TensorRT engines for NVIDIA Jetson Orin.

One package per stage: model (reference + checkpoints + golden), export, surgery,
quantize, build, verify, runtime. The CLI (cli.py) is a thin layer over them; apps use
`mvlm_compile.Session` (session.py), the runtime over a bundle.
"""

from importlib.metadata import version

# pyproject.toml's version, read from the installed package's metadata: the one place it is set.
__version__ = version("mvlm-compile")

__all__ = ["Session", "__version__"]


def __getattr__(name: str):
    # Imported on first use, so that `mvlm-compile --help` and the stages never load the runtime.
    if name == "Session":
        from mvlm_compile.session import Session

        return Session
    raise AttributeError(f"module 'mvlm_compile' has no attribute {name!r}")
