"""Open a backend by name: the same pipeline drives ONNX Runtime sessions and TensorRT engines."""

from __future__ import annotations

from pathlib import Path

from mvlm_compile.errors import MvlmError


def resolve_artifacts(path: Path) -> Path:
    """A bundle directory holds its graphs in artifacts/; accept either."""
    path = Path(path)
    return path / "artifacts" if (path / "artifacts" / "manifest.json").exists() else path


def default_engines_dir(artifacts: Path) -> Path:
    """The only engines-<target> directory of the bundle, when there is exactly one."""
    found = sorted(Path(artifacts).parent.glob("engines-*/engines.json"))
    if len(found) != 1:
        raise MvlmError(
            f"--engines: {'no' if not found else len(found)} engines-<target>/engines.json beside {artifacts}; pass --engines DIR"
        )
    return found[0].parent


def open_backend(name: str, artifacts: Path, engines_dir: Path | None = None):
    artifacts = resolve_artifacts(artifacts)
    if name == "ort":
        from mvlm_compile.runtime.ort_backend import OrtBackend

        return OrtBackend(artifacts)
    if name == "trt":
        from mvlm_compile.runtime.trt_backend import TrtBackend

        return TrtBackend(artifacts, engines_dir or default_engines_dir(artifacts))
    raise MvlmError(f"--backend {name!r}: expected 'ort' or 'trt'")
