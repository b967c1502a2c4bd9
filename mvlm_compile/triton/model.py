"""Triton Python backend model: MobileVLM V2 answers a question about an image, streamed.

Copied into a model repository by `mvlm-compile triton` (mvlm_compile/triton/repository.py says
what the repository holds). It runs inside Triton's Python backend stub, whose Python must have
mvlm-compile installed; it needs only the runtime's dependencies (no torch).

Decoupled: each request gets one response per text piece (input `stream` true) or one with the
whole answer, then an empty response flagged final. A bad request (not an image, an empty
prompt, options out of range, a prompt beyond the context) gets one error response; the model
and the server carry on. Each instance owns one mvlm_compile.Session, whose scheduler decodes its
concurrent requests together (one KV-cache slot each, `max_batch` of them): `execute` hands each
request to a thread of its own and returns, as decoupled models may, so requests that arrive
while others are answered join them at the next step.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from mvlm_compile import Session
from mvlm_compile.errors import MvlmError
from mvlm_compile.runtime.scheduler import DEFAULT_PREFILL_CHUNK


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        bundle = Path(args["model_repository"]) / args["model_version"] / "bundle"
        embedder = None
        if parameters.get("vision_model"):  # backend trt: the vision and projector engines are Triton's
            embedder = BlsImageEmbedder(parameters["vision_model"], parameters["projector_model"], config["name"])
        self.session = Session(
            bundle / "artifacts",
            backend=parameters["backend"],
            engines=bundle / "engines" if parameters["backend"] == "trt" else None,
            threads=int(parameters.get("threads", "0")),
            int4_activations=parameters.get("int4_activations", "int8"),
            image_embedder=embedder,
            max_batch=int(parameters["max_batch"]) if parameters.get("max_batch") else None,
            prefill_chunk=int(parameters.get("prefill_chunk", DEFAULT_PREFILL_CHUNK)),
            prefix_cache_mib=float(parameters["prefix_cache_mib"]) if parameters.get("prefix_cache_mib") else None,
        )
        self.max_tokens = int(parameters["max_tokens"])
        # A thread per request being answered: the slots, and one more encoding the next image.
        self.answering = ThreadPoolExecutor(self.session.max_batch + 1, thread_name_prefix="mvlm-triton")

    def execute(self, requests: list) -> None:
        for request in requests:
            self.answering.submit(self._respond, request)
        return None

    def _respond(self, request) -> None:
        sender = request.get_response_sender()
        try:
            self._answer(request, sender)
        except MvlmError as e:
            error = pb_utils.TritonError(f"bad request: {e.format_message()}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as e:  # a bug of ours: this request fails, the next ones are still answered
            pb_utils.Logger.log_error(f"mvlm-compile: internal error: {type(e).__name__}: {e}")
            error = pb_utils.TritonError(f"internal error: {type(e).__name__}: {e}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def _answer(self, request, sender) -> None:
        text = _text(_scalar(request, "text_input"), "text_input")
        image = _input(request, "image")
        if image is None or image.size == 0:
            raise MvlmError("image: missing or empty; expected the bytes of an image file (UINT8)")
        stop = [_text(s, "stop_words") for s in _array(request, "stop_words", [])]
        stream = self.session.generate(
            image.tobytes(),
            text,
            max_tokens=int(_scalar(request, "max_tokens", self.max_tokens)),
            temperature=float(_scalar(request, "temperature", 0.0)),
            top_p=float(_scalar(request, "top_p", 1.0)),
            seed=int(_scalar(request, "random_seed", 0)),
            stop=[s for s in stop if s] or ("</s>",),  # TensorRT-LLM's clients send "" for no stop word
            stream=True,
        )
        streaming = bool(_scalar(request, "stream", False))
        pieces = []
        for piece in stream:
            if request.is_cancelled():  # the client went away: free its slot at once
                stream.cancel()
                pb_utils.Logger.log_info(
                    f"mvlm-compile: request cancelled by its client after {stream.generation.completion_tokens} tokens"
                )
                break
            if streaming:
                sender.send(_text_response(piece))
            else:
                pieces.append(piece)
        if not streaming and not request.is_cancelled():
            sender.send(_text_response("".join(pieces)))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.session.close()  # cancels what is answered: its threads end at the next piece
        self.answering.shutdown(wait=True)


class BlsImageEmbedder:
    """Pixel values -> image embeddings through the repository's vision and projector `tensorrt`
    models (Business Logic Scripting), outputs asked for in CPU memory."""

    def __init__(self, vision: str, projector: str, caller: str) -> None:
        self.vision, self.projector, self.caller = vision, projector, caller

    def __call__(self, pixel_values: np.ndarray) -> np.ndarray:
        features = self._run(self.vision, "pixel_values", pixel_values.astype(np.float16), "image_features")
        return self._run(self.projector, "image_features", features, "image_embeds")

    def _run(self, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[pb_utils.Tensor(name, np.ascontiguousarray(array))],
            requested_output_names=[output],
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{self.caller} -> {model}: {response.error().message()}")
        return pb_utils.get_output_tensor_by_name(response, output).as_numpy()


def _input(request, name: str) -> np.ndarray | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _array(request, name: str, default: list) -> np.ndarray | list:
    array = _input(request, name)
    return default if array is None else array.reshape(-1)


def _scalar(request, name: str, default: object = None) -> object:
    array = _array(request, name, [])
    if len(array) == 0:
        if default is None:
            raise MvlmError(f"{name}: missing; expected one value")
        return default
    if len(array) != 1:
        raise MvlmError(f"{name}: {len(array)} values; expected one (one request is one question)")
    return array[0].item() if isinstance(array[0], np.generic) else array[0]


def _text(value: object, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise MvlmError(f"{name}: not valid UTF-8 text") from None
    return str(value)


def _text_response(text: str):
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("text_output", np.array([[text.encode("utf-8")]], dtype=np.object_))]
    )
