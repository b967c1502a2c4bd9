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
from mvlm_compile.verify.golden_io import check_generation_fits, load_component, load_generation
from mvlm_compile.verify.metrics import greedy_agreement
from mvlm_compile.verify.task_eval import TaskEval, evaluate_task, has_task

# Task items verify answers (the whole eval split is `mvlm-compile eval`'s): enough that one
# answer in 50 changing is seen, few enough for the demo.
VERIFY_TASK_ITEMS = 50


@dataclass
class VerifyResult:
    backend: str
    checks: list[OutputCheck]
    greedy: dict
    divergences: dict[str, dict | None] = field(default_factory=dict)
    task: TaskEval | None = None  # the task evaluation, when the golden directory has one

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and self.greedy["passed"] and (self.task is None or self.task.passed)

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
        if self.task is not None:
            summary, gate = self.task.summary(), self.task.gate()
            rows.append(
                (
                    "task",
                    f"{summary['items']} eval items",
                    f"exact {summary['exact_match']:.3f}",
                    f"FP32 ref {summary['reference_exact_match']:.3f}",
                    f"drop {gate['exact_match_drop']:.3f} <= {gate['allowed_drop']:g}",
                    f"identical {gate['identical_to_reference']:.3f} >= {gate['required_identical']:g}",
                    "ok" if gate["passed"] else "FAIL",
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
            **({"task": self.task.to_json()} if self.task is not None else {}),
        }

    def junit_xml(self) -> bytes:
        """The checks as a JUnit XML test suite."""
        tests = len(self.checks) + 1 + (self.task is not None)
        suite = ET.Element("testsuite", name=f"mvlm-compile verify ({self.backend})", tests=str(tests))
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
        if self.task is not None:
            case = ET.SubElement(suite, "testcase", classname="task", name="eval_split")
            if not self.task.passed:
                failures += 1
                ET.SubElement(case, "failure", message=str({**self.task.summary(), **self.task.gate()}))
        suite.set("failures", str(failures))
        return ET.tostring(suite, encoding="utf-8", xml_declaration=True)


def greedy_check(backend, golden_dir: Path, precisions: set[str], tolerances: dict) -> dict:
    from mvlm_compile.runtime.pipeline import Pipeline

    pipeline = Pipeline(backend)
    generation = load_generation(golden_dir)
    check_generation_fits(golden_dir, generation, backend.manifest.model, backend.limits)
    feed, _ = load_component(golden_dir, "vision")
    embeds = pipeline.splice(generation["input_ids"], pipeline.image_embeds(feed[contract.VISION_INPUT]))
    golden = generation["generated_ids"]
    required_prefix = required_greedy_prefix(
        precisions, golden, tolerances, int(backend.manifest.model["eos_token_id"])
    )
    tokens = pipeline.greedy(embeds, len(golden))
    agreement = greedy_agreement(tokens, golden)
    return {
        "tokens": tokens,
        "golden": golden,
        **agreement,
        "required_prefix": required_prefix,
        "passed": agreement["prefix"] >= required_prefix,
    }


def required_greedy_prefix(precisions: set[str], golden: list[int], tolerances: dict, eos: int) -> int:
    """All-FP32 graphs must reproduce every golden token; lower precisions what the recipe asks:
    a number of tokens, or "answer": every token up to and including the golden answer's EOS
    (the tokens after it are the model's guess at a next turn, not an answer)."""
    if precisions == {"fp32"}:
        return len(golden)

    def required(value: int | str) -> int:
        if value == "answer":
            return golden.index(eos) + 1 if eos in golden else len(golden)
        return int(value)

    return min(required(tolerances.get(p, {}).get("greedy_prefix", 0)) for p in precisions - {"fp32"})


def task_check(backend, golden_dir: Path, tolerances: dict, items: int | None) -> TaskEval | None:
    """The task evaluation when the golden directory has one (task.json) and `items` is not 0."""
    if items == 0 or not has_task(golden_dir):
        return None
    return evaluate_task(backend, golden_dir, tolerances, items)


def verify(
    backend,
    golden_dir: Path,
    tolerances: dict | None = None,
    reference: Path | None = None,
    task_items: int | None = VERIFY_TASK_ITEMS,
) -> VerifyResult:
    """Run every check; with an ORT backend and a reference artifacts dir, locate divergences.
    With a golden task file, also the task gate on its first `task_items` items (None: all; 0: none)."""
    tolerances = {**TOLERANCES, **(tolerances or {})}
    # Before any graph runs: golden tokens this backend cannot take are a usage error.
    check_generation_fits(golden_dir, load_generation(golden_dir), backend.manifest.model, backend.limits)
    checks = check_components(backend, golden_dir, tolerances=tolerances)
    precisions = {g["dtype"] for g in backend.manifest.graphs.values()}
    greedy = greedy_check(backend, golden_dir, precisions, tolerances)
    result = VerifyResult(backend.name, checks, greedy, task=task_check(backend, golden_dir, tolerances, task_items))
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
