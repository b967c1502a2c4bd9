"""engines.json: what was built, from what, by which TensorRT builder, for which GPU and plugin (torch-free).

Written by the engine stage (mvlm_compile.engine), read by the TensorRT backend before it loads
an engine: engines are not portable between builder flavours (TensorRT, TensorRT-RTX), their
versions, compute capabilities or plugin builds, so a mismatch is refused with the reason rather
than failing inside TensorRT. Engines built from other graphs than the artifacts' manifest
describes (another model) are refused too, and the plugin library's hash is checked before the
library is loaded (loading runs its code). The decoder's optimisation profiles recorded here are also the
prompt and context limits the runtime enforces (`decoder_limits`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvlm_compile import __version__, contract
from mvlm_compile.errors import ArtifactError, MvlmError
from mvlm_compile.fileio import read_json_object, safe_join, sha256_file, write_json

ENGINES_MANIFEST = "engines.json"
KIND = "mvlm-compile engines"
# The decoder engine's optimisation profiles, in this order (mvlm_compile.engine.plan builds them).
PREFILL_PROFILE, DECODE_PROFILE = 0, 1
# How the projector's PEG op was built: as the MvlmPEG plugin, or as a native depthwise Conv.
PEG_PLUGIN, PEG_NATIVE = "plugin", "native"


def write_engines_record(engines_dir: Path, record: dict[str, Any]) -> None:
    """Write engines.json (`record`: builder, gpu, target, plugin, settings, engines...)."""
    write_json(Path(engines_dir) / ENGINES_MANIFEST, {"kind": KIND, "mvlm_compile_version": __version__, **record})


REQUIRED = ("plugin", "engines")


def read_engines_record(engines_dir: Path) -> dict[str, Any] | None:
    """The record, checked (structure, engine file names inside the directory), or None when there is none."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    if not path.exists():
        return None
    record = read_json_object(path, "the engines record")
    if "builder" not in record:
        return record  # written before builder flavours: require_engines_record says to rebuild
    record = read_json_object(path, "the engines record", required=REQUIRED)
    if not isinstance(record["engines"], dict) or not isinstance(record["plugin"], dict):
        raise ArtifactError(f"{path}: corrupt, 'engines' and 'plugin' must be objects")
    for name, engine in record["engines"].items():
        if not isinstance(engine, dict) or "file" not in engine or "sha256" not in engine:
            raise ArtifactError(f"{path}: corrupt, engine {name!r} lacks 'file' or 'sha256'")
        safe_join(engines_dir, engine["file"], path)
    return record


def engine_path(engines_dir: Path, record: dict[str, Any], name: str) -> Path:
    """The file of engine `name`, inside `engines_dir` (names from engines.json are not trusted)."""
    return safe_join(engines_dir, record["engines"][name]["file"], Path(engines_dir) / ENGINES_MANIFEST)


def require_engines_record(engines_dir: Path) -> dict[str, Any]:
    """The record, which must exist and name its builder (records before builder flavours do not)."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    record = read_engines_record(engines_dir)
    if record is None:
        raise ArtifactError(f"{path}: missing (build the engines with `mvlm-compile build --target ...`)")
    if "builder" not in record:
        raise ArtifactError(
            f"{path}: written by mvlm-compile {record.get('mvlm_compile_version')}, which did not "
            "record the builder: rebuild the engines"
        )
    return record


def check_engines_record(
    engines_dir: Path,
    flavour: str,
    version: str,
    gpu_name: str | None,
    gpu_sm: int | None,
    plugin_path: Path | None,
    *,
    graphs: dict[str, str],
) -> dict:
    """engines.json must describe engines built from `graphs` (name -> SHA-256 in the artifacts'
    manifest: the graphs to be run), by this builder flavour and version, for this GPU's compute
    capability, with the plugin library at `plugin_path` (when the projector, among `graphs`, holds
    the plugin; checked before anything loads it), and every engine file must have its recorded hash."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    record = require_engines_record(engines_dir)
    check_source_graphs(engines_dir, record, graphs)
    builder = record["builder"]
    if builder["flavour"] != flavour:
        raise ArtifactError(f"{path}: engines built with {builder['flavour']}, this runtime is {flavour}: rebuild")
    if builder["version"] != version:
        raise ArtifactError(f"{path}: engines built with {flavour} {builder['version']}, this is {version}: rebuild")
    if gpu_sm is None or builder["sm"] != gpu_sm:
        here = f"{gpu_name} (SM {gpu_sm})" if gpu_sm is not None else "no GPU"
        raise ArtifactError(
            f"{path}: engines built for compute capability {builder['compute_capability']} "
            f"({record['target']}), this is {here}: rebuild"
        )
    if "projector" in graphs:
        check_plugin_library(engines_dir, record, plugin_path)
    stale = stale_engines(engines_dir, record)
    if stale:
        raise ArtifactError(f"{stale[0]}: missing or its content differs from {ENGINES_MANIFEST} (corrupt or replaced)")
    return record


def check_source_graphs(engines_dir: Path, record: dict[str, Any], graphs: dict[str, str]) -> None:
    """Every graph of the artifacts (name -> SHA-256 in their manifest) has an engine built from
    exactly that graph: engines of another model, or of graphs rewritten since, are refused."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    for name, sha256 in graphs.items():
        engine = record["engines"].get(name)
        if engine is None:
            raise ArtifactError(f"{path}: no {name} engine (has {sorted(record['engines'])}): rebuild")
        if "graph_sha256" not in engine:
            raise ArtifactError(
                f"{path}: written by mvlm-compile {record.get('mvlm_compile_version')}, which did not record the "
                f"graph each engine was built from: rebuild the engines"
            )
        if engine["graph_sha256"] != sha256:
            raise ArtifactError(
                f"{path}: the {name} engine was built from another {name} graph than the artifacts' manifest "
                "describes (engines of another model, or graphs rebuilt since): rebuild the engines"
            )


def check_plugin_library(engines_dir: Path, record: dict[str, Any], plugin_path: Path | None) -> None:
    """When the projector engine holds the PEG plugin: `plugin_path` (the library the user chose)
    has the SHA-256 the engines were built with. Called before the library is loaded, since
    loading runs its code: a library that is not the recorded one never is."""
    path = Path(engines_dir) / ENGINES_MANIFEST
    if record["plugin"].get("mode") != PEG_PLUGIN:
        return
    if plugin_path is None:
        raise ArtifactError(
            f"{path}: the projector engine holds the PEG plugin: pass --plugin PATH (or set $MVLM_PEG_PLUGIN) "
            "to the library it was built with; a library in a bundle or an engines directory is never loaded "
            "unless named"
        )
    if record["plugin"].get("sha256") != sha256_file(plugin_path):
        raise ArtifactError(
            f"{path}: built with another PEG plugin library than {plugin_path} (SHA-256 differs), so it was not "
            "loaded: give the library the engines were built with, or rebuild"
        )


def stale_engines(engines_dir: Path, record: dict[str, Any]) -> list[Path]:
    """Engine files missing or whose content is not what engines.json records (replaced, corrupt,
    or written by a build killed before it wrote engines.json)."""
    stale = []
    for name, engine in record["engines"].items():
        file = engine_path(engines_dir, record, name)
        if not file.is_file() or sha256_file(file) != engine["sha256"]:
            stale.append(file)
    return stale


@dataclass(frozen=True)
class TokenLimits:
    """The longest prompt (image tokens included) one prefill takes, and the longest prompt +
    generated tokens, with where these limits come from (for the message)."""

    max_prompt: int
    context: int
    source: str
    max_batch: int = 1  # sequences one decode step takes
    prefill_after_past: bool = True  # whether a prompt may be prefilled in chunks (engines before batching: no)

    def check(
        self,
        prompt_tokens: int,
        new_tokens: int,
        prompt_option: str = "--prompt",
        new_option: str = "--max-new-tokens",
        chunked_prefill: bool = False,
        image: bool = True,
    ) -> None:
        """A usage error (exit 2) naming the limit, before any shape reaches TensorRT. With
        `chunked_prefill` a prompt is prefilled in calls of at most max_prompt tokens, so only the
        context bounds it. `image`: whether the prompt's tokens include an image's."""
        counted = "prompt tokens (with the image)" if image else "prompt tokens"
        if prompt_tokens + new_tokens > self.context:
            raise MvlmError(
                f"{prompt_option}: {prompt_tokens} {counted} + {new_option} {new_tokens} exceed "
                f"the context of {self.context} ({self.source})"
            )
        if prompt_tokens > self.max_prompt and not chunked_prefill:
            raise MvlmError(
                f"{prompt_option}: {prompt_tokens} {counted} exceed the longest prompt of "
                f"{self.max_prompt} one prefill takes ({self.source})"
            )


def decoder_limits(record: dict[str, Any], engines_dir: Path) -> TokenLimits:
    """From the decoder engine's profiles: the prefill profile's longest sequence, the decode
    profile's longest past + 1 and its largest batch."""
    profiles = record["engines"]["decoder"]["profiles"]
    prefill, decode = profiles[PREFILL_PROFILE], profiles[DECODE_PROFILE]
    max_prompt = int(prefill[contract.DECODER_EMBEDS][2][1])  # [min, opt, max] of [batch, seq, hidden]
    context = int(decode[contract.past_names(0)[0]][2][0]) + 1  # [past, slots, kv heads, head dim]
    max_batch = int(decode[contract.DECODER_EMBEDS][2][0])
    prefill_after_past = int(prefill[contract.past_names(0)[0]][2][0]) > 0
    where = Path(engines_dir) / ENGINES_MANIFEST
    return TokenLimits(
        max_prompt,
        context,
        f"the decoder engine's profiles in {where}; rebuild with a larger --context or --max-batch",
        max_batch,
        prefill_after_past,
    )
