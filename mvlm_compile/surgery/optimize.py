"""Run the graph passes over an artifacts directory, rewrite the graphs in place, report.

For each graph the passes of `GRAPH_PASSES[graph]` run in order; after each one the graph is
cleaned up (dead nodes and initializers removed) and sorted, and its node count and MACs are
measured at concrete shapes (batch 1; the decoder as a prefill of `decoder_seq` tokens with
an empty cache). A graph that no pass changed is not rewritten, so a second `optimize` leaves
the files byte for byte as they were.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import deferred_signals, directory_lock
from mvlm_compile.manifest import load_manifest, replace_graph
from mvlm_compile.onnx_io import load_model, save_model
from mvlm_compile.surgery.passes import GRAPH_PASSES, PASSES, PassContext, PatternMissing, graph_fingerprint
from mvlm_compile.surgery.shapes import count_macs

# The golden prompt's length on the tiny model: 144 image tokens + 80 text tokens.
DEFAULT_DECODER_SEQ = 224

ROW_HEADER = ("graph", "pass", "result", "nodes", "MACs", "what")


@dataclass(frozen=True)
class PassRecord:
    graph: str
    name: str
    status: str  # "changed", "no change" or "skipped" (pattern missing, opted out)
    detail: str
    nodes: tuple[int, int]  # before, after
    macs: tuple[int, int]  # before, after


@dataclass
class OptimizeReport:
    artifacts: Path
    dims: dict[str, int]  # the concrete dimensions the MACs are counted at
    records: list[PassRecord] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(r.status == "changed" for r in self.records)

    def totals(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Per graph: node count and MACs before the first pass and after the last."""
        out: dict[str, dict[str, tuple[int, int]]] = {}
        for graph in dict.fromkeys(r.graph for r in self.records):
            records = [r for r in self.records if r.graph == graph]
            out[graph] = {
                "nodes": (records[0].nodes[0], records[-1].nodes[1]),
                "macs": (records[0].macs[0], records[-1].macs[1]),
            }
        return out

    def rows(self) -> list[tuple[str, ...]]:
        """One row per (graph, pass), then one total row per graph; columns ROW_HEADER."""
        rows = [
            (r.graph, r.name, r.status, _change(r.nodes, str), _change(r.macs, _si), r.detail) for r in self.records
        ]
        for graph, total in self.totals().items():
            rows.append((graph, "(all)", "", _change(total["nodes"], str), _change(total["macs"], _si), ""))
        return rows

    def to_json(self) -> dict[str, Any]:
        return {
            "artifacts": str(self.artifacts),
            "dims": self.dims,
            "changed": self.changed,
            "passes": [asdict(r) for r in self.records],
            "totals": self.totals(),
        }


def _si(value: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return str(value)


def _change(pair: tuple[int, int], fmt: Callable[[int], str]) -> str:
    before, after = pair
    return fmt(before) if before == after else f"{fmt(before)} -> {fmt(after)}"


def optimize_graph(
    model: onnx.ModelProto,
    context: PassContext,
    dims: Mapping[str, int],
    allow_missing: Iterable[str] = (),
    progress: Callable[[str], None] = lambda msg: None,
) -> tuple[onnx.ModelProto | None, list[PassRecord]]:
    """Run the passes of `context.graph_name` on a graph. Returns the rewritten graph (None when
    no pass changed it) and one record per pass. Raises MvlmError when a pass misses its pattern,
    unless its name is in `allow_missing`."""
    name = context.graph_name
    allowed = set(allow_missing)
    graph = gs.import_onnx(model)
    nodes, macs = len(graph.nodes), _macs(graph, dims, name)
    records = []
    for pass_name in GRAPH_PASSES[name]:
        progress(f"{name}: {pass_name}")
        before = graph_fingerprint(graph)
        try:
            detail = PASSES[pass_name](graph, context)
        except PatternMissing as missing:
            if pass_name not in allowed:
                raise MvlmError(
                    f"{name}.onnx: pass {pass_name}: expected {missing} "
                    f"(to go on without it: --allow-missing {pass_name})"
                ) from None
            records.append(
                PassRecord(name, pass_name, "skipped", f"not found: {missing}", (nodes, nodes), (macs, macs))
            )
            continue
        graph.cleanup().toposort()
        changed = graph_fingerprint(graph) != before
        new_nodes, new_macs = len(graph.nodes), (_macs(graph, dims, name) if changed else macs)
        records.append(
            PassRecord(
                name, pass_name, "changed" if changed else "no change", detail, (nodes, new_nodes), (macs, new_macs)
            )
        )
        nodes, macs = new_nodes, new_macs
    if not any(r.status == "changed" for r in records):
        return None, records
    return gs.export_onnx(graph), records


def _macs(graph: gs.Graph, dims: Mapping[str, int], name: str) -> int:
    count = count_macs(graph, dims)
    if count.unknown:
        raise MvlmError(f"{name}.onnx: no concrete shapes at {dict(dims)} for {', '.join(count.unknown)}")
    return count.macs


def optimize_artifacts(
    artifacts_dir: Path,
    allow_missing: Iterable[str] = (),
    progress: Callable[[str], None] = lambda msg: None,
    decoder_seq: int = DEFAULT_DECODER_SEQ,
    stage_record: dict | None = None,
) -> OptimizeReport:
    """Optimize vision.onnx, projector.onnx and decoder.onnx in place and record the stage in
    the manifest (refreshed SHA-256 per graph, and `stages["optimize"]`: passes, per-pass
    report, node counts and MACs). `allow_missing` names passes whose missing pattern is
    reported as skipped instead of raising. MACs are counted at batch 1, the decoder as a
    prefill of `decoder_seq` tokens. `stage_record` (the orchestrator's) is written into the stage
    record, with the graphs' hashes as outputs_sha256."""
    artifacts_dir = Path(artifacts_dir)
    allow_missing = tuple(allow_missing)
    unknown = sorted(set(allow_missing) - set(PASSES))
    if unknown:
        raise MvlmError(f"--allow-missing {', '.join(unknown)}: no such pass (passes: {', '.join(PASSES)})")
    with directory_lock(artifacts_dir):  # the only writer of these graphs
        manifest = load_manifest(artifacts_dir)
        # A prefill as the runtime runs it: empty past, logits of the last position only.
        dims = {"batch": 1, "seq": decoder_seq, "past": 0, "slots": 1, "n": 1}
        report = OptimizeReport(artifacts_dir, dims)
        started = time.perf_counter()
        graphs_record = {}
        for name in GRAPH_PASSES:
            entry = manifest.graphs[name]
            path = manifest.check_graph(artifacts_dir, name)  # never rewrite what the manifest does not describe
            progress(f"loading {entry['file']}")
            rewritten, records = optimize_graph(
                load_model(path), PassContext(name, manifest.model), dims, allow_missing, progress
            )
            report.records.extend(records)
            if rewritten is not None:
                progress(f"writing {entry['file']}")
                with tempfile.TemporaryDirectory(dir=artifacts_dir, prefix=".optimize.", suffix=".tmp") as staging:
                    save_model(rewritten, Path(staging) / entry["file"])
                    del rewritten
                    # The manifest is saved after each graph, so its hashes always match the files.
                    with deferred_signals():
                        replace_graph(artifacts_dir, entry["file"], Path(staging))
                        manifest.record_graph(
                            artifacts_dir, name, entry["file"], entry["dtype"], entry["inputs"], entry["outputs"]
                        )
                        manifest.save(artifacts_dir)
            graphs_record[name] = {"input_sha256": entry["sha256"], **report.totals()[name]}
        manifest.stages["optimize"] = {
            "passes": {name: list(passes) for name, passes in GRAPH_PASSES.items()},
            "allow_missing": list(allow_missing),
            "dims": dims,
            "report": [asdict(r) for r in report.records],
            "graphs": graphs_record,
            "onnx_graphsurgeon": gs.__version__,
            "onnx": onnx.__version__,
            "seconds": round(time.perf_counter() - started, 1),
        }
        if stage_record is not None:
            outputs = {name: graph["sha256"] for name, graph in manifest.graphs.items()}
            manifest.stages["optimize"].update(stage_record, outputs_sha256=outputs)
        manifest.save(artifacts_dir)
        return report
