"""Real TensorRT engines on a CPU-only machine: TensorRT for RTX builds the committed tiny bundle's
three engines ahead of time for SM 8.6, through the project's own build code (`mvlm-compile build
BUNDLE --target rtx-sm86`, mvlm_compile.engine.builder). What a real builder tells us is asserted:
the parse has no error, add_optimization_profile accepted every planned profile, the engine bytes
exist, INT4 weights stay packed, and what it refuses comes back as our error naming the node.

Skipped, with the reason, only where the TensorRT-RTX wheels are not installed (`make test`
installs them: pip install 'mvlm-compile[rtx]'). The projector is built with PEG as a native
depthwise Conv here; with TensorRT headers (TENSORRT_ROOT) the plugin library is built with CMake
and the projector is built with the MvlmPEG plugin too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from conftest import REPO, copy_tiny_bundle
from onnx import TensorProto, helper, numpy_helper

from mvlm_compile import contract, peg_op
from mvlm_compile.cli import cli
from mvlm_compile.engine.builder import (
    NATIVE_PROJECTOR,
    BuildLog,
    EngineBuildError,
    EngineSpec,
    build_serialized_engine,
    parse_onnx,
)
from mvlm_compile.engine.plan import BuildSettings, Geometry, fit_batch, optimization_profiles
from mvlm_compile.engines_record import ENGINES_MANIFEST, check_engines_record, decoder_limits
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.fileio import sha256_file
from mvlm_compile.manifest import load_manifest
from mvlm_compile.recipes import load_recipe, load_target
from mvlm_compile.trt_env import TENSORRT_RTX, import_flavour, query_gpu

rtx, why_not = import_flavour(TENSORRT_RTX)
pytestmark = pytest.mark.skipif(rtx is None, reason=why_not or "")

TARGET = "rtx-sm86"
MIB = 2**20


def _build(bundle: Path, *extra: str):
    return CliRunner().invoke(cli, ["build", str(bundle), "--target", TARGET, "--json", *extra])


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The CLI build of a copy of the tiny bundle, with no PEG plugin library anywhere it looks."""
    bundle = copy_tiny_bundle(tmp_path_factory.mktemp("rtx") / "bundle")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(peg_op.PLUGIN_ENV, raising=False)
        mp.setattr(peg_op, "BUILD_DIRS", ())
        result = _build(bundle)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    engines_dir = Path(summary["engines_dir"])
    return bundle, engines_dir, summary, json.loads((engines_dir / ENGINES_MANIFEST).read_text())


def test_an_rtx_target_builds_real_engines_on_a_cpu_only_host(built):
    bundle, engines_dir, summary, record = built
    # The committed bundle is current for these stages; the engines are new.
    assert summary["stages"] == {"optimize": "skipped (unchanged)", "quantize": "skipped (unchanged)", "engines": "ran"}
    assert record["builder"] == {
        "flavour": "tensorrt-rtx",
        "module": "tensorrt_rtx_bindings",
        "version": rtx.__version__,
        "sm": 86,
        "compute_capability": "8.6",
        "ahead_of_time": True,
    }
    assert record["gpu"] == {"name": None, "sm": 86} and record["target"] == TARGET
    for name in ("vision", "projector", "decoder"):
        engine = record["engines"][name]
        path = engines_dir / engine["file"]
        assert path.stat().st_size == engine["bytes"] > 100_000, name  # real engines, not headers
        assert sha256_file(path) == engine["sha256"]
    assert {name: e["precision"] for name, e in record["engines"].items()} == {
        "vision": "fp16",
        "projector": "fp16",
        "decoder": "int4",
    }


def test_every_planned_profile_was_accepted(built):
    bundle, _, _, record = built
    manifest = load_manifest(bundle / "artifacts")
    recipe = load_recipe("tiny")
    geometry = Geometry.from_recipe_and_manifest(recipe, manifest.model)
    target = load_target(TARGET)
    settings = fit_batch(
        geometry, recipe, target, BuildSettings.resolve(recipe, target, int(manifest.model["max_context"]))
    )
    planned = optimization_profiles(geometry, settings)
    for name, engine in record["engines"].items():
        assert engine["profiles"] == planned[name]
        # What add_optimization_profile returned, one index per planned profile.
        assert engine["profile_indices"] == list(range(len(planned[name])))
    decoder = record["engines"]["decoder"]["profiles"]
    past = contract.past_names(0)[0]
    # [past, slots, kv_heads, head_dim]: a prefill after no past or (a chunk) after one, planned and accepted
    assert [shape[0] for shape in decoder[0][past]] == [0, 0, settings.context - 1]
    assert decoder[1][contract.DECODER_EMBEDS][2][1] == 1 and decoder[1][past][2][0] == settings.context - 1
    # The batch dimension: a decode step of 1 to max-batch sequences over as many cache slots.
    assert record["max_batch"] == settings.batch == 8  # the most the memory plan gives by default
    assert [shape[0] for shape in decoder[1][contract.DECODER_EMBEDS]] == [1, 8, 8]
    assert [shape[1] for shape in decoder[1][past]] == [1, 8, 8]
    assert decoder_limits(record, Path("engines")).max_batch == 8


def test_each_graph_parses_without_error_into_the_manifest_io(built):
    bundle, engines_dir, _, _ = built
    manifest = load_manifest(bundle / "artifacts")
    graphs = {name: manifest.graph_path(bundle / "artifacts", name) for name in manifest.graphs}
    graphs["projector"] = engines_dir / NATIVE_PROJECTOR
    for name, path in graphs.items():
        log = BuildLog(rtx)
        _, network, parser = parse_onnx(rtx, log, path)
        assert parser.num_errors == 0 and log.errors == [], (name, log.errors)
        assert [network.get_input(i).name for i in range(network.num_inputs)] == [
            i["name"] for i in manifest.graphs[name]["inputs"]
        ]
        assert [network.get_output(i).name for i in range(network.num_outputs)] == [
            o["name"] for o in manifest.graphs[name]["outputs"]
        ]
        assert network.num_layers > 0


def test_the_projector_is_built_fp16_with_peg_as_a_native_depthwise_conv(built):
    bundle, engines_dir, _, record = built
    assert record["plugin"] == {"mode": "native", "graph": NATIVE_PROJECTOR}
    assert record["engines"]["projector"]["onnx"] == NATIVE_PROJECTOR
    native = onnx.load(str(engines_dir / NATIVE_PROJECTOR))
    assert not [n for n in native.graph.node if n.op_type == peg_op.PEG_OP]
    (conv,) = [n for n in native.graph.node if n.op_type == "Conv"]
    hidden = load_manifest(bundle / "artifacts").model["hidden_size"]
    assert next(a.i for a in conv.attribute if a.name == "group") == hidden
    weights = {t.name: t for t in native.graph.initializer}
    assert {weights[name].data_type for name in conv.input[1:]} == {TensorProto.FLOAT16}


def test_unchanged_inputs_skip_and_another_builder_version_rebuilds(built, monkeypatch):
    bundle, engines_dir, _, _ = built
    with monkeypatch.context() as mp:
        mp.setattr(peg_op, "BUILD_DIRS", ())
        mp.delenv(peg_op.PLUGIN_ENV, raising=False)
        again = _build(bundle)
        assert json.loads(again.stdout)["stages"]["engines"] == "skipped (unchanged)"
        mp.setattr(rtx, "__version__", "1.7.99.0")  # engines of another TensorRT-RTX are not reused
        other = _build(bundle)
    assert other.exit_code == 0, other.output
    assert json.loads(other.stdout)["stages"]["engines"] == "ran"
    assert json.loads((engines_dir / ENGINES_MANIFEST).read_text())["builder"]["version"] == "1.7.99.0"
    restored = _build(bundle)  # back to the real version: rebuilt again, for the tests after this one
    assert json.loads(restored.stdout)["stages"]["engines"] == "ran"


def test_the_runtime_refuses_engines_for_another_builder_or_gpu(built):
    bundle, engines_dir, _, record = built
    gpu = query_gpu()
    if gpu is not None and gpu.sm == 86:
        pytest.skip("an SM 8.6 GPU is here: these engines match it")
    from mvlm_compile.runtime.trt_backend import TrtBackend

    with pytest.raises(ArtifactError, match=r"built for compute capability 8\.6 \(rtx-sm86\), this is"):
        TrtBackend(bundle / "artifacts", engines_dir)
    version = record["builder"]["version"]
    manifest = load_manifest(bundle / "artifacts")
    graphs = {name: graph["sha256"] for name, graph in manifest.graphs.items()}
    with pytest.raises(ArtifactError, match="engines built with tensorrt-rtx, this runtime is tensorrt"):
        check_engines_record(engines_dir, "tensorrt", "10.3.0", "Orin", 87, None, graphs=graphs)
    with pytest.raises(ArtifactError, match=f"engines built with tensorrt-rtx {version}, this is 1.8.0"):
        check_engines_record(engines_dir, "tensorrt-rtx", "1.8.0", "RTX 3090", 86, None, graphs=graphs)
    checked = check_engines_record(engines_dir, "tensorrt-rtx", version, "RTX 3090", 86, None, graphs=graphs)
    assert checked["target"] == TARGET


def test_the_recorded_polygraphy_command_builds_the_same_engine(built):
    """engines.json's command line, run as written from a copy of the engines directory."""
    pytest.importorskip("tensorrt_rtx", reason="Polygraphy's TensorRT-RTX mode imports `tensorrt_rtx`")
    bundle, engines_dir, _, record = built
    by_hand = Path(shutil.copytree(engines_dir, bundle / "engines-by-hand"))
    (by_hand / "decoder.engine").unlink()
    command = record["engines"]["decoder"]["commands"]["polygraphy"]
    assert command.startswith("POLYGRAPHY_USE_TENSORRT_RTX=1 polygraphy convert ../artifacts/decoder.onnx")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "-c", command], cwd=by_hand, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    size = (by_hand / "decoder.engine").stat().st_size
    assert abs(size - record["engines"]["decoder"]["bytes"]) <= 0.01 * size  # same engine (builds are not bit-exact)


# --- Single graphs through build_serialized_engine.


def _graph(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    model = helper.make_model(
        helper.make_graph(nodes, "g", inputs, outputs, list(initializers)), opset_imports=[helper.make_opsetid("", 21)]
    )
    model.ir_version = 10
    return model


def _spec(path: Path, profiles, name: str = "test") -> EngineSpec:
    return EngineSpec(name, path, profiles, 256 * MIB, 86)


def _engine_sizes_of_one_linear(tmp_path: Path, module: str, k: int, n: int, settings, profile) -> dict[str, int]:
    """One FP16 Linear [k, n] named like the decoder's `module`, quantized by the project's pass with
    `settings`: the serialized engine bytes of the FP16 graph and of the quantized one."""
    from mvlm_compile.quantize.decoder import quantize_decoder

    weight = (np.random.default_rng(0).standard_normal((k, n), np.float32) * 0.02).astype(np.float16)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", "seq", k])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", n])
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"], name=f"/language_model/{module}/MatMul")
    fp16 = _graph([matmul], [x], [y], [numpy_helper.from_array(weight, "w")])
    onnx.save(fp16, str(tmp_path / "fp16.onnx"))
    quantized = quantize_decoder(fp16, tmp_path, settings).model
    assert [node.op_type for node in quantized.graph.node] == ["DequantizeLinear", "MatMul"]
    onnx.save(quantized, str(tmp_path / "quantized.onnx"))
    return {
        name: len(build_serialized_engine(rtx, TENSORRT_RTX, _spec(tmp_path / f"{name}.onnx", [{"x": profile}])).data)
        for name in ("fp16", "quantized")
    }


def test_int4_weights_stay_packed_in_the_engine(tmp_path):
    """The 1.7B's MLP up-projection (2048 x 5632) quantized by the project's RTN INT4 pass: the
    INT4 engine carries the packed nibbles and FP16 scales, the FP16 one the FP16 weights."""
    from mvlm_compile.quantize.settings import QuantizeSettings

    k, n, group = 2048, 5632, 128
    settings = QuantizeSettings(method="rtn", group_size=group, keep_fp16=())
    profile = [[1, 1, k], [1, 16, k], [1, 64, k]]
    sizes = _engine_sizes_of_one_linear(tmp_path, "model/layers.0/mlp/up_proj", k, n, settings, profile)
    fp16_bytes, int4_bytes = 2 * k * n, k * n // 2 + (k // group) * n * 2  # 23.1 MB; 5.8 MB + 0.2 MB of scales
    assert fp16_bytes <= sizes["fp16"] <= fp16_bytes + 4 * MIB
    assert int4_bytes <= sizes["quantized"] <= int4_bytes + 4 * MIB
    assert sizes["fp16"] > 3 * sizes["quantized"]


def test_an_int8_lm_head_is_taken_and_stays_int8_in_the_engine(tmp_path):
    """`--lm-head int8` (per output channel, axis 1) on an lm_head of the 1.7B's width: the builder
    takes the DequantizeLinear and the engine carries one byte per weight, not two."""
    from mvlm_compile.quantize.settings import QuantizeSettings

    k, n = 2048, 8192
    settings = QuantizeSettings(method="rtn", keep_fp16=("lm_head",), lm_head="int8")
    sizes = _engine_sizes_of_one_linear(tmp_path, "lm_head", k, n, settings, [[1, 1, k]] * 3)
    fp16_bytes, int8_bytes = 2 * k * n, k * n + 2 * n  # 33.6 MB; 16.8 MB + FP16 scales
    assert fp16_bytes <= sizes["fp16"] <= fp16_bytes + 4 * MIB
    assert int8_bytes <= sizes["quantized"] <= int8_bytes + 4 * MIB


def test_an_unsupported_node_fails_with_our_error_naming_it(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="/fine/Relu"),
        helper.make_node("MvlmNoSuchOp", ["r"], ["y"], name="/decoder/the_unsupported_node"),
    ]
    onnx.save(_graph(nodes, [x], [y]), str(tmp_path / "bad.onnx"))
    with pytest.raises(EngineBuildError) as err:
        build_serialized_engine(rtx, TENSORRT_RTX, _spec(tmp_path / "bad.onnx", [{}]))
    message = err.value.format_message()
    assert "bad.onnx: TensorRT's ONNX parser failed at node '/decoder/the_unsupported_node' (MvlmNoSuchOp)" in message
    assert "\n" not in message


def test_a_refused_profile_fails_with_our_error_naming_it(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])
    onnx.save(_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y]), str(tmp_path / "g.onnx"))
    good, inverted = {"x": [[1, 8], [2, 8], [4, 8]]}, {"x": [[4, 8], [2, 8], [1, 8]]}  # min > max
    with pytest.raises(
        EngineBuildError,
        match=r"refused optimisation profile 1 of the test engine \(add_optimization_profile returned -1\): "
        r".*MIN<=OPT<=MAX",
    ):
        build_serialized_engine(rtx, TENSORRT_RTX, _spec(tmp_path / "g.onnx", [good, inverted]))


def test_a_compute_capability_the_builder_does_not_know_is_refused(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 8])
    onnx.save(_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y]), str(tmp_path / "g.onnx"))
    orin = EngineSpec("test", tmp_path / "g.onnx", [{}], 256 * MIB, 87)
    with pytest.raises(MvlmError, match=r"cannot build for compute capability 8\.7 \(knows \['SM120'"):
        build_serialized_engine(rtx, TENSORRT_RTX, orin)


# --- With TensorRT headers: the projector with the MvlmPEG plugin.


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    return found or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None)


@pytest.fixture(scope="module")
def plugin_library(tmp_path_factory) -> Path:
    """libmvlm_peg_plugin.so built by the project's CMakeLists.txt (for SM 8.6 only, to be quick)."""
    root = os.environ.get("TENSORRT_ROOT")
    headers = [Path(root) / "include"] if root else []
    headers += [Path("/usr/include/x86_64-linux-gnu"), Path("/usr/include")]
    if not any((d / "NvInferRuntime.h").is_file() for d in headers):
        pytest.skip("TensorRT headers not found: set TENSORRT_ROOT to a TensorRT 10 prefix to build the PEG plugin")
    if shutil.which("cmake") is None or _nvcc() is None:
        pytest.skip("the PEG plugin needs cmake and nvcc")
    build = tmp_path_factory.mktemp("peg_plugin")
    for step in (
        ["cmake", "-S", str(REPO / "plugins" / "peg"), "-B", str(build), "-DCMAKE_CUDA_ARCHITECTURES=86"],
        ["cmake", "--build", str(build), "-j2"],
    ):
        done = subprocess.run(step, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return build / peg_op.PLUGIN_LIBRARY


def test_the_projector_builds_with_the_peg_plugin(plugin_library, tmp_path, monkeypatch):
    bundle = copy_tiny_bundle(tmp_path / "bundle")
    monkeypatch.setenv(peg_op.PLUGIN_ENV, str(plugin_library))
    result = _build(bundle)
    assert result.exit_code == 0, result.output
    engines_dir = Path(json.loads(result.stdout)["engines_dir"])
    record = json.loads((engines_dir / ENGINES_MANIFEST).read_text())
    assert record["plugin"] == {"mode": "plugin", "file": peg_op.PLUGIN_LIBRARY, "sha256": sha256_file(plugin_library)}
    projector = record["engines"]["projector"]
    assert projector["onnx"] == "../artifacts/projector.onnx" and projector["profile_indices"] == [0]
    assert [n.op_type for n in onnx.load(str(bundle / "artifacts" / "projector.onnx")).graph.node].count("MvlmPEG") == 1
    assert (engines_dir / "projector.engine").stat().st_size == projector["bytes"] > 100_000
    assert f"--plugins {os.path.relpath(plugin_library, engines_dir)}" in projector["commands"]["polygraphy"]
    assert not (engines_dir / NATIVE_PROJECTOR).exists()


def test_errors_of_every_build_reach_its_message(tmp_path):
    """TensorRT keeps the first logger it is given and ignores later ones: a refused build after
    another build must still report the refusal's own error, not "no error logged"."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 8])
    onnx.save(_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y]), str(tmp_path / "g.onnx"))
    good, inverted = {"x": [[1, 8], [2, 8], [4, 8]]}, {"x": [[4, 8], [2, 8], [1, 8]]}
    for _ in range(2):
        assert build_serialized_engine(rtx, TENSORRT_RTX, _spec(tmp_path / "g.onnx", [good])).data
        with pytest.raises(EngineBuildError, match=r"MIN<=OPT<=MAX"):
            build_serialized_engine(rtx, TENSORRT_RTX, _spec(tmp_path / "g.onnx", [good, inverted]))


def test_no_garbage_collection_runs_while_tensorrt_works():
    """A collection inside TensorRT's logger callback can free another TensorRT object whose
    destructor waits on a mutex TensorRT holds (a hang seen in this suite): collect before, none during."""
    import gc
    import weakref

    from mvlm_compile.trt_env import no_collection_inside_tensorrt

    class Node:
        pass

    def garbage_cycle() -> weakref.ref:
        node = Node()
        node.self = node
        return weakref.ref(node)

    before = garbage_cycle()
    with no_collection_inside_tensorrt():
        assert before() is None  # what was pending is collected first, outside TensorRT
        during = garbage_cycle()
        for _ in range(100_000):  # far past the collector's thresholds
            Node()
        assert during() is not None and not gc.isenabled()
    assert gc.isenabled()


def test_a_triton_repository_of_the_engines_matches_what_tensorrt_parses(built, tmp_path):
    """`mvlm-compile triton --backend trt`: the vision and projector engines become `tensorrt` models whose
    config (parsed with Triton's own ModelConfig proto) names each engine's I/O with the type and dims that
    TensorRT-RTX's parser gives the graph the engine was built from. Not served here: that needs a GPU Triton."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="the [triton] extra")
    from google.protobuf import text_format

    bundle, engines_dir, _, record = built
    out = tmp_path / "repo"
    command = ["triton", str(bundle), "--out", str(out), "--backend", "trt", "--engines", str(engines_dir), "--json"]
    result = CliRunner().invoke(cli, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["models"] == ["mobilevlm", "mobilevlm_vision", "mobilevlm_projector"]
    assert summary["plugin"] is None  # PEG built natively here: no plugin library for the server to load
    types = {"HALF": "TYPE_FP16", "FLOAT": "TYPE_FP32"}
    for graph in ("vision", "projector"):
        text = (out / f"mobilevlm_{graph}" / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config_pb2.ModelConfig())
        assert (config.backend, config.max_batch_size, config.default_model_filename) == ("tensorrt", 0, "model.plan")
        plan = out / f"mobilevlm_{graph}" / "1" / "model.plan"
        assert sha256_file(plan) == record["engines"][graph]["sha256"]
        _, network, _ = parse_onnx(rtx, BuildLog(rtx), engines_dir / record["engines"][graph]["onnx"])
        (profile,) = record["engines"][graph]["profiles"]
        for tensors, parsed in (
            (config.input, [network.get_input(i) for i in range(network.num_inputs)]),
            (config.output, [network.get_output(i) for i in range(network.num_outputs)]),
        ):
            assert [t.name for t in tensors] == [p.name for p in parsed]
            assert [model_config_pb2.DataType.Name(t.data_type) for t in tensors] == [
                types[p.dtype.name] for p in parsed
            ]
            for tensor, tensor_parsed in zip(tensors, parsed):
                dims, fixed = list(tensor.dims), list(tensor_parsed.shape)
                assert len(dims) == len(fixed)
                assert all(d == f for d, f in zip(dims, fixed) if f != -1), (graph, tensor.name, dims, fixed)
                assert all(d in (-1, 1) for d, f in zip(dims, fixed) if f == -1)  # the batch: the profile's
        low, _, high = profile[config.input[0].name]
        assert list(config.input[0].dims) == [a if a == b else -1 for a, b in zip(low, high)]
    entry = text_format.Parse((out / "mobilevlm" / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert {k: v.string_value for k, v in entry.parameters.items()}.items() >= {
        "backend": "trt",
        "vision_model": "mobilevlm_vision",
        "projector_model": "mobilevlm_projector",
    }.items()
    assert entry.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    # The entry model's engines: the bundle's, linked; for the decoder alone (what its runtime loads) the
    # runtime's own check accepts them without a plugin library, and for the projector it asks for one.
    own = out / "mobilevlm" / "1" / "bundle" / "engines"
    record = json.loads((engines_dir / ENGINES_MANIFEST).read_text())  # as now on disk (tests above rebuild)
    assert json.loads((own / ENGINES_MANIFEST).read_text()) == record
    version = record["builder"]["version"]
    decoder = {"decoder": record["engines"]["decoder"]["graph_sha256"]}
    assert check_engines_record(own, "tensorrt-rtx", version, "RTX 3090", 86, None, graphs=decoder)["target"] == TARGET
    if record["plugin"]["mode"] == "plugin":
        projector = {"projector": record["engines"]["projector"]["graph_sha256"]}
        with pytest.raises(ArtifactError, match="holds the PEG plugin"):
            check_engines_record(own, "tensorrt-rtx", version, "RTX 3090", 86, None, graphs=projector)
