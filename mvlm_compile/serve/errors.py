"""Errors as OpenAI sends them: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

from __future__ import annotations

import re

from starlette.responses import JSONResponse

from mvlm_compile.errors import MvlmError

TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    403: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}

# The session's messages name `mvlm-compile run`'s options; a client knows the request's fields.
_SESSION_OPTIONS = {
    "--max-new-tokens": "max_tokens",
    "--temperature": "temperature",
    "--top-p": "top_p",
    "--seed": "seed",
    "--stop": "stop",
    "--prompt": "messages",
}
# The request field a session's message starts with: messages, messages[2], messages[1].content...
_FIELD = re.compile(r"(messages(?:\[\d+\])?(?:\.[a-z_]+)?)[: ]")


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def body(self) -> dict:
        kind = TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def field_of(message: str) -> str | None:
    """The request's field a message about the conversation starts with ("messages[2]: ..." -> messages[2])."""
    found = _FIELD.match(message)
    return found.group(1) if found else None


def from_session_error(error: MvlmError, image_param: str | None, max_tokens_given: bool) -> APIError:
    """A 400 for what Session.chat refused, in the request's terms (max_tokens, not --max-new-tokens),
    its param the field the message starts with (messages[i]...). A context overflow is the prompt's
    fault unless the request asked for max_tokens."""
    message = error.format_message()
    param = field_of(message)
    if message.startswith("image:") and image_param:  # decoding the image failed: name where it is in the request
        param, message = image_param, image_param + message[len("image") :]
    for option, field in _SESSION_OPTIONS.items():
        if option in message:
            overflow = "exceed the context" in message
            if overflow and max_tokens_given:
                param = "max_tokens"
            param = param or ("messages" if overflow else field)
            message = message.replace(option, field)
    return APIError(400, message, param=param)
