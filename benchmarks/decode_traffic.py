"""Analytic bytes of one TensorRT decode step for an artifacts directory (its built decoder graph and
the runtime's buffer plan), against the floor of reading the weights and the past's K/V once.

    python benchmarks/decode_traffic.py ARTIFACTS [--past 1000] [--json]

The same table `mvlm-compile build` prints with the memory plan (mvlm_compile.engine.plan.decode_traffic).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mvlm_compile.engine.plan import Geometry, decode_traffic
from mvlm_compile.manifest import load_manifest
from mvlm_compile.recipes import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--past", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    manifest = load_manifest(args.artifacts)
    geometry = Geometry.from_recipe_and_manifest(load_recipe(manifest.model["recipe"]), manifest.model)
    traffic = decode_traffic(manifest.graph_path(args.artifacts, "decoder"), geometry, args.past)
    print(json.dumps(traffic.to_json(), indent=1) if args.json else traffic.table())


if __name__ == "__main__":
    main()
