"""`verify`: every component and the end-to-end greedy tokens against the golden tensors.

Per component: max/mean abs error, error relative to the output's scale, cosine, at the
tolerance of the graph's precision (the recipe's `tolerances`, else the defaults in
components.py). End to end: the greedy tokens through the graphs vs the golden ones. A
failing component gets the first diverging node (ONNX Runtime only: it needs the graphs).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from mvlm_compile import contract
from mvlm_compile.verify.components import GRAPH_OF_COMPONENT, TOLERANCES, OutputCheck, check_components
from mvlm_compile.verify.golden_io import load_component, load_generation
from mvlm_compile.verify.metrics import greedy_agreement


@dataclass
class VerifyResult:
    backend: str
    checks: list[OutputCheck]
    greedy: dict
    divergences: dict[str, dict | None] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and self.greedy["passed"]

    def rows(self) -> list[tuple[str, ...]]:
        rows = [
            (
                c.component,
                c.output,
                f"{c.metrics['max_abs']:.3g}",
                f"{c.metrics['mean_abs']:.3g}",
                f"{c.metrics['rel_to_scale']:.3g} <= {c.tolerance['rel_to_scale']:g}",
                f"{c.metrics['cosine']:.6f} >= {c.tolerance['cosine']:g}",
                "ok" if c.passed else "FAIL",
            )
            for c in self.checks
        ]
        g = self.greedy
        rows.append(
            (
                "end_to_end",
                "greedy tokens",
                "",
                "",
                f"{g['matching']}/{g['total']} match",
                f"prefix {g['prefix']} >= {g['required_prefix']}",
                "ok" if g["passed"] else "FAIL",
            )
        )
        return rows

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "passed": self.passed,
            "components": [
                {
                    "component": c.component,
                    "output": c.output,
                    **c.metrics,
                    "tolerance": c.tolerance,
                    "passed": c.passed,
                }
                for c in self.checks
            ],
            "greedy": self.greedy,
            "first_divergence": self.divergences,
        }

    def write_junit(self, path: Path) -> None:
        suite = ET.Element("testsuite", name=f"mvlm-compile verify ({self.backend})", tests=str(len(self.checks) + 1))
        failures = 0
        for c in self.checks:
            case = ET.SubElement(suite, "testcase", classname=c.component, name=c.output)
            if not c.passed:
                failures += 1
                where = self.divergences.get(c.component)
                hint = f"; first diverging node {where['node']} ({where['op_type']})" if where else ""
                ET.SubElement(case, "failure", message=f"{c.metrics}{hint}")
        case = ET.SubElement(suite, "testcase", classname="end_to_end", name="greedy_tokens")
        if not self.greedy["passed"]:
            failures += 1
            ET.SubElement(case, "failure", message=str(self.greedy))
        suite.set("failures", str(failures))
        ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)


def greedy_check(backend, golden_dir: Path, required_prefix: int) -> dict:
    from mvlm_compile.runtime.pipeline import Pipeline

    pipeline = Pipeline(backend)
    generation = load_generation(golden_dir)
    feed, _ = load_component(golden_dir, "vision")
    embeds = pipeline.splice(generation["input_ids"], pipeline.image_embeds(feed[contract.VISION_INPUT]))
    golden = generation["generated_ids"]
    tokens = pipeline.greedy(embeds, len(golden))
    agreement = greedy_agreement(tokens, golden)
    return {
        "tokens": tokens,
        "golden": golden,
        **agreement,
        "required_prefix": required_prefix,
        "passed": agreement["prefix"] >= required_prefix,
    }


def required_greedy_prefix(precisions: set[str], total: int, tolerances: dict) -> int:
    """All-FP32 graphs must reproduce every golden token; lower precisions what the recipe asks."""
    if precisions == {"fp32"}:
        return total
    return int(min(tolerances.get(p, {}).get("greedy_prefix", 0) for p in precisions if p != "fp32"))


def verify(backend, golden_dir: Path, tolerances: dict | None = None, reference: Path | None = None) -> VerifyResult:
    """Run every check; with an ORT backend and a reference artifacts dir, locate divergences."""
    tolerances = {**TOLERANCES, **(tolerances or {})}
    checks = check_components(backend, golden_dir, tolerances=tolerances)
    precisions = {g["dtype"] for g in backend.manifest.graphs.values()}
    total = len(load_generation(golden_dir)["generated_ids"])
    greedy = greedy_check(backend, golden_dir, required_greedy_prefix(precisions, total, tolerances))
    result = VerifyResult(backend.name, checks, greedy)
    failed = sorted({c.component for c in checks if not c.passed})
    if failed and backend.name == "ort" and reference is not None:
        from mvlm_compile.manifest import reference_graph_path
        from mvlm_compile.verify.divergence import first_divergence

        for component in failed:
            graph = GRAPH_OF_COMPONENT[component]
            feed, _ = load_component(golden_dir, component)
            result.divergences[component] = first_divergence(
                backend.manifest.graph_path(backend.artifacts, graph),
                reference_graph_path(reference, graph),
                feed,
                tolerances[backend.manifest.graphs[graph]["dtype"]],
            )
    return result
