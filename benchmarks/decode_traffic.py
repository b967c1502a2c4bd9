"""Analytic bytes of one TensorRT decode step, two ways.

One built artifacts directory (its decoder graph and the runtime's buffer plan), batch 1, against
the floor of reading the weights and the past's K/V once: the same table `mvlm-compile build`
prints with the memory plan (mvlm_compile.engine.plan.decode_traffic).

    python benchmarks/decode_traffic.py ARTIFACTS [--past 1000] [--json]

Batched decoding from the recipes alone (no bundle needed): the INT4 weight-only decoder as the
quantizer writes it for the recipe (codes two per byte, an FP16 scale per group, lm_head as the
recipe keeps it) is read once per step whatever the batch, while each row reads its own past's
K/V (FP16) and writes its new row. Bytes over each target's DRAM bandwidth give a lower bound on
the step time, hence an upper bound on aggregate tokens/s and on what batching can gain.

    python benchmarks/decode_traffic.py [--recipe mobilevlm-v2-1.7b mobilevlm-v2-3b] [--batch 1 4 8]
        [--past 256 1024] [--target orin-agx-64gb orin-nx-16gb orin-nano-8gb] [--json] [--report FILE]

`batched_decode_traffic()` returns that table as data, for a benchmark's own report.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mvlm_compile.engine.plan import FP16, Geometry, decode_traffic, step_activation_bytes, step_host_bytes
from mvlm_compile.fileio import write_json
from mvlm_compile.manifest import load_manifest
from mvlm_compile.recipes import Recipe, load_recipe, load_target
from mvlm_compile.table import render_table

RECIPES = ("mobilevlm-v2-1.7b", "mobilevlm-v2-3b")
ORIN_TARGETS = ("orin-agx-64gb", "orin-nx-16gb", "orin-nano-8gb")
BATCHES = (1, 4, 8)
PASTS = (256, 1024)
MIB = 2**20


def recipe_geometry(recipe: Recipe) -> Geometry:
    """The geometry a bundle of `recipe` records in its manifest (MHA unless the recipe names
    num_key_value_heads; head_dim = hidden / heads, as LLaMA's)."""
    decoder, vision = recipe.architecture["decoder"], recipe.architecture["vision"]
    hidden, heads = int(decoder["hidden_size"]), int(decoder["num_attention_heads"])
    model = {
        "hidden_size": hidden,
        "mm_hidden_size": int(vision["hidden_size"]),
        "num_layers": int(decoder["num_hidden_layers"]),
        "num_heads": heads,
        "num_kv_heads": int(decoder.get("num_key_value_heads", heads)),
        "head_dim": hidden // heads,
        "vocab_size": int(decoder["vocab_size"]),
    }
    return Geometry.from_recipe_and_manifest(recipe, model)


def lm_head_precision(recipe: Recipe) -> str:
    """How the quantizer stores lm_head for `recipe`: kept out of INT4 (keep_fp16) as exported, fp16,
    or weight-only int8 when the recipe says `lm_head: int8`; else int4 like the other linears."""
    decoder = recipe.precision["decoder"]
    return decoder.get("lm_head", "fp16") if "lm_head" in decoder.get("keep_fp16", []) else "int4"


def decoder_weight_bytes(recipe: Recipe) -> dict[str, int]:
    """Bytes of the quantized decoder graph's weights by kind, as mvlm_compile.quantize writes them
    for `recipe` (weight-only INT4 linears): the codes two per byte, one scale per group of inputs
    per output in the activation type, lm_head as kept (FP16; or INT8 with a scale per output), the
    RMSNorm weights, and AWQ's one input scale per o_proj (the inserted Mul by 1/s). Not the token
    embedding table (the host gathers its rows) nor the graph's shape constants (under a KiB)."""
    g, decoder = recipe_geometry(recipe), recipe.precision["decoder"]
    if decoder["weights"] != "int4":
        raise ValueError(f"{recipe.name}: decoder weights {decoder['weights']}, expected int4")
    group = int(decoder.get("group_size", 128))
    act = {"fp16": FP16, "fp32": 4}[decoder.get("activations", "fp16")]
    kv = g.kv_heads * g.head_dim
    # (K, N) of each linear of a layer: q, k, v, o, gate, up, down.
    shapes = [(g.hidden, g.hidden), (g.hidden, kv), (g.hidden, kv), (g.hidden, g.hidden)]
    shapes += [(g.hidden, g.mlp), (g.hidden, g.mlp), (g.mlp, g.hidden)]
    params = g.layers * sum(k * n for k, n in shapes)
    lm_head = lm_head_precision(recipe)
    if lm_head == "int4":
        params += g.hidden * g.vocab
        lm_head_bytes = 0
    elif lm_head == "int8":
        lm_head_bytes = g.hidden * g.vocab + g.vocab * act
    else:
        lm_head_bytes = g.hidden * g.vocab * {"fp16": FP16, "fp32": 4}[lm_head]
    vectors = (2 * g.layers + 1) * g.hidden  # input and post-attention RMSNorms, the final norm
    if decoder.get("method") == "awq":
        vectors += g.layers * g.hidden
    return {
        "int4_codes": params // 2,
        "scales": params // group * act,
        "lm_head": lm_head_bytes,
        "norms_and_awq_input_scales": vectors * act,
    }


def step_bytes(recipe: Recipe, batch: int, past: int) -> dict[str, float]:
    """Bytes one decode step of `batch` rows moves, each row after `past` tokens (FP16 K/V cache)."""
    g = recipe_geometry(recipe)
    kv_row = 2 * g.layers * g.kv_heads * g.head_dim * FP16  # one token's K and V over all layers
    return {
        "weights": float(sum(decoder_weight_bytes(recipe).values())),  # once per step, shared by the rows
        "kv_read": float(batch * past * kv_row),
        "kv_written": float(batch * kv_row),
        "activations_upper_bound": float(batch * step_activation_bytes(g, past)),
        "host_io": float(batch * step_host_bytes(g)),
    }


def batched_decode_traffic(
    recipes: Sequence[str] = RECIPES,
    batches: Sequence[int] = BATCHES,
    pasts: Sequence[int] = PASTS,
    targets: Sequence[str] = ORIN_TARGETS,
) -> dict[str, Any]:
    """Per recipe, past and batch: the bytes of one decode step, and per target the least step time
    (weights + K/V read + K/V written over its bandwidth), the most aggregate tokens/s, and the
    tokens/s gain over batch 1 at the same past (the same on every target: both bounds scale with
    bandwidth). Activations (unfused upper bound) and host transfers are reported, not in the bound:
    fused kernels keep most of them on chip, and the host's run beside the GPU's.

    {"assumptions": {...}, "targets": {name: GB/s}, "models": {recipe: {"group_size", "activations",
     "lm_head", "weights": {kind: bytes}, "steps": [{"past", "batch", "bytes": {...}, "floor_bytes",
     "gain_over_batch_1", "targets": {name: {"step_ms_min", "tok_s_max"}}}, ...]}}}
    """
    if not batches or min(batches) < 1 or min(pasts, default=0) < 0:
        raise ValueError("batches must be at least 1 and pasts at least 0")
    bandwidths = {name: load_target(name).bandwidth_gbs for name in targets}
    models: dict[str, Any] = {}
    for name in recipes:
        recipe = load_recipe(name)
        steps = []
        for past in pasts:
            floors = {}
            for batch in sorted(set(batches) | {1}):
                moved = step_bytes(recipe, batch, past)
                floors[batch] = moved["weights"] + moved["kv_read"] + moved["kv_written"]
                if batch not in batches:
                    continue  # batch 1 is the reference of the gain, shown only when asked for
                seconds = {t: floors[batch] / (gbs * 1e9) for t, gbs in bandwidths.items()}
                steps.append(
                    {
                        "past": past,
                        "batch": batch,
                        "bytes": moved,
                        "floor_bytes": floors[batch],
                        "gain_over_batch_1": batch * floors[1] / floors[batch],
                        "targets": {t: {"step_ms_min": 1e3 * s, "tok_s_max": batch / s} for t, s in seconds.items()},
                    }
                )
        decoder = recipe.precision["decoder"]
        models[name] = {
            "group_size": int(decoder.get("group_size", 128)),
            "activations": decoder.get("activations", "fp16"),  # also the scales' type
            "lm_head": lm_head_precision(recipe),
            "weights": decoder_weight_bytes(recipe),
            "steps": steps,
        }
    return {
        "assumptions": {
            "decoder": "INT4 weight-only as the recipe says (group, scales in the activation type, lm_head kept)",
            "kv_cache": "fp16, read in place once per step, one new row written per layer",
            "bound": "step time >= (weights + K/V read + K/V written) / DRAM bandwidth; compute not modelled",
        },
        "targets": bandwidths,
        "models": models,
    }


def batched_table(report: dict[str, Any]) -> str:
    """The human table of `batched_decode_traffic()`'s report."""
    targets = list(report["targets"])
    header = ["model", "past", "batch", "weights MiB", "K/V read MiB", "K/V written MiB", "act. MiB (<=)"]
    header += ["floor MiB", *[f"{t}: ms >= / tok/s <=" for t in targets], "gain vs batch 1 (<=)"]
    rows = []
    for name, model in report["models"].items():
        for step in model["steps"]:
            moved = step["bytes"]
            rows.append(
                [
                    name,
                    step["past"],
                    step["batch"],
                    f"{moved['weights'] / MIB:.1f}",
                    f"{moved['kv_read'] / MIB:.1f}",
                    f"{moved['kv_written'] / MIB:.2f}",
                    f"{moved['activations_upper_bound'] / MIB:.1f}",
                    f"{step['floor_bytes'] / MIB:.1f}",
                    *[f"{v['step_ms_min']:.2f} / {v['tok_s_max']:.0f}" for v in step["targets"].values()],
                    f"{step['gain_over_batch_1']:.2f}x",
                ]
            )
    bandwidths = ", ".join(f"{t} {gbs:g} GB/s" for t, gbs in report["targets"].items())
    return render_table(header, rows) + f"\n(bandwidths: {bandwidths}; MiB = 2^20 bytes)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifacts", type=Path, nargs="?", help="an artifacts directory (else: the batched analysis)")
    parser.add_argument("--past", type=int, nargs="+", help="past lengths (default 1000; batched: 256 1024)")
    parser.add_argument("--recipe", nargs="+", default=list(RECIPES))
    parser.add_argument("--batch", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--target", nargs="+", default=list(ORIN_TARGETS))
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--report", type=Path, help="also write the batched analysis' JSON here")
    args = parser.parse_args(argv)
    if args.artifacts is not None:
        manifest = load_manifest(args.artifacts)
        geometry = Geometry.from_recipe_and_manifest(load_recipe(manifest.model["recipe"]), manifest.model)
        for past in args.past or [1000]:
            traffic = decode_traffic(manifest.graph_path(args.artifacts, "decoder"), geometry, past)
            print(json.dumps(traffic.to_json(), indent=1) if args.json else traffic.table())
        return 0
    report = batched_decode_traffic(args.recipe, args.batch, args.past or list(PASTS), args.target)
    if args.report:
        write_json(args.report, report)
    print(json.dumps(report, indent=1) if args.json else batched_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
