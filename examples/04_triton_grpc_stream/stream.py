"""Ask a Triton server that serves a repository made by `mvlm-compile triton` over a gRPC stream,
with Triton's own client (tritonclient), and print the answer as its pieces arrive.

    mvlm-compile triton BUNDLE --out repo && tritonserver --model-repository $PWD/repo &
    python examples/04_triton_grpc_stream/stream.py 127.0.0.1:8001 IMAGE "How many shapes are there?"

The entry model is decoupled: one response per text piece, then an empty response flagged final.
Its inputs are named as Triton's TensorRT-LLM models name them (text_input, max_tokens, stream, ...),
plus `image`, the bytes of the image file; scalars travel as [1, 1] tensors, a batch of one.
"""

from __future__ import annotations

import queue
import sys

import numpy as np
import tritonclient.grpc as grpcclient

MODEL = "mobilevlm"  # mvlm-compile triton's default --model-name


def tensor(name: str, datatype: str, array: np.ndarray) -> grpcclient.InferInput:
    t = grpcclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array)
    return t


def main(url: str, image: str, question: str) -> None:
    with open(image, "rb") as f:
        image_bytes = np.frombuffer(f.read(), dtype=np.uint8)[None]
    inputs = [
        tensor("text_input", "BYTES", np.array([[question.encode()]], dtype=np.object_)),
        tensor("image", "UINT8", image_bytes),
        tensor("max_tokens", "INT32", np.array([[64]], dtype=np.int32)),
        tensor("stream", "BOOL", np.array([[True]])),
    ]
    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
        print(f"{question} -> ", end="", flush=True)
        pieces = 0
        while True:
            result, error = responses.get(timeout=120)
            if error is not None:
                sys.exit(f"\nerror: {error}")
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            print(result.as_numpy("text_output")[0, 0].decode(), end="", flush=True)
            pieces += 1
        print(f"  [{pieces} pieces]")
    finally:
        client.stop_stream()
        client.close()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
