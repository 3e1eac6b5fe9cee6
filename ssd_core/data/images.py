"""Image bytes -> tensors: decoding (with a decompression-bomb guard), model input, encoding.

Images are `Tensor[3, H, W]` uint8 in RGB order, in the frame a browser or a labelling tool shows:
`decode_image_bytes` is the one decoder of every path (the service's routes, the stores, the data sets,
the CLI), and it applies the EXIF orientation and scales 16-bit samples to 8 bits. The pixel limit is
checked against the width and height *declared in the file header* before anything is decoded, so a
tiny file that declares a huge image is rejected without allocating its pixels.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from PIL import ExifTags, Image
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
ACCEPTED_FORMATS = "PNG, JPEG, WebP"
# formats recognised only to name them in the refusal (torchvision decodes GIF, but an animation has no
# one image to detect on)
_REFUSED_SIGNATURES = {b"BM": "BMP", b"GIF8": "GIF", b"II*\0": "TIFF", b"MM\0*": "TIFF", b"\0\0\1\0": "ICO"}
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


def _is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def _webp_chunks(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(tag, payload) of each chunk of a RIFF WebP file, in order; stops at a truncated one."""
    pos = 12
    while pos + 8 <= len(data):
        tag, (size,) = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])
        yield tag, data[pos + 8 : pos + 8 + size]
        pos += 8 + size + (size & 1)  # chunks are padded to an even size


def _webp_dimensions(data: bytes) -> tuple[int, int]:
    for tag, payload in _webp_chunks(data):
        if tag == b"VP8X" and len(payload) >= 10:  # extended: the canvas size, minus one, 24-bit
            return int.from_bytes(payload[7:10], "little") + 1, int.from_bytes(payload[4:7], "little") + 1
        if tag == b"VP8L" and len(payload) >= 5 and payload[0] == 0x2F:  # lossless: 14-bit sizes minus one
            bits = int.from_bytes(payload[1:5], "little")
            return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
        if tag == b"VP8 " and len(payload) >= 10 and payload[3:6] == b"\x9d\x01\x2a":  # lossy key frame
            width, height = struct.unpack("<HH", payload[6:10])
            return height & 0x3FFF, width & 0x3FFF
        break
    raise ImageError("truncated or corrupt WebP: no VP8/VP8L/VP8X header")


def _webp_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a WebP file, 1 when it has none. torchvision applies the EXIF
    orientation of JPEG and PNG itself, not WebP's; the EXIF chunk is read with Pillow, pixels are not."""
    for tag, payload in _webp_chunks(data):
        if tag == b"EXIF":
            exif = Image.Exif()
            try:
                exif.load(payload.removeprefix(b"Exif\0\0"))
                orientation = int(exif.get(ExifTags.Base.Orientation, 1))
            except (OSError, ValueError, TypeError, struct.error, SyntaxError):
                return 1  # an unreadable EXIF block: as browsers do, show the stored frame
            return orientation if 1 <= orientation <= 8 else 1
    return 1


def _oriented(image: Tensor, orientation: int) -> Tensor:
    """`image` [3, H, W] turned to its EXIF `orientation`'s display frame (Pillow's `exif_transpose`)."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-2, -1)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-2, -1)
    if orientation == 6:
        return image.rot90(-1, dims=(-2, -1))
    if orientation == 7:
        return image.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:
        return image.rot90(1, dims=(-2, -1))
    return image


def image_dimensions(data: bytes) -> tuple[int, int]:
    """Height and width declared in a PNG, JPEG or WebP header (the stored frame, before any EXIF
    orientation), read without decoding.

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
    if _is_webp(data):
        return _webp_dimensions(data)
    named = next((name for signature, name in _REFUSED_SIGNATURES.items() if data.startswith(signature)), None)
    found = named or f"first bytes {data[:8]!r}"
    raise ImageError(f"unsupported image format ({found}); accepted formats: {ACCEPTED_FORMATS}")


def decode_image_bytes(data: bytes, max_pixels: int) -> Tensor:
    """Decode PNG, JPEG or WebP bytes to an 8-bit RGB tensor in its display frame, refusing images over
    `max_pixels`.

    The EXIF orientation is applied (as browsers and labelling tools show the image, so boxes drawn on
    it match), and 16-bit PNG samples are scaled to 8 bits (`v >> 8`).

    Args:
        data: the encoded file.
        max_pixels: largest accepted height * width, checked on the header before decoding.

    Returns:
        Tensor[3, H, W] uint8, RGB (grey, grey-alpha, palette and RGBA inputs are converted); H and W
        are swapped from the stored frame for EXIF orientations 5-8.

    Raises:
        ImageError: empty, unsupported (the message lists the accepted formats), undecodable,
            truncated, zero-sized or too large.
    """
    height, width = image_dimensions(data)
    if height <= 0 or width <= 0:
        raise ImageError(f"image declares an empty size {width}x{height}")
    if height * width > max_pixels:
        raise ImageError(f"image of {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}")
    buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # [len(data)]
    try:
        image = decode_image(buffer, mode=ImageReadMode.RGB, apply_exif_orientation=True)  # [3, H', W']
    except RuntimeError as error:
        reason = _CPP_LOCATION.sub("", str(error))  # drop torchvision's "decode_png, /path/x.cpp:79, "
        raise ImageError(f"cannot decode image: {reason}") from error
    if _is_webp(data):
        image = _oriented(image, _webp_orientation(data))
    if image.shape[-2:] not in {(height, width), (width, height)}:  # (w, h): turned by its EXIF orientation
        raise ImageError(f"decoded size {tuple(image.shape[-2:])} differs from the header's {(height, width)}")
    if image.dtype != torch.uint8:  # a 16-bit PNG decodes to uint16, 0-65535
        image = F.to_dtype(image, torch.uint8, scale=True)
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
