"""The chat-completions request (OpenAI's schema), and what of it this model answers.

The model holds a conversation in its authors' template: an optional system (or developer) message
first, in place of the template's system prompt, then user and assistant turns in turn, the user's
last (the one answered). A message's content is text or a list of parts: text parts (several are
joined by newlines) and, in the first user message only, at most one `image_url` part, the image
the conversation is about; without one the conversation is text only. Anything else (turns out of
order, an image in a later turn or a second image, tool or function messages, other part types,
empty turns) is refused with 400 naming the field, as are options that would change the answer in
ways this server does not implement (n > 1, logprobs, tools, penalties, JSON mode): a clear error
rather than an answer that ignores them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from mvlm_compile.errors import MvlmError
from mvlm_compile.model.prompt import Dialogue, article
from mvlm_compile.serve.errors import APIError, field_of

MAX_STOP_STRINGS = 4  # as OpenAI


class _Lenient(BaseModel):
    # Fields OpenAI adds later are not errors; a field's value has its JSON type ("stream": "yes" is
    # an error, not true; "max_tokens": "5" is not 5).
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None  # the encoder has one resolution: accepted and ignored


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


class OtherPart(_Lenient):
    type: str


def _part_kind(part: object) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    return {"text": "TextPart", "image_url": "ImagePart"}.get(str(kind), "OtherPart")


# Chosen by "type", so that an image part without its url says so (not "unknown part type").
ContentPart = Annotated[
    Annotated[TextPart, Tag("TextPart")]
    | Annotated[ImagePart, Tag("ImagePart")]
    | Annotated[OtherPart, Tag("OtherPart")],
    Discriminator(_part_kind),
]
_UNION_TAGS = {"str", "TextPart", "ImagePart", "OtherPart"}  # in pydantic's error locations, not fields


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatCompletionRequest(_Lenient):
    model: str
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted only at the value that changes nothing (see _UNSUPPORTED).
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


# field -> values that mean "not used"
_UNSUPPORTED = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "functions": (None, []),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
}


ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class Conversation:
    """What the session is asked: the messages as text ({"role", "content"}, one per request message,
    so that the session's errors name the request's messages[i]), the image's URL (None: text only)
    and where it is in the request."""

    messages: tuple[dict[str, str], ...]
    image_url: str | None = None
    image_param: str | None = None  # e.g. messages[0].content[1].image_url.url, for errors


def parse_request(document: object) -> ChatCompletionRequest:
    """The request, or a 400 naming the first field that is wrong."""
    try:
        request = ChatCompletionRequest.model_validate(document)
    except ValidationError as e:
        # Of a union's failed members (content: a string, or a list of parts) the deepest is the one meant.
        error = max(e.errors(), key=lambda error: len(error["loc"]))
        param = _param(error["loc"]) or None
        raise APIError(400, f"{param or 'the request body'}: {error['msg']}", param=param) from None
    for name, unused in _UNSUPPORTED.items():
        if getattr(request, name) not in unused:
            raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported_parameter")
    if request.response_format not in (None, {"type": "text"}):
        raise APIError(400, "response_format: only text is supported", param="response_format")
    return request


def _param(loc: tuple) -> str:
    """pydantic's location -> OpenAI's param: ('messages', 0, 'content') -> messages[0].content."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in _UNION_TAGS or "[" in str(part):
            continue  # pydantic names the union member it tried; not a field of the request
        else:
            text += f".{part}" if text else str(part)
    return text


def the_conversation(request: ChatCompletionRequest) -> Conversation:
    """The request's messages as the template's turns and its image, or a 400 naming the first field
    that is not what this model takes."""
    messages, images = [], []  # images: (where, url)
    for i, message in enumerate(request.messages):
        if message.role not in ROLES:
            raise APIError(
                400,
                f"messages[{i}].role {message.role!r}: expected 'system', 'developer', 'user' or 'assistant' "
                "(this server has no tools or functions)",
                param=f"messages[{i}].role",
            )
        content = message.content
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else list(content or [])
        texts = []
        for j, part in enumerate(parts):
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif isinstance(part, ImagePart):
                images.append((i, j, part.image_url.url))
            else:
                expected = "'text' or 'image_url'" if message.role == "user" else "'text'"
                raise APIError(
                    400,
                    f"messages[{i}].content[{j}].type {part.type!r}: expected {expected}",
                    param=f"messages[{i}].content[{j}].type",
                )
        messages.append({"role": message.role, "content": "\n".join(texts)})
    try:  # the turns' order and text, as the session checks them: before an image is fetched or decoded
        Dialogue.from_messages(messages, image=bool(images))
    except MvlmError as e:
        said = e.format_message()
        raise APIError(400, said, param=field_of(said) or "messages") from None
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    for n, (i, j, _) in enumerate(images):
        where = f"messages[{i}].content[{j}]"
        if i != first_user:
            role = messages[i]["role"]
            turn = "a later user turn" if role == "user" else f"{article(role)} message"
            raise APIError(
                400,
                f"{where}: an image in {turn}; expected the image in the first user turn (messages[{first_user}]), "
                "one image per conversation",
                param=where,
            )
        if n:
            first = f"messages[{images[0][0]}].content[{images[0][1]}]"
            raise APIError(
                400,
                f"{where}: a second image (the first is {first}); expected at most one image per conversation",
                param=where,
            )
    if not images:
        return Conversation(tuple(messages))
    i, j, url = images[0]
    return Conversation(tuple(messages), url, f"messages[{i}].content[{j}].image_url.url")


def max_new_tokens(request: ChatCompletionRequest) -> int | None:
    value = request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens
    name = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
    if value is not None and value < 1:
        raise APIError(400, f"{name} {value}: expected at least 1", param=name)
    return value


def stop_strings(request: ChatCompletionRequest) -> tuple[str, ...]:
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop: {len(stop)} strings; at most {MAX_STOP_STRINGS}", param="stop")
    if any(not s for s in stop):
        raise APIError(400, "stop: an empty string would stop before the first token", param="stop")
    return tuple(stop) or ("</s>",)
