"""Images that must not reach pre-processing: refused from the header, before any pixel is decoded.

The 'pad' step allocates the longest side squared: a 200-byte PNG that declares 40000x1 pixels
would ask for 1.6 gigapixels. The files here are made by hand (a PNG header with the declared
size and a few bytes of data), so no test allocates a large image.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from test_model_inputs_files import as_unprivileged_user
from test_model_inputs_weights import assert_one_line_input_error

from mvlm_compile.errors import MvlmError
from mvlm_compile.model.preprocess import MAX_IMAGE_PIXELS, check_image_size, load_image, preprocess_image


def png_declaring(width: int, height: int, rows: int = 1) -> bytes:
    """A PNG whose header says width x height (8-bit grey); its data holds only `rows` rows."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + bytes(width) for _ in range(rows)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if any image is decoded: the refusal must come from the header alone."""

    def refuse(self):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_the_no_decoding_guard_catches_a_decode(tmp_path, no_decoding):
    path = tmp_path / "ok.png"
    path.write_bytes(png_declaring(4, 3, rows=3))
    with pytest.raises(MvlmError, match="an image was decoded"):
        load_image(path)


def test_the_limit_is_the_padded_square():
    assert MAX_IMAGE_PIXELS == 50_000_000
    check_image_size(7071, 1)  # padded to 7071x7071 = 49,999,041 pixels
    check_image_size(7071, 7071)
    with pytest.raises(MvlmError, match=r"7072x1 pixels is padded to a 7072x7072 square \(50\.0 megapixels\)"):
        check_image_size(7072, 1)
    with pytest.raises(MvlmError, match=r"10000x5000 pixels is padded to a 10000x10000 square"):
        check_image_size(10000, 5000)  # 50 megapixels itself, 100 once padded
    with pytest.raises(
        MvlmError, match=r"8000x8000 pixels \(64\.0 megapixels\) is too large; the limit is 50 megapixels"
    ):
        check_image_size(8000, 8000)


def test_a_tiny_png_declaring_40000x1_is_refused_before_decoding(tmp_path, no_decoding):
    path = tmp_path / "wide.png"
    path.write_bytes(png_declaring(40000, 1))
    assert path.stat().st_size < 1000
    with pytest.raises(MvlmError) as info:
        load_image(path)
    assert str(info.value) == (
        f"{path}: 40000x1 pixels is padded to a 40000x40000 square (1600.0 megapixels); "
        "the limit is 50 megapixels for the square (longest side at most 7071 pixels)"
    )


def test_run_refuses_it_in_one_line_and_writes_nothing(tiny_artifacts, tmp_path):
    path = tmp_path / "wide.png"
    path.write_bytes(png_declaring(1, 40000))
    assert_one_line_input_error(
        ["run", tiny_artifacts, "--image", path, "--prompt", "What is this?", "--max-new-tokens", "2"],
        rf"^error: {path}: 1x40000 pixels is padded to a 40000x40000 square",
        tmp_path,
    )


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((9000, 9000), r"9000x9000 pixels \(81\.0 megapixels\) is too large"),  # under Pillow's own limit
        ((10000, 10000), r"refused as a decompression bomb"),  # Pillow warns: an error here
        ((20000, 20000), r"refused as a decompression bomb"),  # Pillow raises
    ],
)
def test_decompression_bombs(tmp_path, no_decoding, size, message):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_declaring(*size))
    with pytest.raises(MvlmError, match=rf"^{path}: {message}"):
        load_image(path)


def test_preprocess_refuses_an_oversized_image_given_in_memory():
    with pytest.raises(MvlmError, match=r"^image: 40000x1 pixels is padded"):
        preprocess_image(Image.new("RGB", (40000, 1)))


def _valid_png(path: Path) -> bytes:
    Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint8).reshape(30, 40, 3)).save(path)
    return path.read_bytes()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), r"empty file \(0 bytes\), not an image$"),
        (
            lambda p: p.write_text("hello, not an image\n"),
            r"not an image file in an accepted format \(PNG, JPEG, WEBP, GIF, BMP, TIFF, PPM\)$",
        ),
        (lambda p: p.write_bytes(_valid_png(p)[:60]), r"not a readable image \(OSError: image file is truncated"),
        (lambda p: p.mkdir(), r"a directory, not an image file$"),
        (lambda p: os.mkfifo(p), r"not a regular file, not an image file$"),
        (lambda p: os.symlink(p.name, p), r"unreadable image file \(Too many levels of symbolic links\)$"),
        (lambda p: None, r"image file not found$"),
    ],
    ids=["empty", "text", "truncated", "directory", "fifo", "symlink-loop", "missing"],
)
def test_files_that_are_not_images(tmp_path, make, message):
    path = tmp_path / "image.png"
    make(path)
    with pytest.raises(MvlmError, match=rf"^{path}: {message}"):
        load_image(path)


def test_unreadable_image(tmp_path_factory):
    import shutil
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mvlm-perm-"))
    try:
        root.chmod(0o755)
        path = root / "image.png"
        _valid_png(path)
        path.chmod(0o644)
        with as_unprivileged_user():
            assert load_image(path).size == (40, 30)  # readable when the mode allows
        path.chmod(0o000)
        with (
            as_unprivileged_user(),
            pytest.raises(MvlmError, match=rf"^{path}: unreadable image file \(Permission denied\)$"),
        ):
            load_image(path)
    finally:
        shutil.rmtree(root)


def test_an_ordinary_image_still_loads(tmp_path):
    path = tmp_path / "ok.png"
    _valid_png(path)
    image = load_image(path)
    assert image.size == (40, 30)
    assert preprocess_image(image).shape == (1, 3, 336, 336)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF"])
def test_damaged_images_are_always_input_errors(tmp_path, fmt):
    """Truncated or bit-flipped small images (fixed seed, bounded): decoded, or refused in one line."""
    import io
    import random

    buffer = io.BytesIO()
    Image.fromarray(np.arange(24 * 32 * 3, dtype=np.uint8).reshape(24, 32, 3)).convert(
        "P" if fmt == "GIF" else "RGB"
    ).save(buffer, fmt)
    good = buffer.getvalue()
    rng = random.Random(3)
    path = tmp_path / "damaged"
    for _ in range(60):
        data = bytearray(good[: rng.randrange(1, len(good) + 1)] if rng.random() < 0.5 else good)
        for _ in range(rng.randrange(0, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
        try:
            assert preprocess_image(load_image(path)).shape == (1, 3, 336, 336)
        except MvlmError as e:
            assert "\n" not in str(e) and str(e).startswith(f"{path}: ")


# Formats and orientation ----------------------------------------------------------------------------


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _picture() -> Image.Image:
    """A 40x24 picture whose every pixel differs from its mirror images (a rotation shows)."""
    y, x = np.mgrid[0:24, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 10, x * y % 256], axis=-1).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM"])
def test_the_accepted_raster_formats_decode(fmt):
    from mvlm_compile.model.preprocess import decode_image

    assert decode_image(_encoded(_picture(), fmt)).size == (40, 24)


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "TGA", "ICO", "SGI"])
def test_other_formats_are_refused_unopened(monkeypatch, fmt):
    """Pillow reads these too (EPS by running Ghostscript); an image from a stranger gets no such parser."""
    from PIL import EpsImagePlugin

    from mvlm_compile.model.preprocess import decode_image

    data = _encoded(_picture(), fmt)
    opened = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: opened.append(args))
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: opened.append(self.format))
    with pytest.raises(MvlmError, match=r"^image: not an image file in an accepted format \(PNG, JPEG, "):
        decode_image(data)
    assert opened == []


def test_a_jpeg_is_turned_upright_by_its_exif_orientation():
    """Orientation 6: the camera was turned, the stored pixels must be rotated 90 degrees clockwise to show."""
    from mvlm_compile.model.preprocess import decode_image

    upright = _encoded(_picture(), "JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    turned = _encoded(_picture(), "JPEG", quality=95, exif=exif.tobytes())
    stored = np.asarray(decode_image(upright))  # the same encoded pixels, without the tag
    shown = np.asarray(decode_image(turned))
    assert shown.shape == (40, 24, 3)
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))
