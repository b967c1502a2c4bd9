"""`mvlm-compile serve`: an OpenAI-compatible HTTP server over one `mvlm_compile.Session`.

    app.py      the Starlette app: routes, request checks, OpenAI-shaped errors, SSE streaming
    schema.py   the chat-completions request schema (pydantic) and what this model accepts of it
    images.py   an image_url's bytes: base64 data URLs, remote URLs only when allowed
    worker.py   the bounded queue (slots + --max-queue) and the threads carrying each answer's pieces
    metrics.py  the Prometheus metrics
    server.py   uvicorn on a pre-bound socket, SIGTERM drain, load failures as the CLI's exit statuses

Needs the [serve] extra (starlette, uvicorn, pydantic, prometheus-client, httpx); no torch.
"""

from mvlm_compile.serve.app import ServeOptions, create_app
from mvlm_compile.serve.server import serve

__all__ = ["ServeOptions", "create_app", "serve"]
