"""`mvlm-compile triton BUNDLE --out REPO`: a Triton Inference Server model repository that serves a bundle.

    REPO/
      <name>/                   the entry model: Python backend, decoupled (streams text pieces)
        config.pbtxt            inputs named as Triton's TensorRT-LLM models name them
        1/model.py              mvlm_compile/triton/model.py: answers through mvlm_compile.Session
        1/bundle/artifacts/     the bundle's graphs, embedding table, tokenizer and manifest
        1/bundle/engines/       backend "trt": the bundle's engines and engines.json (the entry
                                model's runtime loads the decoder engine alone)
      <name>_vision/            backend "trt": the vision encoder engine as a `tensorrt` model
      <name>_projector/         backend "trt": the projector engine (its PEG plugin: plugins/)
      plugins/                  the PEG plugin library, when the projector engine holds it
      SERVE.txt                 how to start the server

The repository is self-contained: every file it needs is inside it (hard links where the
filesystem allows, copies otherwise; the bundle's stages replace files by renaming, so a
rebuild of the bundle never changes a repository made from it), only the files the manifest
and engines.json name are taken (resolved inside the bundle), and no config names a path
outside the repository. With backend "trt" the entry model runs the decoder engine itself (our
KV-cache loop) and gets the image embeddings from the two `tensorrt` models through BLS.
"""

from __future__ import annotations

import errno
import os
import re
import shlex
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvlm_compile import contract
from mvlm_compile.bundle import default_engines_dir, resolve_artifacts
from mvlm_compile.engines_record import ENGINES_MANIFEST, PEG_PLUGIN, engine_path, require_engines_record
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.fileio import atomic_output_dir, sha256_file, write_bytes
from mvlm_compile.manifest import MANIFEST_NAME, Manifest, load_manifest
from mvlm_compile.peg_op import PLUGIN_LIBRARY, PluginLibraryError, find_plugin_library
from mvlm_compile.runtime.backend import BACKENDS
from mvlm_compile.runtime.ort_backend import check_int4_activations, check_threads
from mvlm_compile.runtime.scheduler import DEFAULT_PREFILL_CHUNK

KIND = "triton-repository"  # the marker of a directory this command wrote
MODEL_PY = Path(__file__).with_name("model.py")
VERSION = "1"
BUNDLE_DIR = "bundle"  # under the entry model's version directory
PLUGINS_DIR = "plugins"
SERVE_NOTE = "SERVE.txt"
ENGINE_FILE = "model.plan"  # the tensorrt backend's default file name

# The entry model's I/O: the names, types and shapes of Triton's TensorRT-LLM models (text_input,
# max_tokens, stream, temperature, top_p, random_seed, stop_words -> text_output), so their clients
# and genai-perf work unchanged, plus the image as its encoded bytes (PNG, JPEG...).
TEXT_INPUT, IMAGE_INPUT, TEXT_OUTPUT = "text_input", "image", "text_output"
ENTRY_INPUTS = [
    # name, Triton type, dims (after the batch dimension), optional
    (TEXT_INPUT, "TYPE_STRING", [1], False),
    (IMAGE_INPUT, "TYPE_UINT8", [-1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("stream", "TYPE_BOOL", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("random_seed", "TYPE_UINT64", [1], True),
    ("stop_words", "TYPE_STRING", [-1], True),
]
TRITON_TYPES = {"float16": "TYPE_FP16", "float32": "TYPE_FP32", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}
MODEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}")
Progress = Callable[[str], None]


@dataclass
class TritonRepository:
    path: Path
    model_name: str  # the entry model clients call
    backend: str
    models: list[str]  # every model in the repository, the entry model first
    plugin: str | None  # the PEG plugin library, relative to the repository (the server loads it)

    def server_command(self, repository: str | None = None) -> str:
        """The shell command that serves it (`repository`: the path the server sees, default this one)."""
        where = repository or str(self.path)
        argv = ["tritonserver", "--model-repository", where]
        if self.plugin:
            argv.append(f"--backend-config=tensorrt,plugins={where}/{self.plugin}")
        return shlex.join(argv)  # pasted into a shell: a path's ';' or spaces stay part of the path

    def to_json(self) -> dict[str, Any]:
        return {
            "repository": str(self.path),
            "model": self.model_name,
            "backend": self.backend,
            "models": self.models,
            "plugin": self.plugin,
            "server_command": self.server_command(),
        }


def make_repository(
    bundle: Path,
    out: Path,
    backend: str = "ort",
    engines: Path | None = None,
    instances: int = 1,
    model_name: str = "mobilevlm",
    max_tokens: int = 128,
    threads: int = 0,
    int4_activations: str = "int8",
    progress: Progress = lambda msg: None,
    plugin: Path | None = None,
    max_batch: int | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
    prefix_cache_mib: float | None = None,
) -> TritonRepository:
    """Write the model repository `out` for `bundle` (a bundle or an artifacts directory). `plugin`:
    the PEG plugin library the user chose (--plugin; else $MVLM_PEG_PLUGIN or this installation's
    build, never one found in the bundle), copied into the repository when the projector holds it.
    `max_batch`, `prefill_chunk`, `prefix_cache_mib`: the entry model's Session (requests decoded
    together, kept prefixes reused; see Session)."""
    if backend not in BACKENDS:
        raise MvlmError(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if instances < 1:
        raise MvlmError(f"--instances {instances}: expected 1 or more")
    if not MODEL_NAME.fullmatch(model_name):
        raise MvlmError(f"--model-name {model_name!r}: expected letters, digits, '_', '.', '-' (not first)")
    if max_tokens < 1:
        raise MvlmError(f"--max-tokens {max_tokens}: expected 1 or more")
    if max_batch is not None and max_batch < 1:
        raise MvlmError(f"--max-batch {max_batch}: expected 1 or more")
    if prefill_chunk < 1:
        raise MvlmError(f"--prefill-chunk {prefill_chunk}: expected 1 or more")
    if prefix_cache_mib is not None and not prefix_cache_mib >= 0:
        raise MvlmError(f"--prefix-cache-mib {prefix_cache_mib}: expected 0 (no prefix reuse) or more MiB")
    check_threads(threads)  # what the entry model's runtime will be given
    check_int4_activations(int4_activations)
    bundle_dir, artifacts = resolve_artifacts(Path(bundle))
    manifest = load_manifest(artifacts)
    if max_tokens >= int(manifest.model["max_context"]):
        raise MvlmError(f"--max-tokens {max_tokens}: the model's context is {manifest.model['max_context']}")
    record, engines_dir = None, None
    if backend == "trt":
        engines_dir = Path(engines) if engines is not None else default_engines_dir(bundle_dir)
        record = require_engines_record(engines_dir)
        missing = [name for name in ("vision", "projector", "decoder") if name not in record["engines"]]
        if missing:
            raise ArtifactError(f"{engines_dir / ENGINES_MANIFEST}: no {', '.join(missing)} engine")

    with atomic_output_dir(Path(out), KIND, inputs=[bundle_dir]) as tmp:
        version_dir = tmp / model_name / VERSION
        version_dir.mkdir(parents=True)
        shutil.copyfile(MODEL_PY, version_dir / "model.py")
        progress(f"{model_name}: linking the bundle's artifacts")
        _link_artifacts(artifacts, manifest, version_dir / BUNDLE_DIR / "artifacts")
        parameters = {
            "backend": backend,
            "max_tokens": str(max_tokens),
            "threads": str(threads),
            "int4_activations": int4_activations,
            "max_batch": "" if max_batch is None else str(max_batch),  # "": the Session's default
            "prefill_chunk": str(prefill_chunk),
            "prefix_cache_mib": "" if prefix_cache_mib is None else str(prefix_cache_mib),  # "": the default
        }
        models, repository_plugin = [model_name], None
        if record is not None and engines_dir is not None:
            vision, projector = f"{model_name}_vision", f"{model_name}_projector"
            names = {"vision": vision, "projector": projector}
            repository_plugin = _engine_models(tmp, engines_dir, record, manifest, names, plugin)
            _link_engines(engines_dir, record, version_dir / BUNDLE_DIR / "engines")
            parameters.update(vision_model=vision, projector_model=projector)
            models += [vision, projector]
        kind = "KIND_GPU" if backend == "trt" else "KIND_CPU"
        write_bytes(tmp / model_name / "config.pbtxt", entry_config(model_name, instances, kind, parameters).encode())
        result = TritonRepository(Path(out), model_name, backend, models, repository_plugin)
        write_bytes(tmp / SERVE_NOTE, serve_note(result).encode())
    return result


def entry_config(name: str, instances: int, kind: str, parameters: dict[str, str]) -> str:
    """config.pbtxt of the decoupled Python model. max_batch_size 1: requests carry a batch
    dimension of one, as TensorRT-LLM's clients send them ([1, 1] for a scalar), never batched."""
    lines = [
        f'name: "{name}"',
        'backend: "python"',
        "max_batch_size: 1",
        "model_transaction_policy { decoupled: true }",
        "input [",
        ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: {_dims(d)}{" optional: true" if o else ""} }}'
            for n, t, d, o in ENTRY_INPUTS
        ),
        "]",
        f'output [ {{ name: "{TEXT_OUTPUT}" data_type: TYPE_STRING dims: [ -1 ] }} ]',
        f"instance_group [ {{ count: {instances} kind: {kind}{' gpus: [ 0 ]' if kind == 'KIND_GPU' else ''} }} ]",
    ]
    lines += [f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}' for k, v in parameters.items()]
    return "\n".join(lines) + "\n"


def engine_config(name: str, engine: dict[str, Any], output_dims: dict[str, list[int]]) -> str:
    """config.pbtxt of a `tensorrt` model, from the engine's record: its I/O names and types, and
    each input's dims from its optimisation profile (-1 where min and max differ). The batch is
    part of the engine's shapes (explicit batch), so max_batch_size is 0."""
    (profile,) = engine["profiles"]  # vision and projector are built with one profile
    inputs = []
    for item in engine["inputs"]:
        low, _, high = profile[item["name"]]
        dims = [a if a == b else -1 for a, b in zip(low, high)]
        inputs.append(f'  {{ name: "{item["name"]}" data_type: {_triton_type(item)} dims: {_dims(dims)} }}')
    outputs = [
        f'  {{ name: "{item["name"]}" data_type: {_triton_type(item)} dims: {_dims(output_dims[item["name"]])} }}'
        for item in engine["outputs"]
    ]
    return (
        "\n".join(
            [
                f'name: "{name}"',
                'backend: "tensorrt"',
                "max_batch_size: 0",
                f'default_model_filename: "{ENGINE_FILE}"',
                "input [",
                ",\n".join(inputs),
                "]",
                "output [",
                ",\n".join(outputs),
                "]",
                "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]",
            ]
        )
        + "\n"
    )


def engine_output_dims(record: dict[str, Any], manifest: Manifest) -> dict[str, list[int]]:
    """The vision and projector outputs' dims. The graphs record some of them symbolically; the
    contract fixes them: the vision output is the projector's input (its profile's shape), the
    projector's is [batch, image tokens, hidden]."""
    (projector,) = record["engines"]["projector"]["profiles"]
    low, _, high = projector[contract.PROJECTOR_INPUT]
    features = [a if a == b else -1 for a, b in zip(low, high)]
    model = manifest.model
    return {
        contract.VISION_OUTPUT: features,
        contract.PROJECTOR_OUTPUT: [features[0], int(model["image_tokens"]), int(model["hidden_size"])],
    }


def serve_note(repository: TritonRepository) -> str:
    model = repository.model_name
    lines = [
        f"Triton model repository for {model} (backend {repository.backend}), made by mvlm-compile.",
        "",
        "Start the server, standing in the directory that holds this repository:",
        f"  {repository.server_command(repository.path.name)}",
        "",
        "The Python that Triton's Python backend runs must have mvlm-compile installed (pip install mvlm-compile).",
        f"Request: {TEXT_INPUT} (STRING), {IMAGE_INPUT} (UINT8, the encoded image file), optional max_tokens (INT32),",
        "stream (BOOL), temperature, top_p (FP32), random_seed (UINT64), stop_words (STRING);",
        f"response: {TEXT_OUTPUT} (STRING), one text piece per response when stream is true.",
    ]
    if repository.backend == "trt":
        lines += [
            "",
            "The engines run only with the TensorRT version that built them, on a GPU of their compute",
            "capability: use the Triton release whose TensorRT built them (engines.json records it).",
        ]
    return "\n".join(lines) + "\n"


def _engine_models(
    repository: Path,
    engines_dir: Path,
    record: dict[str, Any],
    manifest: Manifest,
    names: dict[str, str],
    plugin: Path | None,
) -> str | None:
    """The vision and projector engines as `tensorrt` models; returns the plugin library's path in
    the repository when the projector engine holds the PEG plugin."""
    output_dims = engine_output_dims(record, manifest)
    for graph, name in names.items():
        engine = record["engines"][graph]
        (repository / name / VERSION).mkdir(parents=True)
        _link(engine_path(engines_dir, record, graph), repository / name / VERSION / ENGINE_FILE)
        write_bytes(repository / name / "config.pbtxt", engine_config(name, engine, output_dims).encode())
    if record["plugin"].get("mode") != PEG_PLUGIN:
        return None
    try:
        library = find_plugin_library(plugin)
    except PluginLibraryError as e:
        raise ArtifactError(
            f"{engines_dir / ENGINES_MANIFEST}: the projector engine holds the PEG plugin: {e}"
        ) from None
    if sha256_file(library) != record["plugin"].get("sha256"):
        raise ArtifactError(
            f"{engines_dir / ENGINES_MANIFEST}: the projector was built with another PEG plugin than {library}"
        )
    (repository / PLUGINS_DIR).mkdir()
    _link(library, repository / PLUGINS_DIR / PLUGIN_LIBRARY)
    return f"{PLUGINS_DIR}/{PLUGIN_LIBRARY}"


def _link_engines(engines_dir: Path, record: dict[str, Any], out: Path) -> None:
    """The entry model's engines directory: the bundle's engines and engines.json as they are (linked,
    so no disk); the entry model's runtime loads the decoder engine alone (Session's image_embedder)."""
    out.mkdir(parents=True)
    for name in record["engines"]:
        _link(engine_path(engines_dir, record, name), out / record["engines"][name]["file"])
    _link(engines_dir / ENGINES_MANIFEST, out / ENGINES_MANIFEST)


def _link_artifacts(artifacts: Path, manifest: Manifest, out: Path) -> None:
    """The files the manifest names (graphs with their external weights, embedding table,
    tokenizer) and the manifest itself, linked (the weights' data files copied); never the FP32
    reference graphs verify keeps."""
    out.mkdir(parents=True)
    files = [manifest.graph_path(artifacts, name) for name in manifest.graphs]
    files += [Path(f"{path}.data") for path in files if Path(f"{path}.data").is_file()]
    files += [manifest.file_path(artifacts, key) for key in manifest.files]
    for path in [artifacts / MANIFEST_NAME, *files]:
        target = out / path.relative_to(artifacts)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name.endswith(".onnx.data"):
            # Copied, never linked: onnx refuses external weights in a file of several hard links (a
            # "hardlink attack"), so a linked one failed the first request of every full-size model.
            shutil.copyfile(path, target)
        else:
            _link(path, target)


def _link(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows, a copy otherwise (another filesystem, no links)."""
    try:
        os.link(source, target)
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copyfile(source, target)


def _dims(dims: list[int]) -> str:
    return "[ " + ", ".join(str(int(d)) for d in dims) + " ]"


def _triton_type(item: dict[str, Any]) -> str:
    if item["dtype"] not in TRITON_TYPES:
        raise ArtifactError(
            f"{ENGINES_MANIFEST}: tensor {item['name']!r} has type {item['dtype']}, not one Triton takes"
        )
    return TRITON_TYPES[item["dtype"]]
