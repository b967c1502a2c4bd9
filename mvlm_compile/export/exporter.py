"""Export the vision encoder, the LDPv2 projector and the decoder (with KV cache) to ONNX.

Opset 21 / IR 10: what the INT4 DequantizeLinear (block_size) of the quantize stage needs
and what TensorRT 10.3+ parses. Graphs over 2 GB keep their weights as external data
(`<graph>.onnx.data`). Everything is written to a temporary directory and renamed.
"""

from __future__ import annotations

import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch

from mvlm_compile import contract
from mvlm_compile.errors import MvlmError
from mvlm_compile.export.modules import Decoder, Projector, VisionEncoder
from mvlm_compile.fileio import atomic_output_dir
from mvlm_compile.manifest import Manifest
from mvlm_compile.model.config import IMAGE_TOKEN_INDEX, POOLED_GRID
from mvlm_compile.model.golden import checkpoint_fingerprint
from mvlm_compile.model.loader import load_checkpoint
from mvlm_compile.model.tokenizer import load_tokenizer
from mvlm_compile.onnx_io import graph_io, save_model, save_with_streamed_weights
from mvlm_compile.recipes import recipe_for

OPSET = 21
IR_VERSION = 10
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def _export(
    module: torch.nn.Module,
    args: tuple,
    path: Path,
    inputs: list[str],
    outputs: list[str],
    dynamic: dict,
    output_dims: dict[str, list[int | str]] | None = None,
) -> None:
    """TorchScript-based export (torch.export cannot yet trace transformers' cache with a
    zero-length past), then IR 10, with the weights in one external file above 2 GB.
    `output_dims` states output shapes the tracer loses (RoPE's slicing hides head_dim)."""
    scratch = path.parent / f".{path.stem}.export"  # the exporter scatters one file per tensor above 2 GB
    scratch.mkdir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation notices, not actionable here
            torch.onnx.export(
                module,
                args,
                str(scratch / path.name),
                dynamo=False,
                opset_version=OPSET,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=dynamic,
                do_constant_folding=True,
            )
        model = onnx.load(str(scratch / path.name), load_external_data=False)
        model.ir_version = IR_VERSION
        for output in model.graph.output:
            for dim, value in zip(output.type.tensor_type.shape.dim, (output_dims or {}).get(output.name, ())):
                if isinstance(value, int):
                    dim.dim_value = value
                else:
                    dim.dim_param = value
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
            save_with_streamed_weights(model, scratch, path)
        else:
            save_model(model, path)
    finally:
        shutil.rmtree(scratch)


def export_artifacts(
    checkpoint: Path,
    out: Path,
    vision_tower: Path | None = None,
    dtype: str = "fp32",
    progress: Callable[[str], None] = lambda msg: None,
) -> Manifest:
    """Write vision.onnx, projector.onnx, decoder.onnx, embed_tokens.npy, tokenizer.json, manifest.json."""
    if dtype not in DTYPES:
        raise MvlmError(f"--dtype {dtype!r}: expected one of {sorted(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    progress("loading checkpoint")
    loaded = load_checkpoint(checkpoint, vision_tower, dtype=torch_dtype)
    model, cfg = loaded.model, loaded.config
    tokenizer = load_tokenizer(checkpoint)
    try:
        recipe = recipe_for(cfg).name
    except MvlmError:
        recipe = None

    manifest = Manifest(
        model={
            "recipe": recipe,
            "hidden_size": cfg.hidden_size,
            "mm_hidden_size": cfg.mm_hidden_size,
            "num_layers": cfg.num_layers,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "max_context": cfg.max_context,
            "image_tokens": POOLED_GRID * POOLED_GRID,
            "image_token_index": IMAGE_TOKEN_INDEX,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "conversation_template": "v1",
        }
    )
    layers = cfg.num_layers
    kv_shape = (2, 4, cfg.num_kv_heads, cfg.head_dim)  # contract.past_names: [past, slots, kv_heads, head_dim]
    batch = {0: "batch"}
    decoder_dynamic = {
        contract.DECODER_EMBEDS: {0: "batch", 1: "seq"},
        contract.DECODER_POSITIONS: {0: "batch", 1: "seq"},
        contract.DECODER_LOGITS_INDEX: {0: "n"},
        contract.DECODER_LOGITS: {0: "batch", 1: "n"},
    }
    for i in range(layers):
        decoder_dynamic.update({name: {0: "past", 1: "slots"} for name in contract.past_names(i)})
        decoder_dynamic.update({name: {0: "seq", 1: "batch"} for name in contract.new_kv_names(i)})

    started = time.perf_counter()
    with atomic_output_dir(out, "artifacts", inputs=[checkpoint, vision_tower]) as tmp, torch.no_grad():
        progress("exporting vision.onnx")
        _export(
            VisionEncoder(model).eval(),
            (torch.zeros(1, 3, 336, 336, dtype=torch_dtype),),
            tmp / "vision.onnx",
            [contract.VISION_INPUT],
            [contract.VISION_OUTPUT],
            {contract.VISION_INPUT: batch, contract.VISION_OUTPUT: batch},
        )
        progress("exporting projector.onnx")
        _export(
            Projector(model).eval(),
            (torch.zeros(1, 576, cfg.mm_hidden_size, dtype=torch_dtype),),
            tmp / "projector.onnx",
            [contract.PROJECTOR_INPUT],
            [contract.PROJECTOR_OUTPUT],
            {contract.PROJECTOR_INPUT: batch, contract.PROJECTOR_OUTPUT: batch},
        )
        progress("exporting decoder.onnx")
        # Example shapes with batch = 1, past = 2, seq = 3, two logits, 4 slots: every axis distinct so the
        # tracer keeps them symbolic (more slots than rows keeps the rows' slice of the past).
        _export(
            Decoder(model).eval(),
            (
                torch.zeros(1, 3, cfg.hidden_size, dtype=torch_dtype),
                torch.arange(2, 5, dtype=torch.int64)[None],
                torch.tensor([1, 2], dtype=torch.int64),
                *[torch.zeros(kv_shape, dtype=torch_dtype) for _ in range(2 * layers)],
            ),
            tmp / "decoder.onnx",
            contract.decoder_input_names(layers),
            contract.decoder_output_names(layers),
            decoder_dynamic,
            {
                contract.DECODER_LOGITS: ["batch", "n", cfg.vocab_size],
                **{
                    name: ["seq", "batch", cfg.num_kv_heads, cfg.head_dim]
                    for i in range(layers)
                    for name in contract.new_kv_names(i)
                },
            },
        )
        progress("writing the token embedding table and tokenizer")
        table = model.language_model.get_input_embeddings().weight.detach().numpy()
        np.save(tmp / "embed_tokens.npy", table, allow_pickle=False)
        tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))
        manifest.files = {"embed_tokens": "embed_tokens.npy", "tokenizer": "tokenizer.json"}
        for name in ("vision", "projector", "decoder"):
            manifest.record_graph(tmp, name, f"{name}.onnx", dtype, *graph_io(tmp / f"{name}.onnx"))
        manifest.stages["export"] = {
            "dtype": dtype,
            "opset": OPSET,
            "ir_version": IR_VERSION,
            "checkpoint": str(checkpoint),
            "checkpoint_fingerprint_sha256": checkpoint_fingerprint([cfg.path, *loaded.weight_files]),
            "vision_weights_from": loaded.vision_source,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "seconds": round(time.perf_counter() - started, 1),
        }
        manifest.save(tmp)
    return manifest
