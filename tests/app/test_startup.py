"""Start-up: the one log line that says what is served, and failures said in one or two lines naming the
SSD_* variable and the fix (app/serving/model_origin.py, app/__main__.py)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from app.__main__ import settings_problem, startup_problem
from app.core.settings import Settings
from app.serving.model_origin import log_served_model
from ssd_core.models import build_model
from ssd_core.models.demo import DEMO_WEIGHTS
from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.storage.checkpoint_meta import checkpoint_meta
from tests.app.conftest import make_settings, start_client

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def _served_line(caplog, settings, checkpoint=None) -> logging.LogRecord:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="app.serving.model_origin"):
        log_served_model(settings, CPU, checkpoint)
    (record,) = [r for r in caplog.records if r.name == "app.serving.model_origin"]
    return record


def test_the_demo_model_is_named_with_its_held_out_map(tmp_path, caplog):
    settings = make_settings(tmp_path, weights="demo")
    assert settings.weights == DEMO_WEIGHTS and settings.serves_demo()
    record = _served_line(caplog, settings)
    assert record.levelno == logging.INFO
    assert record.getMessage().startswith(
        "serving ssd-small with 3 classes (rectangle, ellipse, triangle), scaled priors, on cpu; weights from the "
        "demo model (held-out mAP@0.5 0.")


def test_random_weights_are_a_warning(tmp_path, caplog):
    record = _served_line(caplog, make_settings(tmp_path))
    assert record.levelno == logging.WARNING
    assert "weights RANDOM: this model detects nothing until trained" in record.getMessage()


def test_weights_and_checkpoints_are_named(tmp_path, caplog):
    weights = tmp_path / "w.safetensors"
    save_file(build_model("ssd-small", 4).state_dict(), weights)
    assert _served_line(caplog, make_settings(tmp_path, weights=weights)).getMessage().endswith(
        f"weights from SSD_WEIGHTS={weights}")
    with start_client(make_settings(tmp_path)) as client:  # writes version 0 at start
        client.post("/model/checkpoint")
    checkpoint = CheckpointStore(tmp_path / "checkpoints").load_latest()
    message = _served_line(caplog, make_settings(tmp_path), checkpoint).getMessage()
    assert message.endswith(f"weights from checkpoint version 0 in {tmp_path / 'checkpoints'}")


def test_a_voc_model_shows_its_first_classes(tmp_path, caplog):
    settings = make_settings(tmp_path, model="ssd300", num_classes=21, class_names="voc")
    message = _served_line(caplog, settings).getMessage()
    assert "serving ssd300 with 20 classes (aeroplane, bicycle, bird, boat, bottle, ... (20 in all)), voc priors" \
        in message


def _settings_error(**values) -> str:
    with pytest.raises(ValidationError) as info:
        Settings(**values)
    return settings_problem(info.value)


def test_invalid_settings_name_their_variable():
    assert _settings_error(model="ssd_small") == (
        "SSD_MODEL='ssd_small': Input should be 'ssd300', 'ssd512' or 'ssd-small'")
    assert _settings_error(model="ssd-small", num_classes=4, class_names="a,b") == (
        "SSD_CLASS_NAMES has 2 names but SSD_NUM_CLASSES=4 needs 3 (background excluded)")
    assert _settings_error(weights="demo").startswith("SSD_WEIGHTS=demo is ssd-small with SSD_NUM_CLASSES=4, settings "
                                                      "say SSD_MODEL=ssd300")


def test_a_checkpoint_of_another_model_says_what_to_set(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    model = build_model("ssd-small", 4)
    store.save(model.state_dict(), checkpoint_meta(model, ["a", "b", "c"], 3, 10))
    problem = startup_problem(Settings(checkpoint_dir=tmp_path / "checkpoints"))
    assert problem == (
        f"checkpoint version 3 in {tmp_path / 'checkpoints'} has model='ssd-small', SSD_MODEL='ssd300': set "
        "SSD_MODEL=ssd-small to resume it, or set SSD_CHECKPOINT_DIR to another directory to start afresh")
    assert startup_problem(Settings(model="ssd-small", num_classes=4, checkpoint_dir=tmp_path / "checkpoints")) is None


def test_missing_weights_are_named(tmp_path):
    problem = startup_problem(Settings(weights=tmp_path / "missing.safetensors", checkpoint_dir=None))
    assert problem.startswith(f"SSD_WEIGHTS={tmp_path / 'missing.safetensors'}: no such file; give a safetensors")


def _start(tmp_path, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SSD_PORT": "1", **env}, check=False)


def test_python_m_app_fails_in_two_lines_without_a_traceback(tmp_path):
    done = _start(tmp_path, SSD_MODEL="ssd_small")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines == [
        "ERROR:     cannot start: SSD_MODEL='ssd_small': Input should be 'ssd300', 'ssd512' or 'ssd-small'",
        "ERROR:     (every setting: docs/configuration.md; SSD_LOG_LEVEL=debug shows the traceback)",
    ], done.stderr
    debug = _start(tmp_path, SSD_MODEL="ssd_small", SSD_LOG_LEVEL="debug")
    assert debug.returncode == 2 and "Traceback" in debug.stderr and "pydantic" in debug.stderr
