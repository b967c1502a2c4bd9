"""MobileVLM V2 image pre-processing, torch-free (the Jetson runtime uses it too).

'pad' aspect ratio: expand to a square filled with the CLIP mean colour, then the CLIP
image processor: resize the shortest side to 336 (bicubic), centre crop 336x336,
rescale by 1/255, normalise with CLIP's mean/std. Output float32 [1, 3, 336, 336].

Sample depth: Pillow's convert("RGB") clips samples above 255, which turned a 16-bit image
white. Unsigned 16-bit samples (modes I;16*: 16-bit greyscale PNG, TIFF; 16-bit PGM, which
Pillow decodes as mode I scaled to 0..65535) are scaled to 8 bits by that range, v * 255 / 65535
rounded; 16-bit colour PNG/PPM/TIFF come out of Pillow as 8-bit RGB already. 32-bit integer or
float samples (modes I and F: TIFF, in-memory images) have no fixed intensity range to scale by
and are refused.

Size limit: the 'pad' step allocates the longest side squared, so an image is refused when
that padded square exceeds MAX_IMAGE_PIXELS (50 megapixels: any side longer than 7071
pixels), judged from the file's header before anything is decoded. A small file that
declares 40000x1 pixels, or a decompression bomb, is an input error, not an out-of-memory.
"""

from __future__ import annotations

import io
import math
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mvlm_compile.errors import MvlmError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_SIZE = 336
MAX_IMAGE_PIXELS = 50_000_000  # of the padded square: about 150 MB as 8-bit RGB
MAX_IMAGE_FILE_BYTES = 256 * 2**20  # read whole before decoding: larger than any image within MAX_IMAGE_PIXELS
# The raster formats an image may be in. Pillow knows many more, some of which run other programs
# (EPS starts Ghostscript) or parse rarely exercised containers: an image from a stranger gets none of them.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")


def expand_to_square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """The authors' expand2square: paste the image centred on a square of `fill`."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), fill)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def _resize_shortest_edge(image: Image.Image, size: int) -> Image.Image:
    # Same arithmetic as transformers' get_resize_output_image_size(default_to_square=False).
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    new_size = (new_short, new_long) if width <= height else (new_long, new_short)
    return image.resize(new_size, resample=Image.Resampling.BICUBIC)


def _center_crop(array: np.ndarray, size: int) -> np.ndarray:
    height, width = array.shape[:2]
    top = (height - size) // 2
    left = (width - size) // 2
    return array[top : top + size, left : left + size]


def check_image_size(width: int, height: int, what: str = "image") -> None:
    """Refuse an image whose padded square would exceed MAX_IMAGE_PIXELS (or that has no pixels)."""
    if width <= 0 or height <= 0:
        raise MvlmError(f"{what}: {width}x{height} pixels, an empty image")
    side = max(width, height)
    if side * side <= MAX_IMAGE_PIXELS:
        return
    limit = f"the limit is {MAX_IMAGE_PIXELS / 1e6:g} megapixels"
    if width * height > MAX_IMAGE_PIXELS:
        raise MvlmError(
            f"{what}: {width}x{height} pixels ({width * height / 1e6:.1f} megapixels) is too large; {limit}"
        )
    raise MvlmError(
        f"{what}: {width}x{height} pixels is padded to a {side}x{side} square ({side * side / 1e6:.1f} megapixels); "
        f"{limit} for the square (longest side at most {math.isqrt(MAX_IMAGE_PIXELS)} pixels)"
    )


UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # unsigned 16-bit samples, 0..65535
UINT16_MAX = 65535
_UINT16_TO_UINT8 = np.rint(np.arange(UINT16_MAX + 1) * (255 / UINT16_MAX)).astype(np.uint8)
# Formats Pillow decodes 16-bit greyscale from as mode "I", samples scaled to 0..65535.
_UINT16_AS_I_FORMATS = ("PNG", "PPM")


def _uint16_to_rgb(samples: np.ndarray) -> Image.Image:
    # A table of every sample's 8-bit value: one byte per pixel, where float arithmetic took 24.
    return Image.fromarray(_UINT16_TO_UINT8[samples]).convert("RGB")  # 2-D uint8: mode L


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: 16-bit samples scaled by their range (not clipped), 32-bit ones refused."""
    if image.mode in UINT16_MODES:
        return _uint16_to_rgb(np.asarray(image, dtype=np.uint16))
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "32-bit float"
        raise MvlmError(
            f"image mode {image.mode!r} ({kind} samples) has no fixed intensity range to map to 8 bits; "
            "save the image with 8 or 16 bits per sample"
        )
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as e:  # modes Pillow cannot turn into RGB
        raise MvlmError(f"image mode {image.mode!r} cannot be converted to RGB ({e})") from None


def preprocess_image(image: Image.Image, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """PIL image -> pixel_values float32 [1, 3, image_size, image_size]."""
    check_image_size(*image.size)
    rgb = to_rgb(image)
    fill = tuple(int(m * 255) for m in CLIP_MEAN)
    square = expand_to_square(rgb, fill)  # type: ignore[arg-type]
    resized = _resize_shortest_edge(square, image_size)
    array = _center_crop(np.asarray(resized, dtype=np.float32), image_size) * np.float32(1 / 255)
    array = (array - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1)[None], dtype=np.float32)


def read_image_file(path: Path) -> bytes:
    """An image file's bytes: a regular, non-empty file of at most MAX_IMAGE_FILE_BYTES."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise MvlmError(f"{path}: image file not found") from None
    except OSError as e:  # permission denied on a folder, a symlink loop...
        raise MvlmError(f"{path}: unreadable image file ({e.strerror or e})") from None
    if stat.S_ISDIR(info.st_mode):
        raise MvlmError(f"{path}: a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):  # reading a FIFO or a device could block or never end
        raise MvlmError(f"{path}: not a regular file, not an image file")
    if info.st_size == 0:
        raise MvlmError(f"{path}: empty file (0 bytes), not an image")
    if info.st_size > MAX_IMAGE_FILE_BYTES:
        raise MvlmError(f"{path}: {info.st_size} bytes; an image file may have at most {MAX_IMAGE_FILE_BYTES}")
    try:
        return path.read_bytes()
    except OSError as e:
        raise MvlmError(f"{path}: unreadable image file ({e.strerror or e})") from None


def load_image(path: Path) -> Image.Image:
    """Decode an image file as 8-bit RGB (to_rgb), once its header shows that pre-processing stays
    within MAX_IMAGE_PIXELS."""
    return decode_image(read_image_file(path), str(path))


def decode_image(data: bytes, what: str = "image") -> Image.Image:
    """Decode an encoded image in one of IMAGE_FORMATS held in memory as 8-bit RGB (to_rgb), upright
    (its EXIF orientation applied, as a viewer shows it), once its header shows that pre-processing
    stays within MAX_IMAGE_PIXELS. `what` names it in errors."""
    if not data:
        raise MvlmError(f"{what}: empty (0 bytes), not an image")
    try:
        with warnings.catch_warnings():
            # Pillow warns, then raises, at its own higher pixel limit: make both errors here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:  # reads the header only
                check_image_size(*image.size, what=what)
                image.load()
                ImageOps.exif_transpose(image, in_place=True)  # a no-op (no copy) for an upright image
                if image.mode == "I" and image.format in _UINT16_AS_I_FORMATS:  # 16-bit PGM: samples 0..65535
                    return _uint16_to_rgb(np.asarray(image).astype(np.uint16))
                return to_rgb(image)
    except MvlmError as e:
        message = e.format_message()
        raise MvlmError(message if message.startswith(what) else f"{what}: {message}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise MvlmError(f"{what}: refused as a decompression bomb ({e})") from None
    except Image.UnidentifiedImageError:
        raise MvlmError(f"{what}: not an image file in an accepted format ({', '.join(IMAGE_FORMATS)})") from None
    except Exception as e:  # decoders raise OSError, ValueError, SyntaxError, EOFError... on broken files
        raise MvlmError(f"{what}: not a readable image ({type(e).__name__}: {' '.join(str(e).split())})") from None


def golden_image() -> Image.Image:
    """A fixed 400x300 test image made in code: colour gradients, a disc and stripes.

    Non-square so that the 'pad' step matters; deterministic on every platform.
    """
    height, width = 300, 400
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    red = 255 * x / (width - 1)
    green = 255 * y / (height - 1)
    blue = 127.5 + 127.5 * np.sin(x / 17.0) * np.cos(y / 23.0)
    disc = (x - 250) ** 2 + (y - 120) ** 2 < 60**2
    stripes = ((x // 20) % 2 == 0) & (y > 220)
    rgb = np.stack([red, green, blue], axis=-1)
    rgb[disc] = (250, 220, 30)
    rgb[stripes] = (20, 20, 160)
    return Image.fromarray(np.round(rgb).clip(0, 255).astype(np.uint8), mode="RGB")
