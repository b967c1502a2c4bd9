"""Recipes and targets against the model facts; the CLI's import discipline and error handling."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mvlm_compile.model.config import load_mobilevlm_config
from mvlm_compile.recipes import architecture_mismatches, load_recipe, load_targets, recipe_for

# From ../shared/model-facts.md (the paper and the authors' configs).
MODEL_FACTS = {
    "mobilevlm-v2-1.7b": (2048, 24, 16, 5632),
    "mobilevlm-v2-3b": (2560, 32, 32, 6912),
    "mobilevlm-v2-7b": (4096, 32, 32, 11008),
}


@pytest.mark.parametrize("name", sorted(MODEL_FACTS))
def test_recipes_follow_the_model_facts(name):
    recipe = load_recipe(name)
    decoder = recipe.architecture["decoder"]
    hidden, layers, heads, mlp = MODEL_FACTS[name]
    assert (
        decoder["hidden_size"],
        decoder["num_hidden_layers"],
        decoder["num_attention_heads"],
        decoder["intermediate_size"],
    ) == (hidden, layers, heads, mlp)
    assert recipe.architecture["vision"] == {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "select_layer": -2,
    }
    assert recipe.precision["decoder"]["weights"] == "int4"
    assert recipe.precision["vision"] == recipe.precision["projector"] == "fp16"


def test_tiny_checkpoint_picks_the_tiny_recipe(tiny_checkpoint):
    cfg = load_mobilevlm_config(tiny_checkpoint)
    assert recipe_for(cfg).name == "tiny"
    mismatches = architecture_mismatches(load_recipe("mobilevlm-v2-1.7b"), cfg)
    assert "decoder.hidden_size is 64, recipe mobilevlm-v2-1.7b expects 2048" in mismatches


def test_targets():
    targets = load_targets()
    assert {"orin-agx-64gb", "orin-agx-32gb", "orin-nx-16gb", "orin-nano-8gb"} <= set(targets)
    assert all(t.sm == 87 for n, t in targets.items() if n.startswith("orin"))
    assert {t.sm for t in targets.values() if t.kind == "x86"} == {80, 86, 89, 90}
    assert targets["orin-agx-64gb"].bandwidth_gbs == 204.8
    assert all(t.memory_budget_gb < t.memory_gb for t in targets.values())


def test_help_does_not_import_torch():
    code = (
        "import sys; from click.testing import CliRunner; from mvlm_compile.cli import cli; "
        "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_checkpoint_gives_one_line_error_and_status_2(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mvlm_compile.cli",
            "golden",
            "--checkpoint",
            str(tmp_path),
            "--out",
            str(tmp_path / "g"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'config.json'}: model_type is 'llama', expected 'mobilevlm' (a MobileVLM V2 checkpoint)"
    ]
    assert not (tmp_path / "g").exists()
