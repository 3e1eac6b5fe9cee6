"""app.core.errors: domain exceptions and messages fit for a client."""

from __future__ import annotations

from app.core.errors import InvalidValue, describe, without_paths


def test_without_paths_keeps_file_names_only():
    assert without_paths("/var/lib/ssd/ckpt-00000002.json: no such checkpoint") == "ckpt-00000002.json: no such checkpoint"
    assert without_paths("[Errno 28] No space left on device: '/var/lib/ssd/checkpoints/.tmp-ckpt-x.json.1'") == (
        "[Errno 28] No space left on device: '.tmp-ckpt-x.json.1'")
    assert without_paths("loc must be [B][P][4], got 1/2") == "loc must be [B][P][4], got 1/2"


def test_describe_names_the_type_without_paths():
    assert describe(OSError("disk full: /var/lib/ssd/ckpt.json")) == "OSError: disk full: ckpt.json"


def test_invalid_value_names_its_field_in_the_message():
    error = InvalidValue("learning_rate", "0.5 exceeds the limit of 0.01")
    assert (error.code, error.field, error.message) == (
        "invalid_value", "learning_rate", "learning_rate: 0.5 exceeds the limit of 0.01")
