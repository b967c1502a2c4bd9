"""An image_url's bytes: a base64 data URL, or (only when the server allows it) an http(s) URL fetched
with a time limit and a size cap. Decoding the bytes is the session's job (it refuses non-images)."""

from __future__ import annotations

import asyncio
import base64
import binascii

import httpx

from mvlm_compile.serve.errors import APIError


async def image_bytes(
    url: str, param: str, max_bytes: int, fetcher: httpx.AsyncClient | None, fetch_timeout: float
) -> bytes:
    """The image's encoded bytes; `fetcher` is None when remote images are refused."""
    if url.startswith("data:"):
        return await asyncio.to_thread(_data_url, url, param, max_bytes)  # megabytes: not on the event loop
    if url.startswith(("http://", "https://")):
        if fetcher is None:
            raise APIError(
                400,
                f"{param}: remote image URLs are refused by this server (it was started without "
                "--allow-remote-images); send the image as a base64 data URL",
                param=param,
                code="remote_images_disabled",
            )
        try:
            return await asyncio.wait_for(_fetch(fetcher, url, param, max_bytes), fetch_timeout)
        except asyncio.TimeoutError:
            raise APIError(400, f"{param}: fetching the image took longer than {fetch_timeout:g} s", param) from None
    raise APIError(400, f"{param}: expected a data:image/...;base64 URL (or http(s) when allowed)", param=param)


def _data_url(url: str, param: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    media_type, *attributes = header[len("data:") :].split(";")
    if not comma or "base64" not in attributes:
        raise APIError(400, f"{param}: a data URL must be base64 (data:image/png;base64,...)", param=param)
    if media_type and not media_type.startswith("image/"):
        raise APIError(400, f"{param}: media type {media_type!r}; expected image/*", param=param)
    if len(payload) * 3 // 4 > max_bytes + 2:  # before decoding: base64 is 4 characters per 3 bytes
        raise _too_large(param, max_bytes)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: not valid base64 ({e})", param=param) from None
    if len(data) > max_bytes:
        raise _too_large(param, max_bytes)
    if not data:
        raise APIError(400, f"{param}: an empty image", param=param)
    return data


async def _fetch(fetcher: httpx.AsyncClient, url: str, param: str, max_bytes: int) -> bytes:
    try:
        async with fetcher.stream("GET", url) as response:
            if response.status_code != 200:
                raise APIError(400, f"{param}: fetching the image answered HTTP {response.status_code}", param=param)
            declared = response.headers.get("content-length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise _too_large(param, max_bytes)
            data = bytearray()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) > max_bytes:
                    raise _too_large(param, max_bytes)
            return bytes(data)
    except httpx.HTTPError as e:
        raise APIError(400, f"{param}: could not fetch the image ({type(e).__name__}: {e})", param=param) from None


def _too_large(param: str, max_bytes: int) -> APIError:
    return APIError(
        400, f"{param}: the image is larger than {max_bytes} bytes (--max-image-bytes)", param, "image_too_large"
    )
