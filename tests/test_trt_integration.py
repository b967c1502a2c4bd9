"""The TensorRT path end to end: build the tiny model's engines and verify them against the
golden tensors. Runs wherever TensorRT (10.3+), a CUDA GPU and the PEG plugin library exist;
skipped with the reason elsewhere (CI and the development machines have none of them)."""

from __future__ import annotations

import pytest
from conftest import GOLDEN_TINY

from mvlm_compile.peg_op import PluginLibraryError, find_plugin_library
from mvlm_compile.recipes import load_targets
from mvlm_compile.trt_env import import_tensorrt, query_gpu

trt, why_not = import_tensorrt()
gpu = query_gpu() if trt is not None else None


def _skip_reason() -> str | None:
    if trt is None:
        return why_not
    if gpu is None:
        return "no CUDA GPU visible (libcuda found no device)"
    try:
        find_plugin_library()
    except PluginLibraryError as e:
        return f"PEG plugin library not built: {e}"
    if not any(t.sm == gpu.sm for t in load_targets().values()):
        return f"no target profile for this GPU's SM {gpu.sm}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=_skip_reason() or "")


def test_tiny_engines_build_and_match_golden(tiny_checkpoint, tmp_path):
    from mvlm_compile.bundle import build
    from mvlm_compile.recipes import load_recipe
    from mvlm_compile.runtime.trt_backend import TrtBackend
    from mvlm_compile.verify.verifier import verify

    target = next(name for name, t in load_targets().items() if t.sm == gpu.sm)
    result = build(target, tmp_path / "bundle", checkpoint=tiny_checkpoint)
    assert result.engines_dir is not None, result.deferred_reason
    backend = TrtBackend(result.bundle / "artifacts", result.engines_dir)
    outcome = verify(backend, GOLDEN_TINY, tolerances=load_recipe("tiny").tolerances)
    assert outcome.passed, outcome.to_json()
    # A second build with nothing changed skips every stage.
    again = build(target, tmp_path / "bundle", checkpoint=tiny_checkpoint)
    assert set(again.stages.values()) == {"skipped (unchanged)"}
