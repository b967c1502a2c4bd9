"""Train the tiny MobileVLM V2 of the shapes task on the CPU and write its checkpoint (`make tiny-model`).

    python -m mvlm_compile.tinytask.train --out models/tiny-shapes

The architecture is MobileVLM V2's with the tiny geometry: a CLIP ViT (patch 14 on 336x336,
576 patch tokens, select layer -2, no CLS), LDPv2 with PEG (144 image tokens) and a LLaMA
decoder, with our own small LLaMA-style tokenizer trained on the task's words. Everything is
trained from scratch, end to end, on the train split: images and questions are drawn on the fly
from (seed, index), several question/answer turns per image in the 'v1' template (the first
turn is exactly the runtime's prompt; the later ones make each image's 144 tokens pay for more
answers). The loss is the answers' tokens (and their EOS), plus a dense loss on the image
tokens (DenseHead, dropped from the checkpoint) that stands in for CLIP's pretraining. Deterministic: seeds, one thread
count, deterministic algorithms. The checkpoint is the published layout (config.json,
model.safetensors in FP16, tokenizer files) plus training.json, the record of this run.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save

from mvlm_compile.fileio import atomic_output_dir, write_bytes, write_json
from mvlm_compile.model.config import POOLED_GRID, load_mobilevlm_config, vision_layers_used
from mvlm_compile.model.loader import published_name
from mvlm_compile.model.preprocess import preprocess_image
from mvlm_compile.model.prompt import SYSTEM_V1, build_prompt
from mvlm_compile.model.reference import MobileVLMReference
from mvlm_compile.model.synth import Preset, _llama, mobilevlm_config_json
from mvlm_compile.model.tokenizer import CheckpointTokenizer, load_tokenizer, write_synthetic_tokenizer
from mvlm_compile.tinytask import dataset
from mvlm_compile.tinytask.questions import TEMPLATES, all_sentences
from mvlm_compile.tinytask.reference import answer_scene
from mvlm_compile.tinytask.scenes import COLOURS, SHAPES, SLOT_ORDER, Scene, draw_scene, shape_index_map

# The model: vision 128 wide (3 layers, of which select layer -2 uses 2), decoder 256 wide with
# an MLP of 768, so that every INT4 group size from 32 to 256 divides each Linear's K.
VISION = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 336,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}
TEXT = _llama(hidden=256, layers=2, heads=4, mlp=768, vocab=512, context=512)
STORAGE_DTYPE = torch.float16  # as the published checkpoints; a few MB


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 900  # joint stage
    batch: int = 16
    vision_steps: int = 900  # vision stage (tower + projector on the dense labels)
    vision_batch: int = 16
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    dense_weight: float = 1.0  # of the image-token loss (DenseHead) next to the answers' loss
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    eval_items: int = 100  # PyTorch check on the eval split at the end (the full evaluation is `mvlm-compile eval`)


def tokenizer_corpus() -> list[str]:
    """The template text (weighted, so its words become single tokens), the training phrasings
    after the template's newline, and the answers."""
    template = [f"{SYSTEM_V1} USER: ASSISTANT: USER:"] * 100
    sentences = all_sentences()
    return template + [f"\n{s} ASSISTANT:" for s in sentences if s.endswith("?")] + sentences


def checkpoint_config() -> dict[str, Any]:
    config = mobilevlm_config_json(Preset(TEXT, VISION, "fp16"), embed_vision_config=True)
    config["torch_dtype"] = "float16"
    config["mvlm_compile_task"] = {
        "name": dataset.TASK_NAME,
        "version": dataset.TASK_VERSION,
        "train_seed": dataset.TRAIN_SEED,
        "eval_seed": dataset.EVAL_SEED,
        "trained_by": "python -m mvlm_compile.tinytask.train",
    }
    return config


def sample_sequence(
    tokenizer: CheckpointTokenizer, sample: dataset.TrainSample
) -> tuple[list[int], list[int], list[int]]:
    """(ids before the image, ids after it, labels of the ids after it: -100 except answers and EOS).

    Turn 1 is the runtime's prompt (build_prompt); later turns follow the 'v1' separators.
    """
    first = sample.turns[0]
    prompt = build_prompt(first.question)
    before_text, after_text = prompt.split("<image>")
    before = tokenizer.encode(before_text)
    after = tokenizer.encode_plain(after_text)
    labels = [-100] * len(after)
    for i, turn in enumerate(sample.turns):
        if i > 0:
            question = tokenizer.encode_plain(f"USER: {turn.question} ASSISTANT:")
            after += question
            labels += [-100] * len(question)
        reply = tokenizer.encode_plain(turn.answer) + [tokenizer.eos_token_id]
        after += reply
        labels += reply
    return before, after, labels


def vision_features(model: MobileVLMReference, pixel_values: torch.Tensor) -> torch.Tensor:
    """model.encode_images without the layers after the selected one (their output is unused)."""
    tower = getattr(model.vision_tower, "vision_model", model.vision_tower)
    used = vision_layers_used(len(tower.encoder.layers), model.select_layer)
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    for layer in tower.encoder.layers[:used]:
        hidden = layer(hidden, None)
    return hidden[:, 1:]


class DenseHead(torch.nn.Module):
    """Training only (not in the checkpoint): from each image token the projector emits, the kind,
    colour and slot of the shape under it (or none). This dense signal stands in for the
    pretrained CLIP tower MobileVLM starts from: without it, a tower trained from scratch by the
    answers alone learns nothing in the steps we can afford (measured: chance-level answers)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleList(
            [torch.nn.Linear(hidden, n + 1) for n in (len(SHAPES), len(COLOURS), len(SLOT_ORDER))]
        )

    def loss(self, image_embeds: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeds [B, 144, hidden], labels [B, 3, 144] -> (loss, kind accuracy on shape tokens).

        Each head's cross-entropy is the mean of its shape tokens' and its background tokens'
        (about one token in ten shows a shape: unweighted, the background would drown them)."""
        flat = image_embeds.reshape(-1, image_embeds.shape[-1])
        target = labels.permute(1, 0, 2).reshape(3, -1)
        on_shape = target[0] > 0
        losses = []
        for head, wanted in zip(self.heads, target):
            per_token = torch.nn.functional.cross_entropy(head(flat), wanted, reduction="none")
            losses.append(0.5 * (per_token[on_shape].mean() + per_token[~on_shape].mean()))
        with torch.no_grad():
            accuracy = (self.heads[0](flat[on_shape]).argmax(-1) == target[0][on_shape]).float().mean()
        return torch.stack(losses).mean(), accuracy


def dense_labels(scene: Scene, grid: int = POOLED_GRID, min_cover: float = 0.25) -> np.ndarray:
    """int64 [3, grid * grid]: (kind, colour, slot) + 1 of the shape covering at least `min_cover`
    of each image token's cell (most covered wins), 0 elsewhere. Token i is cell (i // grid, i % grid)."""
    index = shape_index_map(scene)
    cell = index.shape[0] // grid
    cells = index.reshape(grid, cell, grid, cell).transpose(0, 2, 1, 3).reshape(grid * grid, cell * cell)
    counts = np.stack([(cells == i + 1).sum(1) for i in range(len(scene.shapes))], axis=1)
    owner = counts.argmax(1)
    covered = counts.max(1) >= min_cover * cell * cell
    labels = np.zeros((3, grid * grid), np.int64)
    for i, shape in enumerate(scene.shapes):
        where = covered & (owner == i)
        labels[0, where] = SHAPES.index(shape.kind) + 1
        labels[1, where] = list(COLOURS).index(shape.colour) + 1
        labels[2, where] = SLOT_ORDER.index(shape.slot) + 1
    return labels


def dense_loss(
    model: MobileVLMReference, head: DenseHead, samples: list[dataset.TrainSample]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense image-token loss, image embeddings [B, 144, hidden], kind accuracy on shape tokens)."""
    pixels = torch.from_numpy(np.concatenate([preprocess_image(draw_scene(s.scene)) for s in samples]))
    image_embeds = model.project(vision_features(model, pixels))
    loss, accuracy = head.loss(image_embeds, torch.from_numpy(np.stack([dense_labels(s.scene) for s in samples])))
    return loss, image_embeds, accuracy


def batch_loss(
    model: MobileVLMReference, head: DenseHead, tokenizer: CheckpointTokenizer, samples: list[dataset.TrainSample]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(answer loss, dense image-token loss, kind accuracy on shape tokens) of a batch."""
    dense, image_embeds, accuracy = dense_loss(model, head, samples)
    embeds, labels = [], []
    for sample, image in zip(samples, image_embeds):
        before, after, after_labels = sample_sequence(tokenizer, sample)
        embed = model.embed_tokens
        embeds.append(torch.cat([embed(torch.tensor(before)), image, embed(torch.tensor(after))]))
        labels.append(torch.tensor([-100] * (len(before) + image.shape[0]) + after_labels))
    lengths = [len(label) for label in labels]
    inputs = torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True)
    targets = torch.nn.utils.rnn.pad_sequence(labels, batch_first=True, padding_value=-100)
    mask = (torch.arange(inputs.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    return model.language_model(inputs_embeds=inputs, attention_mask=mask, labels=targets).loss, dense, accuracy


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak."""
    if step < settings.warmup:
        return settings.lr * (step + 1) / settings.warmup
    progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
    return settings.lr * (
        settings.min_lr_ratio + (1 - settings.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def _optimizer(model: torch.nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.98), eps=1e-8)


def _fmt_seconds(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _set_attention(model: MobileVLMReference, kind: str) -> None:
    model.language_model.set_attn_implementation(kind)
    model.vision_tower.set_attn_implementation(kind)


def _run_stage(
    name: str,
    modules: torch.nn.Module,
    losses,
    steps: int,
    batch: int,
    stream,
    settings: TrainSettings,
    log,
) -> dict:
    """One training stage: AdamW on `modules` with its own warm-up and cosine schedule; `losses`
    maps a list of samples to (named losses, whose sum is minimised; named metrics, logged only).
    Logs and returns the curve."""
    stage = replace(settings, steps=steps)
    optimizer = _optimizer(modules, stage)
    curve, window = [], []
    started = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, stage)
        values, metrics = losses([next(stream) for _ in range(batch)])
        optimizer.zero_grad(set_to_none=True)
        sum(values.values()).backward()
        torch.nn.utils.clip_grad_norm_(modules.parameters(), settings.clip_norm)
        optimizer.step()
        window.append({k: float(v.detach()) for k, v in {**values, **metrics}.items()})
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - started
            means = {k: round(float(np.mean([w[k] for w in window])), 5) for k in window[0]}
            curve.append({"step": step + 1, **means, "seconds": round(elapsed)})
            eta = elapsed / (step + 1) * (steps - step - 1)
            log(
                f"[train:{name}] step {step + 1}/{steps}  "
                + "  ".join(f"{k} {v:.4f}" for k, v in means.items())
                + f"  lr {learning_rate(step, stage):.2e}  {elapsed / (step + 1):.2f} s/step  "
                f"elapsed {_fmt_seconds(elapsed)}  eta {_fmt_seconds(eta)}"
            )
            window = []
    return {"steps": steps, "batch": batch, "seconds": round(time.perf_counter() - started, 1), "curve": curve}


def train(
    model: MobileVLMReference,
    tokenizer: CheckpointTokenizer,
    settings: TrainSettings,
    log=lambda m: print(m, file=sys.stderr),
) -> dict:
    """Train in place, in two stages; returns their loss records.

    1. vision: the CLIP tower and the projector alone, on the dense image-token labels (many
       cheap steps: no decoder), as MobileVLM starts from a pretrained CLIP;
    2. joint: everything, on the answers, the dense loss kept alongside.
    """
    _set_attention(model, "sdpa")  # training only: the same math as eager, faster; eager again for use
    model.train()
    torch.manual_seed(settings.seed + 1)  # the head's initial weights, whatever ran before
    head = DenseHead(model.config.hidden_size)
    stream = dataset.train_stream()

    def vision_losses(samples: list[dataset.TrainSample]) -> tuple[dict, dict]:
        loss, _, kind_accuracy = dense_loss(model, head, samples)
        return {"dense": loss}, {"kind_acc": kind_accuracy}

    def joint_losses(samples: list[dataset.TrainSample]) -> tuple[dict, dict]:
        answers, dense, kind_accuracy = batch_loss(model, head, tokenizer, samples)
        return {"answers": answers, "dense": settings.dense_weight * dense}, {"kind_acc": kind_accuracy}

    record: dict[str, Any] = {}
    vision_modules = torch.nn.ModuleList([model.vision_tower, model.mm_projector, head])
    if settings.vision_steps:
        record["vision"] = _run_stage(
            "vision", vision_modules, vision_losses, settings.vision_steps, settings.vision_batch, stream, settings, log
        )
    record["joint"] = _run_stage(
        "joint",
        torch.nn.ModuleList([model, head]),
        joint_losses,
        settings.steps,
        settings.batch,
        stream,
        settings,
        log,
    )
    _set_attention(model, "eager")
    model.eval()
    last = record["joint"]["curve"][-1]
    return {
        **record,
        "seconds": round(sum(r["seconds"] for r in record.values()), 1),
        "final_loss": last["answers"],
        "final_dense_loss": last["dense"],
        "images_seen": settings.steps * settings.batch + settings.vision_steps * settings.vision_batch,
    }


@torch.no_grad()
def quick_eval(model: MobileVLMReference, tokenizer: CheckpointTokenizer, items: int, log=lambda m: None) -> dict:
    """Exact-match of the PyTorch model (FP32) on the first `items` eval items, by kind and subset."""
    results = []
    for item in dataset.eval_items(items):
        eos = tokenizer.eos_token_id
        tokens = answer_scene(model, tokenizer.encode, tokenizer.bos_token_id, eos, item.scene(), item.question).tokens
        text = tokenizer.decode([t for t in tokens if t != eos])
        results.append((item, text == item.answer))
    return exact_match_summary(results)


def exact_match_summary(results: list[tuple[dataset.EvalItem, bool]]) -> dict:
    def rate(rows: list) -> float | None:
        return round(sum(ok for _, ok in rows) / len(rows), 4) if rows else None

    return {
        "items": len(results),
        "exact_match": rate(results),
        "by_kind": {k: rate([r for r in results if r[0].kind == k]) for k in dict.fromkeys(i.kind for i, _ in results)},
        "held_out_combination": rate([r for r in results if r[0].held_out_combination]),
        "held_out_phrasing": rate([r for r in results if r[0].held_out_phrasing]),
        "seen": rate([r for r in results if not r[0].held_out_combination and not r[0].held_out_phrasing]),
    }


def state_dict_published(model: MobileVLMReference) -> dict[str, torch.Tensor]:
    return {
        published_name(k, model.vision_prefix): v.detach().to(STORAGE_DTYPE).contiguous()
        for k, v in model.state_dict().items()
    }


def write_tiny_model(out: Path, settings: TrainSettings, log=lambda m: print(m, file=sys.stderr)) -> dict:
    """Train from scratch and write the checkpoint to `out` (atomically); returns training.json's record."""
    torch.manual_seed(settings.seed)
    torch.set_num_threads(settings.threads)
    torch.use_deterministic_algorithms(True)
    with atomic_output_dir(out, "checkpoint") as tmp:
        write_json(tmp / "config.json", checkpoint_config())
        write_synthetic_tokenizer(tmp, vocab_size=TEXT["vocab_size"], corpus=tokenizer_corpus(), split_words=True)
        tokenizer = load_tokenizer(tmp)
        cfg = load_mobilevlm_config(tmp)
        model = MobileVLMReference(cfg, VISION)
        parameters = sum(p.numel() for p in model.parameters())
        log(f"[train] {parameters / 1e6:.2f}M parameters; {settings}")
        record = train(model, tokenizer, settings, log)
        # What is written is what is judged: the FP16 weights, read back as FP32.
        weights = state_dict_published(model)
        model.load_state_dict({k: v.float() for k, v in zip(model.state_dict(), weights.values())}, strict=True)
        log(f"[train] exact-match check on {settings.eval_items} eval items (PyTorch, FP16 weights)")
        record["eval_check"] = quick_eval(model, tokenizer, settings.eval_items)
        log(f"[train] {record['eval_check']}")
        write_bytes(tmp / "model.safetensors", save(weights, metadata={"format": "pt"}))
        record.update(
            {
                "settings": asdict(settings),
                "parameters": parameters,
                "held_out_templates": [t.text for t in TEMPLATES if not t.train],
                "held_out_colour_shape": sorted(dataset.HELD_OUT_COLOUR_SHAPE),
                "held_out_shape_slot": sorted(dataset.HELD_OUT_SHAPE_SLOT),
                "versions": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version()},
                "machine": platform.processor() or platform.machine(),
            }
        )
        write_json(tmp / "training.json", record)
    return record


def main(argv: list[str] | None = None) -> None:
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    for field, value in asdict(defaults).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    record = write_tiny_model(out, TrainSettings(**args))
    print(
        f"wrote {out}: {record['seconds']} s of training, final loss {record['final_loss']}, "
        f"eval exact-match {record['eval_check']['exact_match']}"
    )


if __name__ == "__main__":
    main()
