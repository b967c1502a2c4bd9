"""Ask `mvlm-compile serve` about an image with the official OpenAI client: a whole answer, then the
same question streamed.

    mvlm-compile serve BUNDLE --port 8000 &
    python examples/03_openai_client/chat.py http://127.0.0.1:8000/v1 IMAGE "How many shapes are there?"

The image travels as a base64 data URL (the server fetches remote URLs only with
--allow-remote-images). The API key is the server's --api-key, from $OPENAI_API_KEY; any string
when the server has none.
"""

from __future__ import annotations

import base64
import mimetypes
import os
import sys

import openai


def ask(client: openai.OpenAI, image: str, question: str, **options):
    media_type = mimetypes.guess_type(image)[0] or "image/png"
    with open(image, "rb") as f:
        url = f"data:{media_type};base64,{base64.b64encode(f.read()).decode()}"
    model = client.models.list().data[0].id  # the one model served: the bundle's recipe name by default
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], max_tokens=64, **options
    )


def main(base_url: str, image: str, question: str) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=os.environ.get("OPENAI_API_KEY", "unused"))
    answer = ask(client, image, question)
    usage = answer.usage
    print(f"{question} -> {answer.choices[0].message.content}")
    print(
        f"  [{usage.prompt_tokens} prompt + {usage.completion_tokens} answer tokens, {answer.choices[0].finish_reason}]"
    )
    print("streamed -> ", end="", flush=True)
    for chunk in ask(client, image, question, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
