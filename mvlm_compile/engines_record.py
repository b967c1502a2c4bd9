"""engines.json: what was built, from what, for which TensorRT, GPU and plugin (torch-free).

Written by the engine stage (mvlm_compile.engine), read by the TensorRT backend before it loads
an engine: engines are not portable between TensorRT versions, GPUs or plugin builds, so a
mismatch is refused with the reason rather than failing inside TensorRT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mvlm_compile import __version__
from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import read_json_object, safe_join, sha256_file, write_json

ENGINES_MANIFEST = "engines.json"
KIND = "mvlm-compile engines"
# The decoder engine's optimisation profiles, in this order (mvlm_compile.engine.plan builds them).
PREFILL_PROFILE, DECODE_PROFILE = 0, 1


def write_engines_record(engines_dir: Path, record: dict[str, Any]) -> None:
    """Write engines.json (`record`: tensorrt_version, gpu, target, plugin, settings, engines...)."""
    write_json(Path(engines_dir) / ENGINES_MANIFEST, {"kind": KIND, "mvlm_compile_version": __version__, **record})


REQUIRED = ("tensorrt_version", "gpu", "plugin", "engines")


def read_engines_record(engines_dir: Path) -> dict[str, Any] | None:
    """The record, checked (structure, engine file names inside the directory), or None when there is none."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    if not path.exists():
        return None
    record = read_json_object(path, "the engines record", required=REQUIRED)
    if (
        not isinstance(record["engines"], dict)
        or not isinstance(record["gpu"], dict)
        or not isinstance(record["plugin"], dict)
    ):
        raise ArtifactError(f"{path}: corrupt, 'engines', 'gpu' and 'plugin' must be objects")
    for name, engine in record["engines"].items():
        if not isinstance(engine, dict) or "file" not in engine or "sha256" not in engine:
            raise ArtifactError(f"{path}: corrupt, engine {name!r} lacks 'file' or 'sha256'")
        safe_join(engines_dir, engine["file"], path)
    return record


def engine_path(engines_dir: Path, record: dict[str, Any], name: str) -> Path:
    """The file of engine `name`, inside `engines_dir` (names from engines.json are not trusted)."""
    return safe_join(engines_dir, record["engines"][name]["file"], Path(engines_dir) / ENGINES_MANIFEST)


def check_engines_record(
    engines_dir: Path, tensorrt_version: str, gpu_name: str | None, gpu_sm: int | None, plugin_path: Path
) -> dict:
    """engines.json must match this TensorRT, GPU and plugin, and every engine its recorded hash."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    record = read_engines_record(engines_dir)
    if record is None:
        raise ArtifactError(f"{path}: missing (build the engines with `mvlm-compile build --target ...`)")
    if record["tensorrt_version"] != tensorrt_version:
        raise ArtifactError(
            f"{path}: engines built with TensorRT {record['tensorrt_version']}, this is {tensorrt_version}: rebuild"
        )
    if gpu_sm is None or record["gpu"]["sm"] != gpu_sm:
        here = f"{gpu_name} (SM {gpu_sm})" if gpu_sm is not None else "no GPU"
        raise ArtifactError(
            f"{path}: engines built for SM {record['gpu']['sm']} ({record['gpu']['name']}), this is {here}: rebuild"
        )
    if record["plugin"]["sha256"] != sha256_file(plugin_path):
        raise ArtifactError(f"{path}: built with another PEG plugin library than {plugin_path} (hash differs): rebuild")
    for name in record["engines"]:
        file = engine_path(engines_dir, record, name)
        if not file.is_file() or sha256_file(file) != record["engines"][name]["sha256"]:
            raise ArtifactError(f"{file}: missing or its content differs from {ENGINES_MANIFEST} (corrupt or replaced)")
    return record
