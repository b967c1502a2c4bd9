"""Golden tensors: the FP32 PyTorch reference on fixed inputs, in Polygraphy's JSON format.

For each component (vision, projector, decoder prefill, one decoder decode step) the
directory holds `<component>.inputs.json` (a list of feed dicts) and
`<component>.outputs.json` (Polygraphy RunResults), so that
`polygraphy run X.onnx --onnxrt --load-inputs IN.json --load-outputs OUT.json` works as is;
plus generation.json (the prompt's token ids and a greedy generation), image.png (the input
image) and manifest.json.
"""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import save_json

from mvlm_compile import __version__, contract
from mvlm_compile.errors import MvlmError
from mvlm_compile.fileio import atomic_output_dir, sha256_file, write_json
from mvlm_compile.model.loader import load_checkpoint
from mvlm_compile.model.preprocess import golden_image, preprocess_image
from mvlm_compile.model.prompt import build_prompt, tokenize_with_image
from mvlm_compile.model.tokenizer import load_tokenizer

GOLDEN_QUESTION = "What is in the image? Describe it in detail."
TASK_FILE = "task.json"
GOLDEN_NEW_TOKENS = 32
RUNNER_NAME = "pytorch-reference-fp32"


def checkpoint_task(cfg) -> dict | None:
    """The task a checkpoint was trained on (config.json's `mvlm_compile_task`), checked to be ours."""
    task = cfg.raw.get("mvlm_compile_task")
    if task is None:
        return None
    from mvlm_compile.tinytask.dataset import TASK_NAME, TASK_VERSION

    if not isinstance(task, dict) or task.get("name") != TASK_NAME or task.get("version") != TASK_VERSION:
        raise MvlmError(
            f"{cfg.path}: mvlm_compile_task is {task!r}; this version knows task {TASK_NAME!r} version {TASK_VERSION}"
        )
    return {"name": TASK_NAME, "version": TASK_VERSION}


def checkpoint_fingerprint(files: list[Path]) -> str:
    """sha256 over the names and contents of the files that define the weights."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _save_component(out: Path, name: str, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]) -> None:
    feed = {k: v.detach().contiguous().numpy() for k, v in inputs.items()}
    results = {k: v.detach().contiguous().numpy() for k, v in outputs.items()}
    save_json([feed], str(out / f"{name}.inputs.json"))
    run_results = RunResults([(RUNNER_NAME, [IterationResult(outputs=results, runner_name=RUNNER_NAME)])])
    run_results.save(str(out / f"{name}.outputs.json"))


def _kv_dict(
    cache: list[tuple[torch.Tensor, torch.Tensor]], names: Callable[[int], tuple[str, str]], start: int = 0
) -> dict[str, torch.Tensor]:
    """The reference's cache ([batch, kv_heads, length, head_dim] per layer), from row `start` on,
    in the contract's layout [length, batch, kv_heads, head_dim] under `names`."""
    out = {}
    for layer, (key, value) in enumerate(cache):
        key_name, value_name = names(layer)
        out[key_name] = key[:, :, start:].permute(2, 0, 1, 3)
        out[value_name] = value[:, :, start:].permute(2, 0, 1, 3)
    return out


@torch.no_grad()
def write_golden(
    checkpoint_dir: Path,
    out: Path,
    vision_tower: Path | None = None,
    question: str | None = None,
    max_new_tokens: int = GOLDEN_NEW_TOKENS,
    task_items: int | None = None,
    progress: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Run the FP32 reference on the fixed inputs and write the golden directory; returns its manifest.

    A model trained on our shapes task (config.json's `mvlm_compile_task`) is asked about the
    task's example image instead of golden_image(), and the directory also gets task.json: the
    reference's answers to the first `task_items` eval items (default: all of them).
    """
    torch.manual_seed(0)  # nothing below draws random numbers; fixed anyway for the record
    loaded = load_checkpoint(checkpoint_dir, vision_tower, dtype=torch.float32)
    model, cfg = loaded.model, loaded.config
    tokenizer = load_tokenizer(checkpoint_dir)
    task = checkpoint_task(cfg)

    if task is not None:
        from mvlm_compile.tinytask.dataset import EXAMPLE_QUESTION, example_scene
        from mvlm_compile.tinytask.scenes import draw_scene

        image, question = draw_scene(example_scene()), question or EXAMPLE_QUESTION
        image_note = "image.png = the shapes task's example scene (mvlm_compile.tinytask.dataset.example_scene)"
    else:
        image, question = golden_image(), question or GOLDEN_QUESTION
        image_note = "image.png = mvlm_compile.model.preprocess.golden_image(): 400x300 RGB, made in code"
    pixel_values = torch.from_numpy(preprocess_image(image))
    image_features = model.encode_images(pixel_values)
    image_embeds = model.project(image_features)

    prompt = build_prompt(question)
    input_ids = tokenize_with_image(prompt, tokenizer.encode, tokenizer.bos_token_id)
    inputs_embeds = model.splice_image(input_ids, image_embeds)
    seq = inputs_embeds.shape[1]
    if seq + max_new_tokens > cfg.max_context:
        raise MvlmError(
            f"{cfg.path}: the golden prompt ({seq} tokens with the image) + {max_new_tokens} new tokens "
            f"exceed max_position_embeddings {cfg.max_context}"
        )

    # The decoder's contract (contract.py): the past in, only the new rows out. Golden prefill
    # logits cover every prompt position (the runtime asks for the last only), so verification
    # still checks each position's logits, and every position's K/V rows at every layer.
    empty_kv = torch.zeros(1, cfg.num_kv_heads, 0, cfg.head_dim)
    positions = torch.arange(seq, dtype=torch.int64)[None]
    prefill_in = {
        contract.DECODER_EMBEDS: inputs_embeds,
        contract.DECODER_POSITIONS: positions,
        contract.DECODER_LOGITS_INDEX: torch.arange(seq, dtype=torch.int64),
        **_kv_dict([(empty_kv, empty_kv)] * cfg.num_layers, contract.past_names),
    }
    logits, present = model.decode(inputs_embeds, torch.ones(1, seq, dtype=torch.int64), positions, [])
    first_token = int(logits[0, -1].argmax())
    decode_in = {
        contract.DECODER_EMBEDS: model.embed_tokens(torch.tensor([[first_token]])),
        contract.DECODER_POSITIONS: torch.tensor([[seq]], dtype=torch.int64),
        contract.DECODER_LOGITS_INDEX: torch.tensor([0], dtype=torch.int64),
        **_kv_dict(present, contract.past_names),
    }
    decode_logits, decode_present = model.decode(
        decode_in[contract.DECODER_EMBEDS],
        torch.ones(1, seq + 1, dtype=torch.int64),
        decode_in[contract.DECODER_POSITIONS],
        present,
    )
    generated, margins = model.greedy_generate(inputs_embeds, max_new_tokens)

    task_record = None
    if task is not None:
        from mvlm_compile.tinytask.reference import task_golden

        task_record = task_golden(
            model,
            tokenizer.encode,
            tokenizer.decode,
            tokenizer.bos_token_id,
            tokenizer.eos_token_id,
            task_items,
            progress,
        )
    files = loaded.weight_files
    manifest = {
        "kind": "mvlm-compile golden tensors",
        "mvlm_compile_version": __version__,
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "checkpoint": {
            "path": str(Path(checkpoint_dir)),
            "fingerprint_sha256": checkpoint_fingerprint([cfg.path, *files]),
            "vision_weights_from": loaded.vision_source,
            "synthetic": cfg.raw.get("mvlm_compile_synthetic"),
        },
        "precision": "fp32",
        "seeds": {"torch": 0, "image": "golden_image() (deterministic, no seed)"},
        "image": image_note,
        "question": question,
        "runner_name": RUNNER_NAME,
        "components": {
            name: {"inputs": f"{name}.inputs.json", "outputs": f"{name}.outputs.json"} for name in contract.COMPONENTS
        },
        "generation": "generation.json",
        **({"task": {"file": TASK_FILE, **task}} if task is not None else {}),
        "prompt_tokens": seq,
        "greedy_min_top2_margin": min(margins),
    }
    with atomic_output_dir(out, "golden", inputs=[checkpoint_dir, vision_tower]) as tmp:
        _save_component(tmp, "vision", {contract.VISION_INPUT: pixel_values}, {contract.VISION_OUTPUT: image_features})
        _save_component(
            tmp, "projector", {contract.PROJECTOR_INPUT: image_features}, {contract.PROJECTOR_OUTPUT: image_embeds}
        )
        _save_component(
            tmp,
            "decoder_prefill",
            prefill_in,
            {contract.DECODER_LOGITS: logits, **_kv_dict(present, contract.new_kv_names)},
        )
        _save_component(
            tmp,
            "decoder_decode",
            decode_in,
            {contract.DECODER_LOGITS: decode_logits, **_kv_dict(decode_present, contract.new_kv_names, seq)},
        )
        write_json(
            tmp / "generation.json",
            {"prompt": prompt, "input_ids": input_ids, "max_new_tokens": max_new_tokens, "generated_ids": generated},
        )
        image.save(tmp / "image.png")  # the same image as a file, for `mvlm-compile run --image`
        if task_record is not None:
            write_json(tmp / TASK_FILE, task_record)
        write_json(tmp / "manifest.json", manifest)
    return manifest
