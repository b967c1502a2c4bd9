"""The package's dependencies point down: contracts <- model <- runtime <- stages <- bundle <- CLI.

Read from the source with ast (imports inside functions count too), so a stage that reaches up
(the runtime importing the orchestrator, a stage importing another stage) fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mvlm_compile"

# Lowest first. A module may import its own layer's modules only where the layer is one unit
# (the contracts; the model); stages are siblings and never import each other.
LAYERS = [
    (
        "contracts",
        [
            "mvlm_compile",
            "errors",
            "fileio",
            "contract",
            "table",
            "onnx_io",
            "peg_op",
            "manifest",
            "engines_record",
            "resources",
            "ports",
        ],
    ),
    ("model", ["model", "tinytask", "recipes", "trt_env"]),
    ("runtime", ["runtime"]),
    ("stages", ["export", "surgery", "quantize", "engine", "verify"]),
    ("bundle", ["bundle"]),
    ("api", ["session"]),
    ("serving", ["serve", "triton", "chat_repl"]),  # the front ends over the Session (chat_repl: `chat`'s loop)
    ("cli", ["cli"]),
]
SIBLINGS = {"stages", "serving"}
# The package re-exports its public API on first use (a module-level __getattr__), never at import.
LAZY_EXPORTS = {"mvlm_compile": {"mvlm_compile.session"}}


def _unit(module: str) -> str:
    """mvlm_compile.quantize.api -> quantize; mvlm_compile -> mvlm_compile."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _layer(unit: str) -> int:
    for index, (_, units) in enumerate(LAYERS):
        if unit in units:
            return index
    raise AssertionError(f"module unit {unit!r} is in no layer of tests/test_layers.py: place it")


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return found


def _imports(module: str, path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            if node.module == "mvlm_compile":  # `from mvlm_compile import contract`: a module; __version__ is not
                names.update(
                    f"mvlm_compile.{a.name}"
                    for a in node.names
                    if (PACKAGE / f"{a.name}.py").exists() or (PACKAGE / a.name).is_dir()
                )
    return {n for n in names if n == "mvlm_compile" or n.startswith("mvlm_compile.")}


@pytest.mark.parametrize("module,path", _modules(), ids=lambda v: v if isinstance(v, str) else "")
def test_imports_point_down(module, path):
    here = _unit(module)
    for imported in _imports(module, path):
        there = _unit(imported)
        if there == here or imported == "mvlm_compile" or imported in LAZY_EXPORTS.get(module, ()):
            continue
        assert _layer(there) <= _layer(here), (
            f"{module} imports {imported}: layer {LAYERS[_layer(there)][0]} is above {LAYERS[_layer(here)][0]}"
        )
        if _layer(there) == _layer(here) and LAYERS[_layer(here)][0] in SIBLINGS:
            raise AssertionError(
                f"{module} imports {imported}: {LAYERS[_layer(here)][0]} units are siblings and never import each other"
            )


def test_the_checker_sees_a_violation(tmp_path):
    """An import that points up is found (the test above can fail)."""
    bad = tmp_path / "runtime_bad.py"
    bad.write_text("def f():\n    from mvlm_compile.bundle import resolve_artifacts\n")
    imported = _imports("mvlm_compile.runtime.bad", bad)
    assert imported == {"mvlm_compile.bundle"} and _layer(_unit("mvlm_compile.bundle")) > _layer("runtime")
