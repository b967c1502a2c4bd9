"""The public runtime API for apps: load a bundle once, then answer questions about images.

    from mvlm_compile import Session

    with Session("bundle", backend="ort") as session:
        print(session.generate("photo.jpg", "What is in the image?").text)
        for piece in session.generate("photo.jpg", "And its colour?", stream=True):
            print(piece, end="", flush=True)

A session owns one backend (ONNX Runtime sessions or TensorRT engines) and its one preallocated KV
cache, so it answers one request at a time: `generate` may be called from any thread, and the
generations run one after another under the session's lock. Everything a request can get wrong
(options, prompt length, the image) is checked when `generate` is called, before the request waits
for the lock. Image embeddings are cached by the SHA-256 of the image's pixel values (least recently
used first out), so a second question about the same image runs no vision encoder or projector.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mvlm_compile.engines_record import TokenLimits
from mvlm_compile.errors import MvlmError
from mvlm_compile.runtime.pipeline import Chat, Generation, Pipeline, Sampling

ImageInput = str | Path | bytes | Image.Image


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    capacity: int


class TextStream:
    """A streamed answer: iterate for its text pieces; `generation` holds the text and the counts so far.

    `cancel()` (from any thread) ends it between two tokens with finish_reason "cancelled" and frees
    the session for the next request; so does `close()` from the thread that iterates."""

    def __init__(self, generation: Generation, pieces: Generator[str, None, None], cancel: threading.Event) -> None:
        self.generation = generation
        self._pieces = pieces
        self._cancel = cancel

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._cancel.set()

    def close(self) -> None:
        self._cancel.set()
        self._pieces.close()


class Session:
    """A bundle's graphs (backend "ort") or engines (backend "trt"), loaded once, answering questions."""

    def __init__(
        self,
        bundle: str | Path,
        backend: str = "ort",
        engines: str | Path | None = None,
        threads: int = 0,
        int4_activations: str = "int8",
        image_cache_size: int = 32,
        model_id: str | None = None,
        plugin: str | Path | None = None,
        image_embedder: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """`bundle`: a bundle or an artifacts directory. `engines`: the TensorRT engines directory
        (default: the bundle's engines-<target>/). `threads`, `int4_activations`: ONNX Runtime's
        (see `mvlm-compile run --help`). `model_id`: the name clients use (default: the recipe's).
        `plugin`: the PEG plugin library for TensorRT (default: $MVLM_PEG_PLUGIN or this
        installation's build; never one found in the bundle).
        `image_embedder`: pixel values [1, 3, 336, 336] -> image embeddings [1, image tokens, hidden],
        run instead of the backend's vision encoder and projector, whose engines are then not loaded
        (Triton's entry model calls its `tensorrt` models there)."""
        from mvlm_compile.bundle import open_bundle_backend

        if image_cache_size < 0:
            raise MvlmError(f"image_cache_size {image_cache_size}: expected 0 (no cache) or more")
        self._resources = contextlib.ExitStack()
        self.backend = self._resources.enter_context(
            open_bundle_backend(
                Path(bundle),
                backend,
                None if engines is None else Path(engines),
                threads,
                int4_activations,
                None if plugin is None else Path(plugin),
                graphs=None if image_embedder is None else ("decoder",),
            )
        )
        try:
            self._chat = Chat(Pipeline(self.backend))
        except BaseException:
            self._resources.close()
            raise
        self.model_id = model_id or str(self.backend.manifest.model.get("recipe") or Path(bundle).name)
        self._lock = threading.Lock()
        self._embeds: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_capacity = image_cache_size
        self._hits = self._misses = 0
        self._embed_image = image_embedder or self._chat.pipeline.image_embeds
        self._closed = False

    @property
    def limits(self) -> TokenLimits:
        """The longest prompt (image tokens included) and prompt + answer this backend takes."""
        return self.backend.limits

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens the prompt takes in the context, the image's included."""
        return self._chat.prepare(prompt, 1, ()).prompt_tokens

    def generate(
        self,
        image: ImageInput,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = ("</s>",),
        stream: bool = False,
    ) -> Generation | TextStream:
        """Answer `prompt` about `image` (a file path, encoded bytes or a PIL image). Greedy when
        temperature is 0. Returns the finished Generation (text, token counts, finish_reason), or
        with stream=True a TextStream of text pieces. Raises MvlmError for a bad request."""
        self._check_open()
        sampling = Sampling(temperature, top_p, seed)
        generation = self._chat.prepare(prompt, max_tokens, tuple(stop))
        key, pixel_values = self._image_key(image)
        cancel = threading.Event()
        pieces = self._answer(generation, key, pixel_values, max_tokens, sampling, tuple(stop), cancel)
        if stream:
            return TextStream(generation, pieces, cancel)
        for _ in pieces:
            pass
        return generation

    def _check_open(self) -> None:
        if self._closed:
            raise MvlmError(f"session of {self.model_id!r}: closed; open a new Session to generate")

    def _image_key(self, image: ImageInput) -> tuple[str, np.ndarray]:
        """(SHA-256 of the pixel values the encoder sees, those pixel values), decoded and checked now.
        Keyed by what determines the embeddings, so whatever changes the pixels (a palette, a mode,
        EXIF orientation) changes the key, and the same picture in two encodings shares one entry."""
        from mvlm_compile.model.preprocess import decode_image, preprocess_image, read_image_file

        if isinstance(image, Image.Image):
            pixel_values = preprocess_image(image)
        elif isinstance(image, bytes | bytearray | memoryview):
            pixel_values = preprocess_image(decode_image(bytes(image), "image"))
        elif isinstance(image, str | Path):
            pixel_values = preprocess_image(decode_image(read_image_file(Path(image)), str(image)))
        else:
            raise MvlmError(f"image: a {type(image).__name__}; expected a file path, encoded bytes or a PIL image")
        digest = hashlib.sha256(f"{pixel_values.dtype}{pixel_values.shape}".encode() + pixel_values.tobytes())
        return digest.hexdigest(), pixel_values

    def _answer(
        self,
        generation: Generation,
        key: str,
        pixel_values: np.ndarray,
        max_tokens: int,
        sampling: Sampling,
        stop: tuple[str, ...],
        cancel: threading.Event,
    ) -> Generator[str, None, None]:
        # A generator: the lock is taken at the first piece asked for and given back when the
        # answer ends, is cancelled or closed, so a streamed answer nobody reads holds nothing.
        with self._lock:
            self._check_open()  # closed while this request waited for the lock
            embeds = self._image_embeds(key, pixel_values)
            yield from self._chat.answer(generation, embeds, max_tokens, sampling, stop, cancel.is_set)

    def _image_embeds(self, key: str, pixel_values: np.ndarray) -> np.ndarray:
        embeds = self._embeds.get(key)
        if embeds is not None:
            self._hits += 1
            self._embeds.move_to_end(key)
            return embeds
        self._misses += 1
        embeds = self._embed_image(pixel_values)
        if self._cache_capacity:
            self._embeds[key] = embeds
            if len(self._embeds) > self._cache_capacity:
                self._embeds.popitem(last=False)
        return embeds

    def image_cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, len(self._embeds), self._cache_capacity)

    def close(self) -> None:
        """Release the backend (sessions or engines, the cache, the bundle's reader lock)."""
        with self._lock:
            self._closed = True
            self._embeds.clear()
            self._resources.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
