"""The public runtime API for apps: load a bundle once, then answer questions and hold conversations
about images.

    from mvlm_compile import Session

    with Session("bundle", backend="ort") as session:
        print(session.generate("photo.jpg", "What is in the image?").text)
        chat = session.conversation(image="photo.jpg")
        print(chat.ask("What is in the image?").text)
        for piece in chat.ask("And its colour?", stream=True):
            print(piece, end="", flush=True)

A session owns one backend (ONNX Runtime sessions or TensorRT engines) and one preallocated KV cache
of `max_batch` slots. `generate` may be called from any thread: concurrent requests are decoded
together, each in its own slot, by the runtime's batch scheduler (runtime/scheduler.py: requests
join and leave at step boundaries, prompts are prefilled in chunks between decode steps, sampling
is per request); past `max_batch` they wait for a slot. Everything a request can get wrong
(options, prompt length, the image) is checked when `generate` is called, and the image is encoded
then, in the calling thread (one image at a time; the decoder's thread goes on meanwhile). Image
embeddings are cached by the SHA-256 of the image's pixel values (least recently used first out), shared
by every request, so a second question about the same image runs no vision encoder or projector.

A conversation is answered with the authors' template over all its turns. Its K/V are kept by
content when a sequence finishes (runtime/prefix_cache.py: `prefix_cache_mib` of memory, least
recently used first out), so the next turn, or another request with the same system prompt and
image, prefills only the tokens after the longest kept prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mvlm_compile.engines_record import TokenLimits
from mvlm_compile.errors import MvlmError
from mvlm_compile.model.prompt import Dialogue
from mvlm_compile.runtime.pipeline import Chat, Generation, Pipeline, Sampling
from mvlm_compile.runtime.prefix_cache import PrefixCacheInfo, position_keys
from mvlm_compile.runtime.scheduler import DEFAULT_PREFILL_CHUNK, BatchScheduler, Request, StepInfo

ImageInput = str | Path | bytes | Image.Image

DEFAULT_MAX_BATCH = 4  # ONNX Runtime on a bare artifacts directory: no memory plan to go by


def default_max_batch(bundle: Path, backend: str, limits: TokenLimits) -> int:
    """TensorRT: the decoder engine's largest batch. ONNX Runtime: the batch the bundle's memory plan
    chose for its target (bundle.json), else DEFAULT_MAX_BATCH."""
    from mvlm_compile.bundle import planned_batch

    if backend == "trt":
        return limits.max_batch
    return min(limits.max_batch, planned_batch(bundle) or DEFAULT_MAX_BATCH)


def check_max_batch(max_batch: int, limits: TokenLimits) -> int:
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= limits.max_batch:
        raise MvlmError(f"--max-batch {max_batch}: expected 1 to {limits.max_batch} ({limits.source})")
    return max_batch


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    capacity: int


class TextStream:
    """A streamed answer: iterate for its text pieces; `generation` holds the text and the counts so far.

    The answer is made whether or not it is read (its pieces wait here). `cancel()` (from any thread)
    ends it at the next step boundary with finish_reason "cancelled" and frees its cache slot at
    once; so does `close()`."""

    def __init__(self, request: Request, scheduler: BatchScheduler) -> None:
        self.generation = request.generation
        self._request, self._scheduler = request, scheduler
        self._pieces = request.pieces()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def cancel(self) -> None:
        self._scheduler.cancel(self._request)

    def wait(self, timeout: float | None = None) -> Generation:
        """The generation once it has ended (read or not; after `cancel`, at the next step boundary),
        or as it stands when `timeout` seconds pass first."""
        self._request.ended.wait(timeout)
        return self.generation

    def close(self) -> None:
        self.cancel()


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
        max_batch: int | None = None,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefix_cache_mib: float | None = None,
    ) -> None:
        """`bundle`: a bundle or an artifacts directory. `engines`: the TensorRT engines directory
        (default: the bundle's engines-<target>/). `threads`, `int4_activations`: ONNX Runtime's
        (see `mvlm-compile run --help`). `model_id`: the name clients use (default: the recipe's).
        `plugin`: the PEG plugin library for TensorRT (default: $MVLM_PEG_PLUGIN or this
        installation's build; never one found in the bundle).
        `image_embedder`: pixel values [1, 3, 336, 336] -> image embeddings [1, image tokens, hidden],
        run instead of the backend's vision encoder and projector, whose engines are then not loaded
        (Triton's entry model calls its `tensorrt` models there).
        `max_batch`: the requests decoded together, one KV-cache slot each at the full context
        (default: the engines' largest batch with TensorRT; the bundle's memory plan for its target
        with ONNX Runtime, else 4). `prefill_chunk`: the prompt tokens prefilled between two decode
        steps (smaller: shorter pauses of the running streams while a request joins).
        `prefix_cache_mib`: memory (MiB) that keeps finished sequences' K/V for prompts that start
        the same way (default: one sequence at the full context; 0: no reuse)."""
        from mvlm_compile.bundle import open_bundle_backend

        if image_cache_size < 0:
            raise MvlmError(f"image_cache_size {image_cache_size}: expected 0 (no cache) or more")
        check_prefix_cache_mib(prefix_cache_mib)
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
            pipeline = Pipeline(self.backend)
            self.max_batch = check_max_batch(
                default_max_batch(Path(bundle), self.backend.name, self.backend.limits)
                if max_batch is None
                else max_batch,
                self.backend.limits,
            )
            decoder = self.backend.decoder(self.max_batch)
            self._scheduler = BatchScheduler(
                decoder,
                pipeline.embed,
                prefill_chunk,
                self.backend.limits.prefill_after_past,
                decoder.plan.sequence_bytes(decoder.plan.context)
                if prefix_cache_mib is None
                else int(prefix_cache_mib * 2**20),
            )
            self._chat = Chat(pipeline, chunked_prefill=self._scheduler.prefill_chunk is not None)
        except BaseException:
            self._resources.close()
            raise
        self.model_id = model_id or str(self.backend.manifest.model.get("recipe") or Path(bundle).name)
        self._closed = False
        self._embed_lock = threading.Lock()  # one image encoded at a time; guards the cache
        self._embeds: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_capacity = image_cache_size
        self._hits = self._misses = 0
        self._embed_image = image_embedder or self._chat.pipeline.image_embeds

    @property
    def limits(self) -> TokenLimits:
        """The longest prompt (image tokens included) and prompt + answer this backend takes."""
        return self.backend.limits

    def prompt_tokens(self, prompt: str | Sequence[Mapping[str, str]], image: bool = True) -> int:
        """Tokens a question (or a conversation's messages) takes in the context, the image's included."""
        return self._chat.prepare(_dialogue(prompt, image), 1, ()).prompt_tokens

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
        return self._submit(prompt, image, max_tokens, temperature, top_p, seed, stop, stream)

    def chat(
        self,
        messages: Sequence[Mapping[str, str]],
        image: ImageInput | None = None,
        max_tokens: int | None = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        stop: Sequence[str] = ("</s>",),
        stream: bool = False,
    ) -> Generation | TextStream:
        """Answer the last user turn of a conversation: `messages` as OpenAI's ({"role", "content"}:
        an optional system message first, in place of the template's system prompt, then user and
        assistant turns in turn, the user's last). `image` (optional) goes in the first user turn;
        without one the conversation is text only. Options and result as `generate`."""
        dialogue = Dialogue.from_messages(messages, image is not None)
        return self._submit(dialogue, image, max_tokens, temperature, top_p, seed, stop, stream)

    def conversation(self, image: ImageInput | None = None, system: str | None = None) -> Conversation:
        """A conversation that remembers its turns: `ask` a question, then ask again."""
        return Conversation(self, image, system)

    def _submit(
        self,
        prompt: str | Dialogue,
        image: ImageInput | None,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        seed: int,
        stop: Sequence[str],
        stream: bool,
    ) -> Generation | TextStream:
        self._check_open()
        if image is None and isinstance(prompt, str):
            raise MvlmError("image: none given; a question is about an image (Session.chat takes text-only turns)")
        sampling = Sampling(temperature, top_p, seed)
        generation = self._chat.prepare(prompt, max_tokens, tuple(stop))
        pipeline = self._chat.pipeline
        if image is None:
            key = None
            prompt_embeds = pipeline.embed(generation.prompt_ids)
        else:
            key, pixel_values = self._image_key(image)
            prompt_embeds = pipeline.splice(generation.prompt_ids, self._image_embeds(key, pixel_values))
        keys = position_keys(generation.prompt_ids, pipeline.image_token_index, key, self._chat.image_tokens)
        request = Request(generation, prompt_embeds, self._chat.answer_text(generation, stop), sampling, keys)
        self._scheduler.submit(request)
        answer = TextStream(request, self._scheduler)
        if stream:
            return answer
        for _ in answer:
            pass
        return generation

    def add_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        """Call `listener(info)` after every step of the scheduler, on its thread (metrics)."""
        self._scheduler.listeners.append(listener)

    @property
    def slots_in_use(self) -> int:
        """Requests holding a cache slot (decoding, or having their prompt prefilled)."""
        return self._scheduler.slots_in_use

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

    def _image_embeds(self, key: str, pixel_values: np.ndarray) -> np.ndarray:
        with self._embed_lock:
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

    def prefix_cache_info(self) -> PrefixCacheInfo | None:
        """The kept prefixes' pages and how often prompts reused them (None: no prefix reuse)."""
        cache = self._scheduler.prefix_cache
        return None if cache is None else cache.info()

    def close(self) -> None:
        """Cancel what runs or waits, then release the backend (sessions or engines, the cache, the
        bundle's reader lock)."""
        if self._closed:
            return
        self._closed = True
        self._scheduler.close()
        with self._embed_lock:
            self._embeds.clear()
            self._resources.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_prefix_cache_mib(mib: float | None) -> None:
    """None (the default: one sequence at the full context) or 0 MiB (no prefix reuse) or more."""
    if mib is not None and (isinstance(mib, bool) or not isinstance(mib, int | float) or not 0 <= mib < 2**40):
        raise MvlmError(f"--prefix-cache-mib {mib}: expected 0 (no prefix reuse) or more MiB")


def _dialogue(prompt: str | Sequence[Mapping[str, str]], image: bool) -> str | Dialogue:
    return prompt if isinstance(prompt, str) else Dialogue.from_messages(prompt, image)


class Conversation:
    """A conversation about one image (or none) that keeps its turns: each `ask` sends them all, and
    the answer becomes the assistant's turn once it is finished (a stopped stream's text so far;
    none if it stopped before its first token, and then the question is dropped too). The session
    reuses the kept K/V of the turns before, so each turn prefills little more than its question."""

    def __init__(self, session: Session, image: ImageInput | None = None, system: str | None = None) -> None:
        self.session, self.image, self.system = session, image, system
        self.messages: list[dict[str, str]] = []
        self._pending: Generation | None = None

    def ask(self, text: str, stream: bool = False, **options: Any) -> Generation | TextStream:
        """Answer `text` after the turns so far; `options` as Session.chat's (max_tokens, temperature,
        top_p, seed, stop). Raises MvlmError (nothing is added) for a bad request."""
        self._settle()
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages = [*self.messages, {"role": "user", "content": text}]
        answer = self.session.chat([*system, *messages], self.image, stream=stream, **options)
        self.messages = messages
        self._pending = answer.generation if isinstance(answer, TextStream) else answer
        if not stream:
            self._settle()
        return answer

    def reset(self, image: ImageInput | None = None, keep_image: bool = True) -> None:
        """Forget the turns; talk about `image` from now on (when given), or about none (keep_image False)."""
        self._settle()
        self.messages = []
        if image is not None or not keep_image:
            self.image = image

    def _settle(self) -> None:
        """The answer under way, once finished, as the assistant's turn."""
        generation, self._pending = self._pending, None
        if generation is None:
            return
        if generation.finish_reason is None:
            self._pending = generation
            raise MvlmError("the conversation's last answer is still being generated: read or cancel its stream first")
        if generation.text.strip():
            self.messages.append({"role": "assistant", "content": generation.text})
        else:
            self.messages.pop()  # no answer: the question goes too, so that turns stay in turn
