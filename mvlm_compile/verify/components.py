"""Run each graph on its golden inputs and compare every output with the golden tensor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mvlm_compile.verify.golden_io import check_golden_fits_graph, check_golden_outputs, load_component
from mvlm_compile.verify.metrics import compare

# Tolerances on max |error| / max |golden| and on cosine, per graph precision. FP32 is held to
# 1e-4 of scale, what an export that computes the same thing can promise; FP16 is measured on the
# tiny model (worst 1.1e-2, decoder prefill logits) with headroom.
TOLERANCES = {
    "fp32": {"rel_to_scale": 1e-4, "cosine": 0.999999},
    "fp16": {"rel_to_scale": 3e-2, "cosine": 0.999},
    # INT4 weights (AWQ, group 128): measured worst cosine 0.9928 (tiny) / 0.9895 (1.7B, a
    # present tensor), worst error/scale 0.17 (tiny) / 0.47 (1.7B). Random synthetic weights
    # have no outlier channels; tighten with real checkpoints in the recipes.
    "int4": {"rel_to_scale": 0.6, "cosine": 0.98},
}
GRAPH_OF_COMPONENT = {
    "vision": "vision",
    "projector": "projector",
    "decoder_prefill": "decoder",
    "decoder_decode": "decoder",
}


@dataclass
class OutputCheck:
    component: str
    output: str
    metrics: dict[str, float]
    tolerance: dict[str, float]

    @property
    def passed(self) -> bool:
        return (
            self.metrics["rel_to_scale"] <= self.tolerance["rel_to_scale"]
            and self.metrics["cosine"] >= self.tolerance["cosine"]
        )


def check_components(
    backend, golden_dir: Path, components=tuple(GRAPH_OF_COMPONENT), tolerances: dict | None = None
) -> list[OutputCheck]:
    """One OutputCheck per (component, output), at the tolerance of the graph's precision
    (`tolerances` by precision, e.g. a recipe's, else TOLERANCES)."""
    tolerances = {**TOLERANCES, **(tolerances or {})}
    checks = []
    for component in components:
        graph = GRAPH_OF_COMPONENT[component]
        tolerance = tolerances[backend.manifest.graphs[graph]["dtype"]]
        feed, expected = load_component(golden_dir, component)
        check_golden_fits_graph(golden_dir, component, feed, graph, backend.manifest.graphs[graph])
        got = backend.run(graph, feed)
        check_golden_outputs(golden_dir, component, expected, got, graph)
        for name, value in expected.items():
            checks.append(OutputCheck(component, name, compare(got[name], value), tolerance))
    return checks
