"""app.core.settings: defaults, SSD_* environment variables, validation."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from app.__main__ import warn_if_exposed
from app.core.settings import Settings
from app.serving.model_host import check_compatible
from ssd_core.data.synthetic import ShapesDataset


def test_defaults(monkeypatch):
    for name in ("SSD_MODEL", "SSD_NUM_CLASSES", "SSD_PORT", "SSD_API_TOKEN", "SSD_ROLE", "SSD_DEVICE", "SSD_HOST"):
        monkeypatch.delenv(name, raising=False)
    settings = Settings()
    assert (settings.model, settings.num_classes, settings.port, settings.role, settings.device, settings.host) == (
        "ssd300", 21, 8000, "all", "auto", "127.0.0.1")
    assert settings.api_token is None
    assert settings.class_name(4) == "class_4"


def test_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SSD_MODEL", "ssd-small")
    monkeypatch.setenv("SSD_NUM_CLASSES", "4")
    monkeypatch.setenv("SSD_CLASS_NAMES", "cat, dog ,bird")
    monkeypatch.setenv("SSD_API_TOKEN", "zq-secret-91")
    monkeypatch.setenv("SSD_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("SSD_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("SSD_ROLE", "server")
    settings = Settings()
    assert settings.model == "ssd-small" and settings.num_classes == 4
    assert settings.class_names == ["cat", "dog", "bird"] and settings.class_name(1) == "dog"
    assert settings.api_token.get_secret_value() == "zq-secret-91" and "zq-secret" not in repr(settings)
    assert settings.checkpoint_dir == tmp_path and settings.max_body_bytes == 2048 and settings.role == "server"
    monkeypatch.setenv("SSD_CLASS_NAMES", '["a", "b", "c"]')
    assert Settings().class_names == ["a", "b", "c"]


@pytest.mark.parametrize("values", [
    {"model": "yolo"}, {"num_classes": 1}, {"device": "tpu"}, {"role": "leader"}, {"port": 0},
    {"num_classes": 4, "class_names": ["a", "b"]}, {"score_threshold": 1.0}, {"finetune_queue_size": 0},
])
def test_invalid_values(values):
    with pytest.raises(ValidationError):
        Settings(**values)


EXPOSED_HOSTS = ["0.0.0.0", "::", "192.168.1.7", "myhost.example"]
LOOPBACK_HOSTS = ["127.0.0.1", "127.3.2.1", "::1", "localhost"]


@pytest.mark.parametrize("token", [None, "", "   ", "\t"])
@pytest.mark.parametrize("host", EXPOSED_HOSTS)
def test_listening_beyond_loopback_without_a_token_refuses_to_start(monkeypatch, host, token):
    """Secure by default: an unset or empty token on a non-loopback interface is a start-up error in one
    line naming the variables that fix it (Compose's `${SSD_API_TOKEN:-}` gives the empty one)."""
    monkeypatch.setenv("SSD_HOST", host)
    if token is None:
        monkeypatch.delenv("SSD_API_TOKEN", raising=False)
    else:
        monkeypatch.setenv("SSD_API_TOKEN", token)
    with pytest.raises(ValidationError) as refused:
        Settings()
    message = refused.value.errors()[0]["msg"]
    assert "\n" not in message
    assert f"SSD_HOST={host} listens beyond loopback but SSD_API_TOKEN is unset or empty" in message
    assert "SSD_ALLOW_UNAUTHENTICATED=true" in message
    monkeypatch.setenv("SSD_ALLOW_UNAUTHENTICATED", "true")  # the explicit opt-out
    assert Settings().exposed_without_token()


@pytest.mark.parametrize("token", ["", " ", "\n"])
def test_an_empty_token_is_no_token(token):
    assert Settings(api_token=token).api_token is None
    assert Settings(api_token=f" {token}x").api_token.get_secret_value() == f" {token}x"


@pytest.mark.parametrize(("host", "token", "warned"), [
    *[(host, None, True) for host in EXPOSED_HOSTS], ("0.0.0.0", "t0ken", False),
    *[(host, None, False) for host in LOOPBACK_HOSTS],
])
def test_start_warns_when_listening_beyond_loopback_without_a_token(caplog, host, token, warned):
    settings = Settings(host=host, api_token=token, allow_unauthenticated=True)
    with caplog.at_level(logging.WARNING, logger="app"):
        warn_if_exposed(settings)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == warned, warnings
    if warned:
        assert f"listening on {host}:8000 without SSD_API_TOKEN" in warnings[0]


def test_make_serve_listens_on_loopback_by_default():
    makefile = (Path(__file__).resolve().parents[3] / "Makefile").read_text()
    assert re.search(r"^SSD_HOST \?= 127\.0\.0\.1\b", makefile, re.MULTILINE)
    assert "SSD_HOST=$(SSD_HOST)" in makefile


def test_priors_setting_and_its_default():
    assert Settings(model="ssd300", num_classes=21).prior_set == "voc"
    assert Settings(model="ssd300", num_classes=81).prior_set == "coco"  # ssd.pytorch's (coco, voc)[n == 21]
    assert Settings(model="ssd300", num_classes=81, priors="voc").prior_set == "voc"
    assert Settings(model="ssd-small", num_classes=4).prior_set == "scaled"
    with pytest.raises(ValidationError, match="ssd-small has its own scaled priors"):
        Settings(model="ssd-small", num_classes=4, priors="coco")
    with pytest.raises(ValidationError, match="priors"):
        Settings(model="ssd300", priors="kitti")


@pytest.mark.parametrize(("meta", "settings", "refused"), [
    ({"model": "ssd300", "num_classes": 81, "priors": "coco"}, {"num_classes": 81}, False),
    ({"model": "ssd300", "num_classes": 81, "priors": "voc"}, {"num_classes": 81}, True),
    ({"model": "ssd300", "num_classes": 81, "priors": "voc"}, {"num_classes": 81, "priors": "voc"}, False),
    ({"model": "ssd300", "num_classes": 81}, {"num_classes": 81}, True),  # before priors were recorded: voc
    ({"model": "ssd300", "num_classes": 21}, {"num_classes": 21}, False),
])
def test_a_checkpoint_with_other_priors_is_refused(meta, settings, refused):
    current = Settings(model="ssd300", checkpoint_dir=None, **settings)
    if refused:
        with pytest.raises(RuntimeError, match=r"trained with priors='voc', settings give 'coco'.*SSD_PRIORS=voc"):
            check_compatible(meta, current)
    else:
        check_compatible(meta, current)


def test_class_name_presets(monkeypatch):
    monkeypatch.setenv("SSD_CLASS_NAMES", "shapes")
    assert Settings(model="ssd-small", num_classes=4).class_names == list(ShapesDataset.class_names)
    monkeypatch.setenv("SSD_CLASS_NAMES", "voc")
    assert Settings(num_classes=21).class_names[:2] == ["aeroplane", "bicycle"]
    with pytest.raises(ValidationError, match="class_names has 20 names"):
        Settings(num_classes=4)
