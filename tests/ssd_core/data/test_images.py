"""Image decoding, the decompression-bomb guard, model input and encoding."""

import io
import struct
import zlib

import numpy as np
import psutil
import pytest
import torch
from PIL import Image, ImageOps

from ssd_core.data import images
from ssd_core.data.images import (
    ImageError,
    decode_image_bytes,
    encode_jpeg,
    encode_png,
    image_dimensions,
    model_inputs,
    to_model_input,
)
from ssd_core.models import build_model


def _random_image(height=20, width=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _bomb_png(width=50_000, height=50_000) -> bytes:
    """A valid, tiny PNG declaring a huge RGB image whose few stored rows are zeros."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * width) * 4, 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", rows)
        + _png_chunk(b"IEND", b"")
    )


def test_png_round_trip_is_lossless():
    image = _random_image()
    assert torch.equal(decode_image_bytes(encode_png(image), max_pixels=10_000), image)


def test_jpeg_decodes_to_rgb_close_to_the_original():
    image = torch.zeros(3, 32, 48, dtype=torch.uint8)
    image[0] = 200  # flat red: JPEG keeps it almost exactly
    decoded = decode_image_bytes(encode_jpeg(image, quality=95), max_pixels=10_000)
    assert decoded.shape == (3, 32, 48) and decoded.dtype == torch.uint8
    assert (decoded.int() - image.int()).abs().max() <= 3


def test_grey_and_rgba_pngs_become_rgb():
    grey = _random_image()[:1]
    assert torch.equal(decode_image_bytes(encode_png(grey), 10_000), grey.expand(3, -1, -1))
    rgb = _random_image(2, 3)
    rgba = torch.cat((rgb, torch.full((1, 2, 3), 255, dtype=torch.uint8))).permute(1, 2, 0)  # [H, W, 4]
    rows = b"".join(b"\x00" + bytes(row.flatten().tolist()) for row in rgba)  # filter byte 0 per row
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 3, 2, 8, 6, 0, 0, 0))  # colour type 6 = RGBA
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )
    assert torch.equal(decode_image_bytes(data, 10_000), rgb)


@pytest.mark.parametrize("encode", [encode_png, encode_jpeg])
def test_header_dimensions_are_read_without_decoding(encode):
    assert image_dimensions(encode(_random_image(17, 41))) == (17, 41)


def test_image_at_the_pixel_limit_is_accepted_and_one_over_is_rejected():
    data = encode_png(_random_image(20, 30))
    assert decode_image_bytes(data, max_pixels=600).shape == (3, 20, 30)
    with pytest.raises(ImageError, match="600 pixels exceeds the limit of 599"):
        decode_image_bytes(data, max_pixels=599)


def test_decompression_bomb_is_rejected_before_decoding(monkeypatch):
    bomb = _bomb_png()
    assert len(bomb) < 2_000
    calls = []
    monkeypatch.setattr(images, "decode_image", lambda *args, **kwargs: calls.append(args))
    rss_before = psutil.Process().memory_info().rss
    with pytest.raises(ImageError, match="50000x50000"):
        decode_image_bytes(bomb, max_pixels=4096 * 4096)
    assert calls == []  # the decoder never saw the bytes
    assert psutil.Process().memory_info().rss - rss_before < 50 * 2**20


def test_jpeg_bomb_header_is_rejected():
    data = bytearray(encode_jpeg(_random_image(16, 16)))
    sof = next(i for i in range(2, len(data) - 1) if data[i] == 0xFF and data[i + 1] in (0xC0, 0xC2))
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(ImageError, match="exceeds the limit"):
        decode_image_bytes(bytes(data), max_pixels=10**6)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"GIF89a\x01\x00\x01\x00", "unsupported"),
        (b"hello world, not an image", "unsupported"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage", "truncated PNG"),
        (b"\xff\xd8\xff", "truncated JPEG"),
    ],
)
def test_bad_bytes_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image_bytes(data, max_pixels=10**6)


@pytest.mark.parametrize("encode", [encode_png, encode_jpeg])
def test_truncated_files_raise_image_error(encode):
    data = encode(_random_image(64, 64))
    with pytest.raises(ImageError, match=r"^cannot decode image: [^/]*$"):  # no C++ source paths
        decode_image_bytes(data[: len(data) // 2], max_pixels=10**6)


def test_corrupt_png_body_raises_image_error():
    data = bytearray(encode_png(_random_image(32, 32)))
    data[40:-20] = bytes(len(data) - 60)  # zero the compressed stream, keep the header
    with pytest.raises(ImageError):
        decode_image_bytes(bytes(data), max_pixels=10**6)


def test_image_error_is_a_value_error():
    assert issubclass(ImageError, ValueError)


def test_model_input_normalises_with_mean_and_std():
    image = torch.full((3, 10, 14), 100, dtype=torch.uint8)
    image[1] = 50
    out = to_model_input(image, 8, mean=(100.0, 40.0, 0.0), std=(1.0, 2.0, 50.0))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], torch.zeros(8, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], torch.full((8, 8), 5.0))
    torch.testing.assert_close(out[2], torch.full((8, 8), 2.0))


def test_model_input_downscale_is_antialiased():
    # One-pixel checkerboard: without antialiasing a shrink samples 0s or 255s, with it pixels average.
    rows, cols = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    image = (((rows + cols) % 2) * 255).to(torch.uint8).expand(3, -1, -1)
    out = to_model_input(image, 8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(out, torch.full((3, 8, 8), 127.5), atol=2.0, rtol=0)


def test_model_input_keeps_flat_regions():
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, :16] = 200
    out = to_model_input(image, 4, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    torch.testing.assert_close(out[:, :, 0], torch.full((3, 4), 200.0), atol=0.5, rtol=0)
    torch.testing.assert_close(out[:, :, 3], torch.zeros(3, 4), atol=0.5, rtol=0)


def test_model_input_batch_matches_single_images():
    batch = torch.stack([_random_image(seed=1), _random_image(seed=2)])
    mean, std = (123.0, 117.0, 104.0), (58.0, 57.0, 57.0)
    out = to_model_input(batch, 16, mean, std)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[1], to_model_input(batch[1], 16, mean, std))


def test_model_input_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        to_model_input(torch.zeros(4, 8, 8, dtype=torch.uint8), 8, (0, 0, 0), (1, 1, 1))


def test_model_inputs_stacks_each_image_resized_and_normalised():
    spec = build_model("ssd-small", 4).spec
    generator = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in [(40, 60), (90, 30)]]
    batch = model_inputs(images, spec)
    assert batch.shape == (2, 3, spec.image_size, spec.image_size) and batch.dtype == torch.float32
    for image, row in zip(images, batch, strict=True):
        assert torch.equal(row, to_model_input(image, spec.image_size, spec.pixel_mean, spec.pixel_std))


# ---- 16-bit samples, EXIF orientation, WebP and the formats refused (files made here, read by reference decoders)


def png_16_bit(samples, colour_type: int) -> bytes:
    """A real 16-bit PNG (colour type 0 grey, 2 RGB) of `samples` ([H, W] or [H, W, 3] numpy uint16),
    written by hand: Pillow cannot write 16-bit RGB."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\0" + samples[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
            + _png_chunk(b"IEND", b""))


@pytest.mark.parametrize("colour_type", [0, 2], ids=["grey", "rgb"])
def test_16_bit_png_is_scaled_to_8_bits(colour_type):
    rng = np.random.default_rng(colour_type)
    shape = (9, 13) if colour_type == 0 else (9, 13, 3)
    samples = rng.integers(0, 65536, size=shape, dtype=np.uint16)
    samples.flat[:2] = (0, 65535)  # both ends of the range
    decoded = decode_image_bytes(png_16_bit(samples, colour_type), max_pixels=10**6)
    expected = torch.from_numpy((samples >> 8).astype(np.uint8))  # the top byte of each sample
    expected = expected.expand(3, *shape) if colour_type == 0 else expected.permute(2, 0, 1)
    assert decoded.dtype == torch.uint8 and torch.equal(decoded, expected)


def test_16_bit_png_feeds_the_model_what_its_8_bit_twin_does():
    """The same pixels as 8 and as 16 bits (v * 257) give the same model input."""
    eight = _random_image(16, 24, seed=3)
    samples = eight.permute(1, 2, 0).numpy().astype(np.uint16) * 257
    sixteen = decode_image_bytes(png_16_bit(samples, 2), max_pixels=10**6)
    spec = build_model("ssd-small", 4).spec
    assert torch.equal(model_inputs([sixteen], spec), model_inputs([eight], spec))


def _exif_file(orientation: int, fmt: str) -> bytes:
    """A 12x8 image (one coloured pixel near each corner, so every turn and flip shows) saved by Pillow in
    `fmt` with EXIF orientation `orientation`."""
    picture = Image.new("RGB", (12, 8), (128, 128, 128))
    for xy, colour in [((0, 0), (255, 0, 0)), ((11, 0), (0, 255, 0)), ((0, 7), (0, 0, 255)), ((11, 7), (255, 255, 0))]:
        picture.putpixel(xy, colour)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    options = {"quality": 100} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    picture.save(buffer, fmt, exif=exif, **options)
    return buffer.getvalue()


def _displayed(data: bytes) -> torch.Tensor:
    """What a browser shows: Pillow's decoder and its `exif_transpose`, the reference."""
    shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(np.asarray(shown).copy()).permute(2, 0, 1)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation, fmt):
    data = _exif_file(orientation, fmt)
    decoded = decode_image_bytes(data, max_pixels=10**6)
    expected = _displayed(data)
    assert decoded.shape == expected.shape == ((3, 12, 8) if orientation >= 5 else (3, 8, 12))
    if fmt == "JPEG":  # two JPEG decoders: equal up to rounding
        assert (decoded.int() - expected.int()).abs().max() <= 3
    else:
        assert torch.equal(decoded, expected)


def test_webp_lossy_and_lossless_decode_with_their_header_size():
    image = _random_image(10, 14, seed=5)
    for options in ({"lossless": True}, {"quality": 90}):
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buffer, "WEBP", **options)
        data = buffer.getvalue()
        assert image_dimensions(data) == (10, 14)
        decoded = decode_image_bytes(data, max_pixels=10**6)
        assert decoded.shape == (3, 10, 14) and decoded.dtype == torch.uint8
        if options.get("lossless"):
            assert torch.equal(decoded, image)
        with pytest.raises(ImageError, match="exceeds the limit"):
            decode_image_bytes(data, max_pixels=139)


@pytest.mark.parametrize(("fmt", "name"), [("BMP", "BMP"), ("GIF", "GIF"), ("TIFF", "TIFF")])
def test_other_formats_are_refused_naming_the_accepted_ones(fmt, name):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, fmt)
    with pytest.raises(ImageError, match=rf"unsupported image format \({name}\); accepted formats: PNG, JPEG, WebP"):
        decode_image_bytes(buffer.getvalue(), max_pixels=10**6)
