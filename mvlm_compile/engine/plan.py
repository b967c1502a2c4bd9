"""Memory planning and optimisation profiles for a target. Torch-free, TensorRT-free.

The build refuses a configuration whose weights + KV cache + activations do not fit the
target's memory budget (recipes/targets/targets.yaml), and shows the numbers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvlm_compile import contract
from mvlm_compile.errors import MvlmError
from mvlm_compile.model.config import vision_layers_used
from mvlm_compile.onnx_io import load_model, weight_bytes
from mvlm_compile.recipes import Recipe, Target
from mvlm_compile.table import render_table

GIB = 2**30
FP16 = 2  # bytes
MIN_WORKSPACE = 256 * 2**20  # below this TensorRT loses most tactics
MAX_WORKSPACE = 4 * GIB


@dataclass(frozen=True)
class Geometry:
    """What the plan needs of the model (from an artifacts manifest or a checkpoint config)."""

    hidden: int
    mm_hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    vocab: int
    vision_hidden: int
    vision_mlp: int
    vision_layers_used: int

    @classmethod
    def from_recipe_and_manifest(cls, recipe: Recipe, model: dict[str, Any]) -> Geometry:
        vision = recipe.architecture["vision"]
        return cls(
            hidden=int(model["hidden_size"]),
            mm_hidden=int(model["mm_hidden_size"]),
            layers=int(model["num_layers"]),
            heads=int(model["num_heads"]),
            kv_heads=int(model["num_kv_heads"]),
            head_dim=int(model["head_dim"]),
            mlp=int(recipe.architecture["decoder"]["intermediate_size"]),
            vocab=int(model["vocab_size"]),
            vision_hidden=int(vision["hidden_size"]),
            vision_mlp=4 * int(vision["hidden_size"]),
            vision_layers_used=vision_layers_used(vision["num_hidden_layers"], vision["select_layer"]),
        )


# The most sequences the memory plan gives a decoder by default: on an Orin, 8 rows read the same
# weights as 1 per step (4-5x the aggregate tok/s); past that the KV cache grows for little gain.
MAX_DEFAULT_BATCH = 8


@dataclass(frozen=True)
class BuildSettings:
    context: int  # longest prompt + generated tokens
    max_prompt: int  # longest prefill
    batch: int  # the decoder's largest batch: sequences decoded together, one KV-cache slot each
    vision_batch: int

    @classmethod
    def resolve(
        cls, recipe: Recipe, target: Target, model_context: int, context: int | None = None, batch: int | None = None
    ) -> BuildSettings:
        """Explicit options, else the target's defaults, else the recipe's; never past the model's
        context. Without an explicit batch it is 1 here: `fit_batch` raises it to what the memory
        plan holds."""
        if context is not None and not 2 <= context <= model_context:
            raise MvlmError(
                f"--context {context}: expected 2 to the model's context of {model_context} (max_position_embeddings)"
            )
        if batch is not None and batch < 1:
            raise MvlmError(f"--max-batch {batch}: expected at least 1")
        if context is None:
            context = int(target.defaults.get("context") or recipe.defaults["context"])
        ctx = min(context, model_context)
        max_prompt = min(int(recipe.defaults["max_prompt"]), ctx - 1)
        b = 1 if batch is None else batch
        return cls(context=ctx, max_prompt=max_prompt, batch=b, vision_batch=int(recipe.defaults["vision_batch"]))


@dataclass
class MemoryPlan:
    rows: list[tuple[str, float]] = field(default_factory=list)  # (item, bytes)
    budget: float = 0.0
    workspace: int = 0

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def fits(self) -> bool:
        return self.total + MIN_WORKSPACE <= self.budget

    def table(self) -> str:
        rows = [
            *self.rows,
            ("total", self.total),
            ("budget of the target", self.budget),
            ("TensorRT workspace pool (limit)", self.workspace),
        ]
        return render_table(("memory plan", "GiB"), [(name, f"{b / GIB:8.2f}") for name, b in rows])

    def to_json(self) -> dict[str, Any]:
        return {
            "items_gib": {name: round(b / GIB, 3) for name, b in self.rows},
            "total_gib": round(self.total / GIB, 3),
            "budget_gib": round(self.budget / GIB, 3),
            "workspace_gib": round(self.workspace / GIB, 3),
        }


def _weight_bytes(params: float, precision: str, group: int) -> float:
    if precision == "int4":
        return params / 2 + params / group * FP16  # packed nibbles + FP16 scale per group
    if precision == "int8":
        return params  # one byte per weight; one scale per output channel is negligible
    return params * (4 if precision == "fp32" else FP16)


def plan_memory(geometry: Geometry, recipe: Recipe, target: Target, settings: BuildSettings) -> MemoryPlan:
    """Weights (by the recipe's precisions), KV cache, activations: against the target's budget."""
    g = geometry
    precision = recipe.precision
    decoder = precision["decoder"]
    vision_params = (
        g.vision_layers_used * (4 * g.vision_hidden**2 + 2 * g.vision_hidden * g.vision_mlp)
        + 577 * g.vision_hidden
        + 3 * 14 * 14 * g.vision_hidden
    )
    projector_params = g.mm_hidden * g.hidden + g.hidden * g.hidden + 10 * g.hidden
    attention = 2 * g.hidden * g.hidden + 2 * g.hidden * g.kv_heads * g.head_dim
    linear_params = g.layers * (attention + 3 * g.hidden * g.mlp)
    table = g.vocab * g.hidden
    group = int(decoder.get("group_size", 128))
    # Kept out of INT4: as exported (fp16) or weight-only INT8 (`lm_head: int8`); else INT4.
    lm_head = decoder.get("lm_head", "fp16") if "lm_head" in decoder.get("keep_fp16", []) else decoder["weights"]
    # One cache preallocated by the runtime (runtime/kv_cache.py): a slot per sequence of the largest
    # batch, each at the full context; each step reads the past from it and writes its new rows into
    # it, so nothing else holds K/V.
    kv_bytes = 2 * g.layers * settings.batch * g.kv_heads * g.head_dim * settings.context * FP16
    # The runtime's prefix cache (runtime/prefix_cache.py) keeps finished sequences' K/V for prompts
    # that start the same way; its default budget is one sequence at the context (--prefix-cache-mib).
    prefix_cache_bytes = kv_bytes / settings.batch
    # A prefill is one sequence (a joining request's prompt, in chunks of at most max_prompt); a
    # decode step is one token of each of up to `batch` sequences: the prefill is the larger call.
    call_tokens = max(settings.max_prompt, settings.batch)
    # One execution context per engine, so one activation block each: TensorRT sizes it for the
    # largest profile, the prefill (the decoder) and the vision batch. Logits are not in it: the
    # runtime binds one row of its own per sequence (only the last position is asked for).
    activations = (
        g.heads * settings.max_prompt * settings.max_prompt * (FP16 + 4)  # scores, fp32 softmax
        + g.heads * settings.batch * settings.context * (FP16 + 4)  # a decode step's scores over the past
        + 6 * call_tokens * max(g.hidden, g.mlp) * FP16  # hidden states and MLP intermediates
        + settings.vision_batch * 577 * g.vision_hidden * 16 * FP16  # vision encoder
    )
    runtime_buffers = call_tokens * (g.hidden * FP16 + 8) + settings.batch * g.vocab * FP16
    plan = MemoryPlan(budget=target.memory_budget_gb * GIB)
    plan.rows = [
        (f"vision weights ({precision['vision']})", _weight_bytes(vision_params, precision["vision"], group)),
        (
            f"projector weights ({precision['projector']})",
            _weight_bytes(projector_params, precision["projector"], group),
        ),
        (
            f"decoder linear weights ({decoder['weights']}, group {group})",
            _weight_bytes(linear_params, decoder["weights"], group),
        ),
        (f"lm_head ({lm_head})", _weight_bytes(table, lm_head, group)),
        ("token embedding table (fp16, host side)", table * FP16),
        (f"KV cache (fp16, {settings.batch} slots at context {settings.context}, one preallocated)", kv_bytes),
        (f"prefix cache (fp16, one sequence at context {settings.context}: the run-time default)", prefix_cache_bytes),
        (
            f"activations (one block per engine: prefill {settings.max_prompt} tokens, "
            f"vision batch {settings.vision_batch})",
            activations,
        ),
        ("runtime buffers (prompt embeddings, positions, one logits row)", runtime_buffers),
    ]
    plan.workspace = int(max(MIN_WORKSPACE, min(MAX_WORKSPACE, (plan.budget - plan.total) / 2)))
    return plan


def check_fits(plan: MemoryPlan, target: Target, recipe: Recipe) -> None:
    if not plan.fits:
        raise MvlmError(
            f"--target {target.name}: {recipe.name} needs {plan.total / GIB:.2f} GiB + "
            f"{MIN_WORKSPACE / GIB:.2f} GiB workspace but the target's budget is {plan.budget / GIB:.2f} GiB "
            f"(lower --context or --max-batch): " + "; ".join(f"{name} {b / GIB:.2f} GiB" for name, b in plan.rows)
        )


def fit_batch(geometry: Geometry, recipe: Recipe, target: Target, settings: BuildSettings) -> BuildSettings:
    """`settings` with the largest batch up to MAX_DEFAULT_BATCH whose memory plan fits the target
    (a KV-cache slot per sequence at the context); batch 1 when none does (check_fits then says why)."""
    for batch in range(MAX_DEFAULT_BATCH, 1, -1):
        candidate = dataclasses.replace(settings, batch=batch)
        if plan_memory(geometry, recipe, target, candidate).fits:
            return candidate
    return dataclasses.replace(settings, batch=1)


def optimization_profiles(geometry: Geometry, settings: BuildSettings) -> dict[str, list[dict[str, list[list[int]]]]]:
    """Per graph, a list of profiles: {input name: [min, opt, max] shapes}.

    The decoder gets two profiles in ONE engine rather than two engines: prefill (one sequence,
    seq up to the longest prompt, after a past of up to context - 1: a prompt is prefilled in
    chunks beside running sequences) and decode (seq = 1 for each of 1 to `batch` sequences, past
    up to context - 1). The past's second axis is the cache's slots (`batch` of them; verification
    binds one). One engine holds the weights once, which matters on an 8-16 GB Orin; the runtime
    picks the profile per call.
    """
    g, s = geometry, settings
    vb = [1, s.vision_batch, s.vision_batch]
    slots = [1, s.batch, s.batch]
    vision = {contract.VISION_INPUT: [[n, 3, 336, 336] for n in vb]}
    projector = {contract.PROJECTOR_INPUT: [[n, 576, g.mm_hidden] for n in vb]}

    def decoder_profile(b: list[int], seq: list[int], past: list[int], logits: list[int]) -> dict[str, list[list[int]]]:
        profile = {
            contract.DECODER_EMBEDS: [[n, q, g.hidden] for n, q in zip(b, seq)],
            contract.DECODER_POSITIONS: [[n, q] for n, q in zip(b, seq)],
            contract.DECODER_LOGITS_INDEX: [[k] for k in logits],
        }
        for layer in range(g.layers):
            for name in contract.past_names(layer):
                profile[name] = [[p, n, g.kv_heads, g.head_dim] for n, p in zip(slots, past)]
        return profile

    # The runtime asks a prefill for the last position's logits (opt 1); verification asks for all.
    prefill = decoder_profile(
        b=[1, 1, 1],
        seq=[1, max(1, s.max_prompt // 2), s.max_prompt],
        past=[0, 0, s.context - 1],
        logits=[1, 1, s.max_prompt],
    )
    decode = decoder_profile(
        b=[1, s.batch, s.batch], seq=[1, 1, 1], past=[1, s.context // 2, s.context - 1], logits=[1, 1, 1]
    )
    return {"vision": [vision], "projector": [projector], "decoder": [prefill, decode]}


@dataclass
class DecodeTraffic:
    """Analytic bytes one decode step moves on the TensorRT path, at a past length.

    From the built graph (its weights: every one is read once per step) and the runtime's buffer
    plan (runtime/kv_cache.py: the past read once where it lies, one new row written per layer,
    one embedding row up and one logits row down). Activations are an upper bound at batch 1
    (every intermediate written and read once, nothing fused). The past's transposes in the graph
    are taken as folded into their MatMuls' operand strides (TensorRT's usual fusion; had it
    copied them, the KV term would count three times): only a profile on the Jetson can confirm.
    """

    past: int
    rows: list[tuple[str, float]] = field(default_factory=list)  # (item, bytes)
    floor: float = 0.0  # weights + the past's K/V read once

    @property
    def total(self) -> float:
        return sum(b for _, b in self.rows)

    @property
    def ratio(self) -> float:
        return self.total / self.floor

    def table(self) -> str:
        rows = [
            *self.rows,
            ("total", self.total),
            ("floor: weights + K/V read once", self.floor),
        ]
        body = [(name, f"{b / 2**20:10.2f}") for name, b in rows] + [("total / floor", f"{self.ratio:10.3f}")]
        return render_table((f"decode step at past {self.past}: bytes moved", "MiB"), body)

    def to_json(self) -> dict[str, Any]:
        return {
            "past": self.past,
            "items_mib": {name: round(b / 2**20, 3) for name, b in self.rows},
            "total_mib": round(self.total / 2**20, 3),
            "floor_mib": round(self.floor / 2**20, 3),
            "total_over_floor": round(self.ratio, 4),
        }


def decode_traffic(decoder_graph: Path, geometry: Geometry, past: int = 1000) -> DecodeTraffic:
    """The bytes of one decode step (batch 1, FP16 activations and cache) after `past` tokens."""
    g = geometry
    weights = weight_bytes(load_model(decoder_graph, load_weights=False))
    row = g.kv_heads * g.head_dim * FP16  # one token's keys (or values) of one layer
    kv_read = 2 * g.layers * past * row
    traffic = DecodeTraffic(past=past, floor=weights + kv_read)
    traffic.rows = [
        ("weights (each read once)", weights),
        (f"K/V of the past read in place ({past} rows x {g.layers} layers x 2)", kv_read),
        ("new K/V rows written at their offset", 2 * g.layers * row),
        ("activations (upper bound: nothing fused)", step_activation_bytes(g, past)),
        ("host <-> device: one embedding row up, one logits row down", step_host_bytes(g)),
    ]
    return traffic


def step_activation_bytes(geometry: Geometry, past: int) -> float:
    """Activation bytes of one sequence's decode step after `past` tokens (FP16, FP32 softmax): an
    upper bound, every intermediate written and read once, nothing fused."""
    g = geometry
    per_layer = (
        12 * g.hidden * FP16  # norms, projections' outputs, residuals, RoPE (hidden-sized vectors)
        + 4 * g.mlp * FP16  # gate, up, their product, silu
        + g.heads * (past + 1) * (FP16 + 4 + 4 + FP16)  # scores, fp32 softmax in and out, probabilities
    )
    return 2 * g.layers * per_layer + 2 * g.vocab * FP16


def step_host_bytes(geometry: Geometry) -> float:
    """Host <-> device bytes of one sequence's decode step: its embedding row up, its logits row
    down, its position and logits index (int64)."""
    return (geometry.hidden + geometry.vocab) * FP16 + 16
