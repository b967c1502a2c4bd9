"""The artifacts manifest: what each stage produced, carried from stage to stage (and to the Jetson).

`manifest.json` in an artifacts directory records the model's geometry, the graphs with
their content hashes and I/O, and per stage the hash of its inputs so that later stages
(and `build`) can tell what is current. Torch-free.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_compile import __version__
from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import (
    deferred_signals,
    directory_lock,
    make_temp_dir,
    read_json_object,
    safe_join,
    sha256_graph,
    write_json,
)

MANIFEST_NAME = "manifest.json"
FORMAT = "mvlm-compile-artifacts"
FORMAT_VERSION = 1
GRAPH_KEYS = ("file", "sha256", "dtype", "inputs", "outputs")
# The model record's integers the runtime and the build rely on.
MODEL_INTS = (
    "hidden_size", "mm_hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size",
    "max_context", "image_tokens", "image_token_index", "bos_token_id", "eos_token_id",
)  # fmt: skip


@dataclass
class Manifest:
    model: dict[str, Any]  # geometry and token ids the runtime needs
    graphs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {file, sha256, dtype, inputs, outputs}
    files: dict[str, str] = field(default_factory=dict)  # other artifacts: embed table, tokenizer
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> record

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "mvlm_compile_version": __version__,
            "model": self.model,
            "graphs": self.graphs,
            "files": self.files,
            "stages": self.stages,
        }

    def save(self, directory: Path) -> None:
        write_json(Path(directory) / MANIFEST_NAME, self.to_json())

    def graph_path(self, directory: Path, name: str) -> Path:
        if name not in self.graphs:
            raise ArtifactError(f"{Path(directory) / MANIFEST_NAME}: no graph {name!r} (has {sorted(self.graphs)})")
        return safe_join(directory, self.graphs[name]["file"], Path(directory) / MANIFEST_NAME)

    def file_path(self, directory: Path, key: str) -> Path:
        """An artifact other than a graph (embed_tokens, tokenizer)."""
        if key not in self.files:
            raise ArtifactError(f"{Path(directory) / MANIFEST_NAME}: no file {key!r} (has {sorted(self.files)})")
        return safe_join(directory, self.files[key], Path(directory) / MANIFEST_NAME)

    def graph_hashes(self, directory: Path) -> dict[str, str]:
        """SHA-256 of every graph as it is on disk now, external weights (<graph>.onnx.data) included."""
        return {name: sha256_graph(self.graph_path(directory, name)) for name in self.graphs}

    def check_graph(self, directory: Path, name: str) -> Path:
        """The graph's path, once its content is what the manifest recorded: a graph modified,
        replaced or left half-written by an interrupted stage is refused before it is used or rewritten."""
        path = self.graph_path(directory, name)
        if sha256_graph(path) != self.graphs[name]["sha256"]:
            raise ArtifactError(
                f"{path}: content differs from {MANIFEST_NAME} (modified, or an interrupted stage): "
                "re-export, or rebuild the bundle from the checkpoint"
            )
        return path

    def input_dtype(self, graph: str, name: str) -> type:
        """NumPy type of a graph input, as recorded when the graph was written (no session needed)."""
        for item in self.graphs[graph]["inputs"]:
            if item["name"] == name:
                return np.dtype(item["dtype"]).type
        raise ArtifactError(f"{MANIFEST_NAME}: graph {graph!r} has no input {name!r}")

    def record_graph(self, directory: Path, name: str, file: str, dtype: str, inputs: list, outputs: list) -> None:
        self.graphs[name] = {
            "file": file,
            "sha256": sha256_graph(safe_join(directory, file, Path(directory) / MANIFEST_NAME)),
            "dtype": dtype,
            "inputs": inputs,
            "outputs": outputs,
        }


def load_manifest(directory: Path) -> Manifest:
    """Read and check an artifacts manifest: its structure, that every name stays inside the
    directory, and that every listed file exists."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    if not (directory / MANIFEST_NAME).exists() and directory.is_dir():
        raise ArtifactError(f"{path}: missing (not an mvlm-compile artifacts directory)")
    data = read_json_object(path, "the artifacts manifest", required=("format", "format_version", "model"))
    if data["format"] != FORMAT:
        raise ArtifactError(f"{path}: format is {data['format']!r}, expected {FORMAT!r}")
    if data["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {data['format_version']} but this mvlm-compile reads {FORMAT_VERSION}"
        )
    parts = {key: data.get(key, {}) for key in ("model", "graphs", "files", "stages")}
    for key, value in parts.items():
        if not isinstance(value, dict):
            raise ArtifactError(f"{path}: corrupt, {key!r} is a {type(value).__name__}, expected an object")
    bad = [k for k in MODEL_INTS if not isinstance(parts["model"].get(k), int) or isinstance(parts["model"][k], bool)]
    if bad:
        raise ArtifactError(f"{path}: corrupt, model record lacks integer {', '.join(bad)}")
    for name, graph in parts["graphs"].items():
        if not isinstance(graph, dict) or any(k not in graph for k in GRAPH_KEYS):
            raise ArtifactError(f"{path}: corrupt, graph {name!r} lacks some of {', '.join(GRAPH_KEYS)}")
    manifest = Manifest(parts["model"], parts["graphs"], parts["files"], parts["stages"])
    listed = [manifest.graph_path(directory, g) for g in manifest.graphs]
    listed += [manifest.file_path(directory, f) for f in manifest.files]
    missing = [p.name for p in listed if not p.is_file()]
    if missing:
        raise ArtifactError(f"{directory}: files listed in {MANIFEST_NAME} are missing: {missing}")
    return manifest


REFERENCE_DIR = "reference"


def keep_reference(directory: Path) -> Path | None:
    """Before the first in-place rewrite, keep the exported graphs in `reference/` for verify's
    divergence search and the accuracy report. Returns the reference directory, or None if one exists.

    Files are hard links: no extra disk, since rewrites replace files rather than edit them. A
    graph's external weights (`<graph>.onnx.data`) are the exception: onnx refuses to load a data
    file that has several links (its guard against hard-link attacks), so the data file is *moved*
    into reference/ when its graph is first replaced (replace_graph), still at no extra disk.
    Until then the reference graph is the artifacts' own, unchanged (reference_graph_path).

    Only graphs as exported make a reference: once a stage has rewritten them (a bundle copied
    without its reference/, as the docs allow), none is made from the optimized or INT4
    graphs, which would then be judged against themselves; verify and quantize --golden go
    without (the export is the only right source: re-export to have one)."""
    directory = Path(directory)
    reference = directory / REFERENCE_DIR
    if (reference / MANIFEST_NAME).exists():
        return None
    with directory_lock(directory):
        if set(load_manifest(directory).stages) - {"export"}:
            return None
        return _make_reference(directory, reference)


def _make_reference(directory: Path, reference: Path) -> Path:
    manifest = load_manifest(directory)
    reference.mkdir(exist_ok=True)
    for name in [g["file"] for g in manifest.graphs.values()] + list(manifest.files.values()):
        target = reference / name
        target.unlink(missing_ok=True)
        try:
            os.link(directory / name, target)
        except OSError:  # no hard links here (another filesystem): copy, external data included
            shutil.copy2(directory / name, target)
            if (directory / f"{name}.data").exists():
                shutil.copy2(directory / f"{name}.data", reference / f"{name}.data")
    manifest.save(reference)  # last: its presence marks a complete reference
    return reference


def replace_graph(directory: Path, file: str, staged: Path) -> None:
    """Move a rewritten graph (`staged/<file>` and its `.data`, if any) over `directory/<file>`.

    When the reference is kept and does not hold the original's external data yet, the data file
    moves there first (see keep_reference). A stale `.data` of the old graph is removed when the
    new one has its weights inline."""
    directory, staged = Path(directory), Path(staged)
    data = directory / f"{file}.data"
    reference = directory / REFERENCE_DIR
    kept = reference / file
    if (
        (reference / MANIFEST_NAME).exists()
        and data.exists()
        and not (reference / f"{file}.data").exists()
        and kept.exists()
        and os.path.samefile(kept, directory / file)  # the reference holds this very graph
    ):
        os.replace(data, reference / f"{file}.data")
    if (staged / f"{file}.data").exists():
        os.replace(staged / f"{file}.data", data)
    else:
        data.unlink(missing_ok=True)
    os.replace(staged / file, directory / file)


def reference_graph_path(reference: Path, name: str) -> Path:
    """Graph `name` of a reference directory. For the reference kept inside an artifacts directory,
    a graph never replaced has not had its external data moved in yet (see keep_reference): then
    it is the artifacts' own graph, unchanged."""
    reference = Path(reference)
    path = load_manifest(reference).graph_path(reference, name)
    artifacts = reference.parent
    if reference.name == REFERENCE_DIR and not path.with_name(f"{path.name}.data").exists():
        if (artifacts / f"{path.name}.data").exists():
            return load_manifest(artifacts).graph_path(artifacts, name)
    return path


IN_PLACE_STAGES = ("optimize", "quantize")  # the stages that rewrite the graphs in place, in this order


def restore_export(directory: Path) -> bool:
    """Put the exported graphs kept in `reference/` back in place of the rewritten ones and forget
    the in-place stages, so that they run again from the export (`build --force`: quantizing the
    INT4 graphs again would be refused). Returns False, changing nothing, when reference/ holds no
    export (it may be left out when a bundle is copied). The graphs are copied (external data
    included), so the reference stays as it was."""
    directory = Path(directory)
    reference = directory / REFERENCE_DIR
    with directory_lock(directory):
        if not (reference / MANIFEST_NAME).exists():
            return False
        kept = load_manifest(reference)
        if any(stage in kept.stages for stage in IN_PLACE_STAGES):
            return False  # kept after a rewrite: not the export
        manifest = load_manifest(directory)
        staging = make_temp_dir(directory, prefix=".restore.", suffix=".tmp")
        try:
            restored = []
            for name, graph in kept.graphs.items():
                source = reference_graph_path(reference, name)
                if sha256_graph(source) != graph["sha256"]:
                    raise ArtifactError(f"{source}: content differs from {reference / MANIFEST_NAME}")
                if source.parent.resolve() == directory.resolve():
                    continue  # never rewritten: the artifacts' graph is the export
                for suffix in ("", ".data"):
                    if Path(f"{source}{suffix}").exists():
                        shutil.copyfile(f"{source}{suffix}", staging / f"{graph['file']}{suffix}")
                restored.append(name)
            with deferred_signals():
                for name in restored:
                    replace_graph(directory, kept.graphs[name]["file"], staging)
                manifest.graphs = kept.graphs
                manifest.stages = {k: v for k, v in manifest.stages.items() if k not in IN_PLACE_STAGES}
                manifest.save(directory)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return True
