"""MobileVLM V2 inference over a backend: image -> image embeddings -> prompt -> prefill -> decode."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from mvlm_compile import contract
from mvlm_compile.manifest import Manifest


class Backend(Protocol):
    manifest: Manifest
    artifacts: Path

    def run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def input_dtype(self, graph: str, name: str) -> type: ...


class Pipeline:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        model = backend.manifest.model
        self.num_layers = int(model["num_layers"])
        self.kv_heads = int(model["num_kv_heads"])
        self.head_dim = int(model["head_dim"])
        self.image_token_index = int(model["image_token_index"])
        table_path = backend.artifacts / backend.manifest.files["embed_tokens"]
        self.embed_table = np.load(table_path, mmap_mode="r", allow_pickle=False)
        self.kv_dtype = backend.input_dtype("decoder", contract.past_names(0)[0])

    def image_embeds(self, pixel_values: np.ndarray) -> np.ndarray:
        features = self.backend.run("vision", {contract.VISION_INPUT: pixel_values})[contract.VISION_OUTPUT]
        return self.backend.run("projector", {contract.PROJECTOR_INPUT: features})[contract.PROJECTOR_OUTPUT]

    def embed(self, token_ids: Sequence[int]) -> np.ndarray:
        return np.asarray(self.embed_table[np.asarray(token_ids, dtype=np.int64)])[None]

    def splice(self, input_ids: Sequence[int], image_embeds: np.ndarray) -> np.ndarray:
        """[1, seq, hidden] with the image embeddings where the prompt has the image token."""
        at = list(input_ids).index(self.image_token_index)
        parts = [self.embed(input_ids[:at]), image_embeds.astype(self.embed_table.dtype), self.embed(input_ids[at + 1 :])]
        return np.concatenate(parts, axis=1)

    def empty_cache(self, batch: int = 1) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), self.kv_dtype)] * (2 * self.num_layers)

    def step(self, embeds: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decoder call: logits of the last position, and the grown cache."""
        batch, seq = embeds.shape[:2]
        past_len = past[0].shape[2]
        feed = {
            contract.DECODER_EMBEDS: embeds,
            contract.DECODER_MASK: np.ones((batch, past_len + seq), np.int64),
            contract.DECODER_POSITIONS: np.arange(past_len, past_len + seq, dtype=np.int64)[None].repeat(batch, 0),
        }
        feed.update(zip(contract.decoder_input_names(self.num_layers)[3:], past))
        out = self.backend.run("decoder", feed)
        present = [out[name] for name in contract.decoder_output_names(self.num_layers)[1:]]
        return out[contract.DECODER_LOGITS][:, -1].astype(np.float32), present

    def greedy(self, inputs_embeds: np.ndarray, max_new_tokens: int) -> list[int]:
        """Greedy tokens for one sequence (no stop at EOS: the golden run has none)."""
        logits, past = self.step(inputs_embeds, self.empty_cache())
        tokens: list[int] = []
        while True:
            tokens.append(int(logits[0].argmax()))
            if len(tokens) == max_new_tokens:
                return tokens
            logits, past = self.step(self.embed([tokens[-1]]), past)
