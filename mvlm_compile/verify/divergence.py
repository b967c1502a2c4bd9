"""Find the first node whose output diverges from the FP32 reference graph.

Both graphs run in ONNX Runtime with every shared intermediate tensor exposed as an output;
the tensors are compared in the candidate graph's topological order. Surgery and
quantization keep the names of the tensors they do not replace, so the first tensor beyond
tolerance names the node where precision was lost.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mvlm_compile.onnx_io import load_model
from mvlm_compile.runtime.ort_backend import ort_session
from mvlm_compile.verify.metrics import compare


def first_divergence(
    candidate: Path, reference: Path, feed: dict[str, np.ndarray], tolerance: dict[str, float]
) -> dict | None:
    """{node, op_type, tensor, metrics} of the first intermediate beyond `tolerance`, or None."""
    model, ref = load_model(candidate, load_weights=False), load_model(reference, load_weights=False)
    ref_tensors = {out for node in ref.graph.node for out in node.output}
    # Constants are not computations (and mask fills like -3.4e38 differ by dtype on purpose).
    order = [
        (node.name, node.op_type, out)
        for node in model.graph.node
        if node.op_type not in ("Constant", "ConstantOfShape")
        for out in node.output
        if out and out in ref_tensors
    ]
    names = [out for *_, out in order]

    def run(path: Path) -> dict[str, np.ndarray]:
        session = ort_session(path, extra_outputs=names)
        types = {i.name: i.type for i in session.get_inputs()}
        cast = {
            k: v.astype(np.float16 if types[k] == "tensor(float16)" else v.dtype) for k, v in feed.items() if k in types
        }
        return dict(zip([o.name for o in session.get_outputs()], session.run(None, cast)))

    got, expected = run(candidate), run(reference)
    for node, op_type, name in order:
        x, y = got.get(name), expected.get(name)
        if x is None or y is None or x.shape != y.shape or not np.issubdtype(y.dtype, np.floating):
            continue
        if y.size and np.abs(y.astype(np.float64)).max() > 1e30:  # additive attention-mask fill values
            continue
        metrics = compare(x, y)
        if metrics["rel_to_scale"] > tolerance["rel_to_scale"] or metrics["cosine"] < tolerance["cosine"]:
            return {"node": node, "op_type": op_type, "tensor": name, "metrics": metrics}
    return None
