"""The artifacts manifest: what each stage produced, carried from stage to stage (and to the Jetson).

`manifest.json` in an artifacts directory records the model's geometry, the graphs with
their content hashes and I/O, and per stage the hash of its inputs so that later stages
(and `build`) can tell what is current. Torch-free.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvlm_compile import __version__
from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import sha256_graph, write_json

MANIFEST_NAME = "manifest.json"
FORMAT = "mvlm-compile-artifacts"
FORMAT_VERSION = 1


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
        return Path(directory) / self.graphs[name]["file"]

    def graph_hashes(self, directory: Path) -> dict[str, str]:
        """SHA-256 of every graph as it is on disk now, external weights (<graph>.onnx.data) included."""
        return {name: sha256_graph(self.graph_path(directory, name)) for name in self.graphs}

    def input_dtype(self, graph: str, name: str) -> type:
        """NumPy type of a graph input, as recorded when the graph was written (no session needed)."""
        for item in self.graphs[graph]["inputs"]:
            if item["name"] == name:
                return np.dtype(item["dtype"]).type
        raise ArtifactError(f"{MANIFEST_NAME}: graph {graph!r} has no input {name!r}")

    def record_graph(self, directory: Path, name: str, file: str, dtype: str, inputs: list, outputs: list) -> None:
        self.graphs[name] = {
            "file": file,
            "sha256": sha256_graph(Path(directory) / file),
            "dtype": dtype,
            "inputs": inputs,
            "outputs": outputs,
        }


def load_manifest(directory: Path) -> Manifest:
    """Read and check an artifacts manifest, including that every listed file exists."""
    path = Path(directory) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing (not an mvlm-compile artifacts directory)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if data.get("format") != FORMAT:
        raise ArtifactError(f"{path}: format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(
            f"{path}: format_version {data.get('format_version')} but this mvlm-compile reads {FORMAT_VERSION}"
        )
    manifest = Manifest(data["model"], data.get("graphs", {}), data.get("files", {}), data.get("stages", {}))
    listed = [g["file"] for g in manifest.graphs.values()] + list(manifest.files.values())
    missing = [f for f in listed if not (Path(directory) / f).exists()]
    if missing:
        raise ArtifactError(f"{Path(directory)}: files listed in {MANIFEST_NAME} are missing: {missing}")
    return manifest


REFERENCE_DIR = "reference"


def keep_reference(directory: Path) -> Path | None:
    """Before the first in-place rewrite, keep the exported graphs in `reference/` (hard links:
    no extra disk, since rewrites replace files rather than edit them). verify's divergence
    search compares against it. Returns the reference directory, or None if one exists."""
    directory = Path(directory)
    reference = directory / REFERENCE_DIR
    if (reference / MANIFEST_NAME).exists():
        return None
    manifest = load_manifest(directory)
    reference.mkdir(exist_ok=True)
    files = [g["file"] for g in manifest.graphs.values()] + list(manifest.files.values())
    files += [f"{g['file']}.data" for g in manifest.graphs.values() if (directory / f"{g['file']}.data").exists()]
    for name in files:
        target = reference / name
        target.unlink(missing_ok=True)
        try:
            os.link(directory / name, target)
        except OSError:  # another filesystem or no hard links: copy
            shutil.copy2(directory / name, target)
    manifest.save(reference)  # last: its presence marks a complete reference
    return reference
