"""The TensorRT path's contracts that need no TensorRT: builder flavours and targets, engines.json
checks, prompt limits from the engine's profiles, the TensorRT backend's input binding and output
ownership, the timing cache's lock and merge, hashes over external weights, the native PEG
rewrite, the TensorRT-RTX library link, and the committed tiny bundle."""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import GOLDEN_TINY, TINY_BUNDLE, copy_tiny_bundle
from onnx import TensorProto, helper, numpy_helper

from mvlm_compile import onnx_io, peg_op, trt_env
from mvlm_compile.cli import cli
from mvlm_compile.engine.builder import EngineBuildError, EngineSpec, engine_commands, load_timing_cache
from mvlm_compile.engine.builder import save_timing_cache as save_cache
from mvlm_compile.engine.plan import BuildSettings, Geometry, optimization_profiles
from mvlm_compile.engines_record import ENGINES_MANIFEST, check_engines_record, decoder_limits
from mvlm_compile.errors import EXIT_ENGINES_DEFERRED, EXIT_INPUT_ERROR, ArtifactError, InternalError, MvlmError
from mvlm_compile.fileio import sha256_file, sha256_graph
from mvlm_compile.manifest import load_manifest
from mvlm_compile.recipes import load_recipe, load_target, load_targets
from mvlm_compile.trt_env import TENSORRT, TENSORRT_RTX

# --- Builder flavours and targets.


def test_rtx_targets_build_with_tensorrt_rtx_and_orin_targets_with_tensorrt():
    targets = load_targets()
    rtx = {name: t for name, t in targets.items() if t.builder == "tensorrt-rtx"}
    assert {t.sm for t in rtx.values()} == {86, 89, 120} and all(t.kind == "rtx" for t in rtx.values())
    assert all(t.flavour is TENSORRT for n, t in targets.items() if n.startswith(("orin", "x86")))
    assert TENSORRT_RTX.ahead_of_time and not TENSORRT.ahead_of_time
    assert 87 not in TENSORRT_RTX.sms and 90 not in TENSORRT_RTX.sms  # the Orin stays on TensorRT 10.3


def test_a_target_its_builder_cannot_build_for_is_refused(tmp_path):
    spec = {"kind": "rtx", "sm": 87, "memory_gb": 8, "memory_budget_gb": 4, "bandwidth_gbs": 68, "min_tensorrt": "1.7"}
    path = tmp_path / "targets.yaml"
    path.write_text(json.dumps({"orin-via-rtx": {**spec, "builder": "tensorrt-rtx"}}))
    with pytest.raises(MvlmError, match=r"orin-via-rtx: tensorrt-rtx cannot build for compute capability 8\.7"):
        load_targets(path)
    path.write_text(json.dumps({"odd": {**spec, "builder": "onnxruntime"}}))
    with pytest.raises(MvlmError, match="odd: builder 'onnxruntime', expected one of tensorrt, tensorrt-rtx"):
        load_targets(path)


def test_sm_text():
    assert [trt_env.sm_text(sm) for sm in (75, 86, 87, 120, 121)] == ["7.5", "8.6", "8.7", "12.0", "12.1"]


# --- The TensorRT-RTX packaging trap.


def test_the_unversioned_rtx_library_link_is_made_beside_the_versioned_one(tmp_path, monkeypatch):
    (tmp_path / "libtensorrt_rtx.so.1").write_bytes(b"\x7fELF")
    fake = types.ModuleType("tensorrt_rtx_libs")
    fake.__file__ = str(tmp_path / "__init__.py")
    monkeypatch.setitem(sys.modules, "tensorrt_rtx_libs", fake)
    assert trt_env.link_unversioned_rtx_library() == ""
    link = tmp_path / "libtensorrt_rtx.so"
    assert link.is_symlink() and str(link.readlink()) == "libtensorrt_rtx.so.1"  # relative: the dir may move
    assert trt_env.link_unversioned_rtx_library() == ""  # idempotent

    link.unlink()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(trt_env.os, "symlink", refuse)
    why = trt_env.link_unversioned_rtx_library()
    assert why.endswith(f"ln -s libtensorrt_rtx.so.1 {link}") and "Permission denied" in why
    assert list(tmp_path.iterdir()) == [tmp_path / "libtensorrt_rtx.so.1"]  # nothing half-made


def test_the_installed_rtx_wheel_gets_the_link():
    rtx, why = trt_env.import_flavour(TENSORRT_RTX)
    if rtx is None:
        pytest.skip(why)
    import tensorrt_rtx_libs

    link = Path(tensorrt_rtx_libs.__file__).parent / "libtensorrt_rtx.so"
    assert link.resolve() == (link.parent / "libtensorrt_rtx.so.1").resolve()


# --- engines.json and the runtime's limits.


def _fake_engines_dir(tmp_path: Path, context: int | None = None, builder: dict | None = None) -> Path:
    """An engines.json as the engine stage writes it for the tiny model (no engine files)."""
    bundle = load_manifest(TINY_BUNDLE / "artifacts")
    recipe, target = load_recipe("tiny"), load_target("orin-nx-16gb")
    settings = BuildSettings.resolve(recipe, target, int(bundle.model["max_context"]), context=context, batch=4)
    profiles = optimization_profiles(Geometry.from_recipe_and_manifest(recipe, bundle.model), settings)
    record = {
        "builder": builder or {"flavour": "tensorrt", "version": "10.3.0", "sm": 87, "compute_capability": "8.7"},
        "target": target.name,
        "plugin": {"mode": "native"},
        "engines": {"decoder": {"file": "decoder.engine", "sha256": "", "profiles": profiles["decoder"]}},
    }
    engines_dir = tmp_path / "engines"
    engines_dir.mkdir()
    (engines_dir / ENGINES_MANIFEST).write_text(json.dumps(record))
    return engines_dir


def test_limits_come_from_the_decoder_profiles(tmp_path):
    engines_dir = _fake_engines_dir(tmp_path, context=256)
    record = json.loads((engines_dir / ENGINES_MANIFEST).read_text())
    limits = decoder_limits(record, engines_dir)
    assert (limits.max_prompt, limits.context) == (255, 256)  # BuildSettings: max_prompt = min(384, context - 1)
    assert limits.max_batch == 4 and limits.prefill_after_past  # the decode profile's batch; chunks after a past
    limits.check(250, 6)
    with pytest.raises(MvlmError, match=r"--prompt: 250 prompt tokens \(with the image\) \+ --max-new-tokens 7 exceed"):
        limits.check(250, 7)


def test_a_prompt_that_fits_the_model_but_not_the_engine_is_a_usage_error(tmp_path):
    """The tiny model's context is 512; its engines take prompts of at most 384 tokens (recipe
    max_prompt). Checked before any decoder call, so TensorRT never sees the shape."""
    from mvlm_compile.runtime.ort_backend import OrtBackend
    from mvlm_compile.runtime.pipeline import Chat, Pipeline

    engines_dir = _fake_engines_dir(tmp_path)
    record = json.loads((engines_dir / ENGINES_MANIFEST).read_text())
    with OrtBackend(TINY_BUNDLE / "artifacts") as backend:
        model_context = int(backend.manifest.model["max_context"])
        backend.limits = decoder_limits(record, engines_dir)  # what TrtBackend would hold
        chat = Chat(Pipeline(backend))
        image_tokens = int(backend.manifest.model["image_tokens"])
        words = next(n for n in range(1, 500) if len(chat.prompt_ids("word " * n)) - 1 + image_tokens > 384)
        tokens = len(chat.prompt_ids("word " * words)) - 1 + image_tokens
        assert tokens + 4 <= model_context  # fits the model
        calls = []
        backend.run = lambda graph, feed: calls.append(graph)  # nothing may run
        with pytest.raises(MvlmError) as err:
            chat.prepare("word " * words, 4, ())
    assert err.value.exit_code == EXIT_INPUT_ERROR and calls == []
    assert f"--prompt: {tokens} prompt tokens (with the image) exceed the longest prompt of 384" in str(err.value)
    assert "engines.json" in str(err.value)


def test_records_of_another_builder_gpu_or_format_are_refused(tmp_path):
    engines_dir = _fake_engines_dir(tmp_path)
    with pytest.raises(ArtifactError, match="engines built with tensorrt, this runtime is tensorrt-rtx"):
        check_engines_record(engines_dir, "tensorrt-rtx", "1.7.1.116", None, 86, None, graphs={})
    with pytest.raises(ArtifactError, match=r"built for compute capability 8\.7 \(orin-nx-16gb\), this is no GPU"):
        check_engines_record(engines_dir, "tensorrt", "10.3.0", None, None, None, graphs={})
    old = tmp_path / "old"
    old.mkdir()
    (old / ENGINES_MANIFEST).write_text(json.dumps({"tensorrt_version": "10.3.0", "mvlm_compile_version": "0.1.0"}))
    with pytest.raises(ArtifactError, match="did not record the builder: rebuild the engines"):
        check_engines_record(old, "tensorrt", "10.3.0", "Orin", 87, None, graphs={})


# --- The TensorRT backend's buffers (the parts that need no GPU).


def test_a_feed_is_packed_at_aligned_offsets_and_empty_inputs_get_the_owned_buffer():
    """run()'s inputs: each non-empty tensor at a 256-byte aligned offset of one block, an empty
    one (the prefill's past) at the backend's own buffer: TensorRT 10.3 refuses null addresses."""
    from mvlm_compile.runtime.trt_backend import block_bytes, feed_bindings

    past = np.zeros((0, 1, 4, 16), np.float16)
    embeds = np.ones((1, 3, 64), np.float16)  # 384 bytes: the next tensor starts at 512
    positions = np.arange(3, dtype=np.int64)[None]
    feed = {"inputs_embeds": embeds, "past.0.key": past, "position_ids": positions}
    bindings, uploads = feed_bindings(feed, 0x7F0000000000, 0x7F0000100000)
    assert bindings["inputs_embeds"].address == 0x7F0000000000
    assert bindings["position_ids"].address == 0x7F0000000000 + 512
    assert bindings["past.0.key"].address == 0x7F0000100000 and bindings["past.0.key"].shape == (0, 1, 4, 16)
    assert [address for address, _ in uploads] == [0x7F0000000000, 0x7F0000000200]  # nothing uploaded for the empty
    assert block_bytes(list(feed.values())) == 512 + 256
    for bad in (0, 0x7F0000100010):  # null; 16-byte but not 256-byte aligned
        with pytest.raises(InternalError, match="256-byte aligned"):
            feed_bindings({"past": past}, 0x7F0000000000, bad)


# --- The timing cache: locked, checked, merged.


class _Cache:
    def __init__(self, entries: bytes) -> None:
        self.entries = entries

    def combine(self, other: _Cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        self.entries += b"+" + other.entries
        return True

    def serialize(self) -> bytes:
        return self.entries


class _Config:
    """The four IBuilderConfig calls the timing cache uses, answering as told."""

    def __init__(self, accept: bool = True) -> None:
        self.accept, self.given = accept, None

    def create_timing_cache(self, data: bytes) -> _Cache | None:
        return None if data == b"garbage" else _Cache(data)

    def set_timing_cache(self, cache: _Cache, ignore_mismatch: bool) -> bool:
        self.given = cache
        return self.accept

    def get_timing_cache(self) -> _Cache:
        return _Cache(b"this build")


def test_a_timing_cache_tensorrt_refuses_is_an_error_naming_the_file(tmp_path):
    cache = tmp_path / "timing.cache"
    load_timing_cache(_Config(), cache)  # none yet: an empty one
    cache.write_bytes(b"from another GPU")
    with pytest.raises(EngineBuildError, match=r"timing.cache: TensorRT refused this timing cache"):
        load_timing_cache(_Config(accept=False), cache)
    cache.write_bytes(b"garbage")
    with pytest.raises(EngineBuildError, match=r"timing.cache: TensorRT could not read this timing cache"):
        load_timing_cache(_Config(), cache)


def test_the_timing_cache_is_merged_not_overwritten(tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"saved by another build")
    save_cache(_Config(), cache, lambda msg: None)
    assert cache.read_bytes() == b"this build+saved by another build"


def test_the_timing_cache_lock_excludes_another_holder(tmp_path):
    from mvlm_compile.engine.builder import _locked

    cache = tmp_path / "timing.cache"
    held = threading.Event()

    def hold() -> None:
        with _locked(cache):
            held.set()
            time.sleep(0.4)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    started = time.perf_counter()
    with _locked(cache):
        waited = time.perf_counter() - started
    thread.join()
    assert waited >= 0.3


# --- Command lines recorded per engine.


def test_trtexec_and_polygraphy_commands_for_tensorrt_on_the_orin(tmp_path):
    engines = tmp_path / "bundle" / "engines-orin-nx-16gb"
    profiles = [
        {"x": [[1, 1, 64], [1, 2, 64], [1, 4, 64]], "past": [[1, 4, 0, 16]] * 3},
        {"x": [[1, 1, 64]] * 3, "past": [[1, 4, 0, 16], [1, 4, 8, 16], [1, 4, 15, 16]]},
    ]
    spec = EngineSpec("decoder", tmp_path / "bundle" / "artifacts" / "decoder.onnx", profiles, 512 * 2**20, 87)
    plugin = tmp_path / "bundle" / "plugins" / "peg" / "build" / "libmvlm_peg_plugin.so"
    commands = engine_commands(TENSORRT, spec, engines / "decoder.engine", plugin, engines / "timing.cache", engines)
    assert commands["trtexec"] == (
        "trtexec --onnx=../artifacts/decoder.onnx --saveEngine=decoder.engine --stronglyTyped --skipInference "
        "--memPoolSize=workspace:512M --dynamicPlugins=../plugins/peg/build/libmvlm_peg_plugin.so "
        "--timingCacheFile=timing.cache "
        "--profile=0 --minShapes=x:1x1x64,past:1x4x0x16 --optShapes=x:1x2x64,past:1x4x0x16 "
        "--maxShapes=x:1x4x64,past:1x4x0x16 "
        "--profile=1 --minShapes=x:1x1x64,past:1x4x0x16 --optShapes=x:1x1x64,past:1x4x8x16 "
        "--maxShapes=x:1x1x64,past:1x4x15x16"
    )
    assert commands["polygraphy"].startswith(
        "polygraphy convert ../artifacts/decoder.onnx --convert-to trt -o decoder.engine --strongly-typed "
        "--pool-limit workspace:536870912 --plugins ../plugins/peg/build/libmvlm_peg_plugin.so "
        "--load-timing-cache timing.cache --save-timing-cache timing.cache --trt-min-shapes 'x:[1,1,64]' "
    )
    assert commands["polygraphy"].count("--trt-min-shapes") == 2  # one per profile


# --- Hashes over external weights.


def test_graph_hashes_cover_the_external_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_io, "INLINE_WEIGHTS_LIMIT", 0)  # every graph gets <name>.onnx.data
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x], [y], [weight])
    path = tmp_path / "g.onnx"
    onnx_io.save_model(helper.make_model(graph), path)
    data = Path(f"{path}.data")
    assert data.exists()
    before = sha256_graph(path)
    raw = bytearray(data.read_bytes())
    raw[0] ^= 1  # a weight changes; the .onnx does not
    data.write_bytes(bytes(raw))
    assert sha256_graph(path) != before
    data.unlink()
    assert sha256_graph(path) == sha256_file(path)  # an inline graph hashes as its .onnx alone


# --- The native PEG rewrite (what TensorRT-RTX builds without the plugin library).


def test_the_native_peg_rewrite_computes_what_the_plugin_node_does(tmp_path):
    """ONNX Runtime on the golden projector input: the rewritten graph (native depthwise Conv + Add,
    still FP16) against the bundle's (MvlmPEG through the op's NumPy reference)."""
    pytest.importorskip("onnxruntime_extensions", reason="the MvlmPEG node's CPU reference needs it (host extra)")
    from mvlm_compile.runtime.ort_backend import ort_session
    from mvlm_compile.verify.golden_io import load_component

    source = TINY_BUNDLE / "artifacts" / "projector.onnx"
    model = onnx.load(str(source))
    assert peg_op.peg_to_native(model) == 1
    assert peg_op.PEG_OP not in {n.op_type for n in model.graph.node}
    assert peg_op.PEG_DOMAIN not in {o.domain for o in model.opset_import}
    onnx_io.save_model(model, tmp_path / "native.onnx")
    feed, _ = load_component(GOLDEN_TINY, "projector")
    feed = {k: v.astype(np.float16) for k, v in feed.items()}
    native = ort_session(tmp_path / "native.onnx").run(None, feed)[0]
    plugin = ort_session(source).run(None, feed)[0]
    assert native.dtype == np.float16
    scale = float(np.abs(plugin.astype(np.float32)).max())
    assert scale > 0.1 and float(np.abs(native.astype(np.float32) - plugin).max()) <= 1e-3 * scale


# --- The committed tiny bundle and the Orin targets without TensorRT.


def test_the_committed_tiny_bundle_is_small_and_complete():
    files = [p for p in TINY_BUNDLE.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2 * 2**20
    manifest = load_manifest(TINY_BUNDLE / "artifacts")  # checks every listed file exists
    assert manifest.graph_hashes(TINY_BUNDLE / "artifacts") == {n: g["sha256"] for n, g in manifest.graphs.items()}
    assert load_manifest(TINY_BUNDLE / "artifacts" / "reference").graphs["decoder"]["dtype"] == "fp16"
    assert not any("/tmp/" in p.read_text() or "/work/" in p.read_text() for p in files if p.suffix == ".json")


def test_orin_targets_defer_to_the_device_with_status_3(tmp_path):
    if trt_env.import_tensorrt()[0] is not None and trt_env.query_gpu() is not None:
        pytest.skip("TensorRT and a GPU are here: engines would be built")
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    result = CliRunner().invoke(cli, ["build", str(bundle), "--target", "orin-nx-16gb", "--json"])
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    assert json.loads(result.stdout)["stages"] == {"optimize": "skipped (unchanged)", "quantize": "skipped (unchanged)"}
    note = (bundle / "BUILD_ON_TARGET.txt").read_text()
    assert "JetPack 6.1/6.2" in note and "mvlm-compile build bundle --target orin-nx-16gb" in note


def test_an_rtx_target_without_the_wheels_defers_with_the_install_command(tmp_path, monkeypatch):
    import mvlm_compile.bundle as bundle_module

    monkeypatch.setattr(bundle_module, "import_flavour", lambda flavour: (None, f"{flavour.name}: not installed"))
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    result = CliRunner().invoke(cli, ["build", str(bundle), "--target", "rtx-sm89"])
    assert result.exit_code == EXIT_ENGINES_DEFERRED, result.output
    note = (bundle / "BUILD_ON_TARGET.txt").read_text()
    assert "tensorrt-rtx: not installed" in note and "no GPU needed" in note
    assert "pip install 'mvlm-compile[rtx]'\n  mvlm-compile build bundle --target rtx-sm89\n" in note
    assert "cmake" not in note
