"""Ask questions about an image with the public runtime API (mvlm_compile.Session).

    python examples/02_python_session/ask_about_image.py BUNDLE IMAGE "What shape is on the left?" "How many?"

The bundle is loaded once; the image is encoded by the vision tower once (the session caches its
embeddings by content), however many questions follow. The first answer is streamed piece by piece.
"""

from __future__ import annotations

import sys

from mvlm_compile import Session


def main(bundle: str, image: str, questions: list[str]) -> None:
    with Session(bundle, backend="ort") as session:
        first, *rest = questions
        print(f"{first} -> ", end="", flush=True)
        stream = session.generate(image, first, max_tokens=32, stream=True)
        for piece in stream:
            print(piece, end="", flush=True)
        print(f"  [{stream.generation.completion_tokens} tokens, {stream.generation.finish_reason}]")
        for question in rest:
            answer = session.generate(image, question, max_tokens=32)
            print(f"{question} -> {answer.text}  [{answer.completion_tokens} tokens, {answer.finish_reason}]")
        info = session.image_cache_info()
        print(f"vision runs: {info.misses}, answered from the image cache: {info.hits}")


if __name__ == "__main__":
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
