"""Locust users for benchmarks/serve_bench.py: each asks a question about the golden shapes image
through `POST /v1/chat/completions`, streamed, and waits for the whole answer before the next.

Three entries per request in Locust's statistics: "POST /v1/chat/completions" (to the response's
headers; its failures are the requests' failures), and two custom events: "TTFT chat" (request sent
-> first text) and "ANSWER chat" (request sent -> [DONE]). A request fails on a status other
than 200, an error event, no finish_reason or no [DONE]. Greedy, so the answers are known: a
"describe" answer other than the FP32 reference's is a failure too.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from locust import HttpUser, task

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tiny-shapes"
IMAGE_URL = "data:image/png;base64," + base64.b64encode((GOLDEN / "image.png").read_bytes()).decode()
QUESTIONS = ["Describe the image in one sentence.", "How many shapes are there?", "What shape is on the left?"]
EXPECTED = os.environ.get("SERVE_BENCH_EXPECTED")  # the reference's answer to QUESTIONS[0]


class ChatUser(HttpUser):
    # No think time: each user keeps one request in flight, so users = concurrent requests.
    def on_start(self) -> None:
        self.model = self.client.get("/v1/models").json()["data"][0]["id"]
        self.turn = 0

    @task
    def ask(self) -> None:
        question = QUESTIONS[self.turn % len(QUESTIONS)]
        self.turn += 1
        body = {
            "model": self.model,
            "stream": True,
            "max_tokens": 64,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": question},
                        {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                    ],
                }
            ],
        }
        started = time.perf_counter()
        first_at = None
        text, finish_reason, done = "", None, False
        with self.client.post("/v1/chat/completions", json=body, stream=True, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(decode_unicode=True):
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    response.failure(event["error"]["message"])
                    return
                choice = event["choices"][0]
                if choice["delta"].get("content"):
                    if first_at is None:
                        first_at = time.perf_counter()
                    text += choice["delta"]["content"]
                finish_reason = choice["finish_reason"] or finish_reason
            if not done or finish_reason is None:
                response.failure(f"the stream ended without its finish_reason or [DONE] ({text!r})")
            elif question == QUESTIONS[0] and EXPECTED is not None and text != EXPECTED:
                response.failure(f"wrong answer: {text!r}")
            else:
                response.success()
        if first_at is not None:
            self._record("TTFT", first_at - started)
            self._record("ANSWER", time.perf_counter() - started)

    def _record(self, kind: str, seconds: float) -> None:
        self.environment.events.request.fire(
            request_type=kind, name="chat", response_time=seconds * 1000, response_length=0, exception=None, context={}
        )
