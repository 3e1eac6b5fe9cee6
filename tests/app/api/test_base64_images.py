"""The base64 image validator: its one-pass strict decode agrees with the lenient reference (data URL
prefix, line breaks, the url-safe alphabet) on every input, valid or not."""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic_core import PydanticCustomError

from app.api.schemas import _decode_base64_image


def lenient_reference(text: str) -> bytes:
    """What the validator accepts, written the slow obvious way; raises binascii.Error."""
    text = re.sub(r"^data:[^,]*;base64,", "", text, flags=re.IGNORECASE)
    text = "".join(text.split()).replace("-", "+").replace("_", "/")
    if re.search(r"[.:~\\]", text):
        raise binascii.Error("a file name")
    return base64.b64decode(text, validate=True)


def variants(data: bytes) -> list[str]:
    plain = base64.b64encode(data).decode()
    return [plain, base64.encodebytes(data).decode(), base64.urlsafe_b64encode(data).decode(),
            f"data:image/png;base64,{plain}", plain.rstrip("="), plain + "A", plain + "==", f"  {plain}\n"]


def assert_agrees(text: str | bytes) -> None:
    """The validator decodes `text` as the reference does, or refuses it as the reference does."""
    try:
        expected = lenient_reference(text.decode("latin-1") if isinstance(text, bytes) else text)
    except (binascii.Error, ValueError):
        with pytest.raises(PydanticCustomError):
            _decode_base64_image(text)
        return
    assert _decode_base64_image(text) == expected


@given(st.binary(max_size=64))
def test_the_fast_decode_agrees_with_the_lenient_reference(data):
    for text in variants(data):
        assert_agrees(text)
        assert_agrees(text.encode())  # base64 as bytes


@given(st.text(max_size=40))
def test_any_text_is_decoded_or_refused_as_the_reference_does(text):
    assert_agrees(text)


def test_a_file_name_is_refused_by_both_paths():
    for name in ("photo.jpg", "C:\\images\\a.png", "https://example.com/a.png", "~/a.png"):
        with pytest.raises(PydanticCustomError, match="looks like a file name"):
            _decode_base64_image(name)
