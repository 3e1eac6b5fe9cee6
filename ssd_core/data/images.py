"""Image bytes -> tensors: decoding (with a decompression-bomb guard), model input, encoding.

Images are `Tensor[3, H, W]` uint8 in RGB order. The pixel limit is checked against the width and
height *declared in the file header* before anything is decoded, so a tiny file that declares a
huge image is rejected without allocating its pixels.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image
from torchvision.io import encode_jpeg as _encode_jpeg
from torchvision.io import encode_png as _encode_png
from torchvision.transforms.v2 import functional as F

if TYPE_CHECKING:  # the spec is only read here; models sit above data
    from ssd_core.models import ModelSpec

__all__ = [
    "ImageError",
    "decode_image_bytes",
    "encode_jpeg",
    "encode_png",
    "image_dimensions",
    "model_inputs",
    "to_model_input",
]

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOI = b"\xff\xd8"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) share the range but do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_JPEG_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])
_CPP_LOCATION = re.compile(r"^.*\.cpp:\d+, ")


class ImageError(ValueError):
    """The bytes are not a usable image: empty, undecodable, truncated, unsupported or too large."""


def _png_dimensions(data: bytes) -> tuple[int, int]:
    # Signature (8) + IHDR length (4) + b"IHDR" (4) + width (4) + height (4).
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ImageError("truncated PNG: no IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return height, width


def _jpeg_dimensions(data: bytes) -> tuple[int, int]:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ImageError(f"corrupt JPEG: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        if marker in _JPEG_SOF:
            if pos + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[pos + 5 : pos + 9])
            return height, width
        if marker in (0xD9, 0xDA) or length < 2:  # end of image / start of scan before any frame
            raise ImageError("corrupt JPEG: no frame header before the image data")
        pos += 2 + length
    raise ImageError("truncated JPEG: no frame header")


def image_dimensions(data: bytes) -> tuple[int, int]:
    """Height and width declared in a PNG or JPEG header, read without decoding.

    Args:
        data: the encoded file.

    Returns:
        (height, width) in pixels.

    Raises:
        ImageError: empty bytes, an unsupported format or a header that cannot be read.
    """
    if not data:
        raise ImageError("empty image data")
    if data.startswith(_PNG_SIGNATURE):
        return _png_dimensions(data)
    if data.startswith(_JPEG_SOI):
        return _jpeg_dimensions(data)
    raise ImageError(f"unsupported image format (first bytes {data[:8]!r}); expected PNG or JPEG")


def decode_image_bytes(data: bytes, max_pixels: int) -> Tensor:
    """Decode PNG or JPEG bytes to an RGB tensor, refusing images over `max_pixels`.

    Args:
        data: the encoded file.
        max_pixels: largest accepted height * width, checked on the header before decoding.

    Returns:
        Tensor[3, H, W] uint8, RGB (grey and RGBA inputs are converted).

    Raises:
        ImageError: empty, unsupported, undecodable, truncated, zero-sized or too large.
    """
    height, width = image_dimensions(data)
    if height <= 0 or width <= 0:
        raise ImageError(f"image declares an empty size {width}x{height}")
    if height * width > max_pixels:
        raise ImageError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [len(data)]
    try:
        image = decode_image(buffer, mode=ImageReadMode.RGB)  # [3, H, W]
    except RuntimeError as error:
        reason = _CPP_LOCATION.sub("", str(error))  # drop torchvision's "decode_png, /path/x.cpp:79, "
        raise ImageError(f"cannot decode image: {reason}") from error
    if image.shape[-2:] != (height, width):
        raise ImageError(f"decoded size {tuple(image.shape[-2:])} differs from the header's {(height, width)}")
    return image


def to_model_input(image: Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Resize to the network's square input and normalise.

    Args:
        image (Tensor[3, H, W] or Tensor[B, 3, H, W]): uint8 RGB image(s).
        size: side S of the square network input.
        mean, std: per-channel RGB statistics in 0-255 units (the model's `spec.pixel_mean/pixel_std`).

    Returns:
        Tensor[3, S, S] or Tensor[B, 3, S, S] float32: `(resized - mean) / std`.
    """
    if image.dim() not in (3, 4) or image.shape[-3] != 3:
        raise ValueError(f"image must have shape [3, H, W] or [B, 3, H, W], got {tuple(image.shape)}")
    resized = F.resize(image.float(), [size, size], antialias=True)  # [..., 3, S, S]
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (resized - mean_t) / std_t


def encode_png(image: Tensor) -> bytes:
    """Encode a Tensor[3, H, W] uint8 RGB image as PNG bytes."""
    return _encode_png(image.contiguous()).numpy().tobytes()


def encode_jpeg(image: Tensor, quality: int = 95) -> bytes:
    """Encode a Tensor[3, H, W] uint8 RGB image as JPEG bytes."""
    return _encode_jpeg(image.contiguous(), quality=quality).numpy().tobytes()


def model_inputs(images: Sequence[Tensor], spec: ModelSpec) -> Tensor:
    """Images of any sizes as one model batch.

    Args:
        images: B uint8 RGB images, each Tensor[3, H_i, W_i].
        spec: the model's `ModelSpec` (image_size S, pixel_mean, pixel_std).

    Returns:
        Tensor[B, 3, S, S] float: each image resized to S x S and normalised (`to_model_input`).
    """
    return torch.stack([to_model_input(im, spec.image_size, spec.pixel_mean, spec.pixel_std) for im in images])
