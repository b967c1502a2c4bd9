"""Loading and saving ONNX graphs for every stage (torch-free)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx

from mvlm_compile.errors import ArtifactError
from mvlm_compile.fileio import naming_errors

PROTOBUF_LIMIT = 2**31 - 1
# Protobuf cannot serialise (or even size) a message over 2 GB; keep inline weights well under it.
INLINE_WEIGHTS_LIMIT = 1536 * 2**20
# Graphs whose weights pass this many bytes keep them in `<graph>.onnx.data`. Set lower to put
# small graphs' weights in external data too: the test suite does, so that every stage runs on
# external data as every full-size model does.
INLINE_WEIGHTS_ENV = "MVLM_COMPILE_INLINE_WEIGHTS_LIMIT"


def inline_weights_limit() -> int:
    value = os.environ.get(INLINE_WEIGHTS_ENV)
    if value is None:
        return INLINE_WEIGHTS_LIMIT
    try:
        return min(int(value), INLINE_WEIGHTS_LIMIT)
    except ValueError:
        raise ArtifactError(f"{INLINE_WEIGHTS_ENV}={value!r}: expected a number of bytes") from None


def load_model(path: Path, load_weights: bool = True) -> onnx.ModelProto:
    try:
        return onnx.load(str(path), load_external_data=load_weights)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing ONNX graph") from None
    except Exception as e:  # protobuf's DecodeError and friends
        raise ArtifactError(f"{path}: not a readable ONNX graph ({type(e).__name__}: {e})") from None


def graph_io(path: Path) -> tuple[list[dict], list[dict]]:
    """Names, element types and symbolic shapes of a saved graph's inputs and outputs (for manifests)."""
    graph = load_model(path, load_weights=False).graph

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return describe(graph.input), describe(graph.output)


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (ModelProto.ByteSize() itself fails past 2 GB)."""
    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        elif tensor.raw_data:
            total += len(tensor.raw_data)
        else:
            count = 1
            for dim in tensor.dims:
                count *= dim
            total += count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    return total


def save_model(model: onnx.ModelProto, path: Path) -> None:
    """Save a graph, its weights in `<name>.onnx.data` when it passes protobuf's 2 GB.

    Written into a temporary sibling directory first, then each file is renamed into place,
    so a crash never leaves a truncated graph under the final name.
    """
    path = Path(path)
    with naming_errors(path):  # a full disk's ENOSPC names the graph
        large = weight_bytes(model) > inline_weights_limit()
        data_name = f"{path.name}.data"
        scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            onnx.save_model(
                model,
                str(scratch / path.name),
                save_as_external_data=large,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            if large:
                os.replace(scratch / data_name, path.parent / data_name)
            else:
                (path.parent / data_name).unlink(missing_ok=True)
            os.replace(scratch / path.name, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def save_with_streamed_weights(model: onnx.ModelProto, source_dir: Path, path: Path, chunk: int = 64 << 20) -> None:
    """Save a graph whose initializers live in external files under `source_dir` (as
    torch.onnx writes graphs over 2 GB, one file per tensor) with all its weights in one
    `<name>.onnx.data`, copying the bytes file to file: the weights never sit in memory, which
    is what keeps a 7B export within a 24 GB machine."""
    path = Path(path)
    with naming_errors(path):  # a full disk's ENOSPC names the graph
        data_name = f"{path.name}.data"
        scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        try:
            with open(scratch / data_name, "wb") as out:
                for tensor in model.graph.initializer:
                    if tensor.data_location != onnx.TensorProto.EXTERNAL:
                        continue
                    info = {e.key: e.value for e in tensor.external_data}
                    offset = out.tell()
                    with open(Path(source_dir) / info["location"], "rb") as src:
                        src.seek(int(info.get("offset", 0)))
                        remaining = int(info["length"]) if "length" in info else None
                        while remaining is None or remaining > 0:
                            block = src.read(chunk if remaining is None else min(chunk, remaining))
                            if not block:
                                break
                            out.write(block)
                            if remaining is not None:
                                remaining -= len(block)
                    length = out.tell() - offset
                    del tensor.external_data[:]
                    for key, value in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                        tensor.external_data.add(key=key, value=value)
            onnx.save_model(model, str(scratch / path.name))
            os.replace(scratch / data_name, path.parent / data_name)
            os.replace(scratch / path.name, path)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
