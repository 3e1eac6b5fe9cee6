"""`ssd export`: a saved checkpoint version as ONNX, run by ONNX Runtime with that version's outputs."""

from __future__ import annotations

import onnxruntime
import pytest
import torch

from ssd_core.cli import main
from ssd_core.models import build_model
from ssd_core.storage.checkpoint import CheckpointStore


def save_versions(directory) -> dict[int, torch.nn.Module]:
    store = CheckpointStore(directory)
    models = {}
    for version in (1, 2):
        torch.manual_seed(version)
        model = build_model("ssd-small", 4).eval()
        store.save(model.state_dict(), {"version": version, "step": 0, "model": "ssd-small", "num_classes": 4,
                                        "class_names": ["a", "b", "c"]})
        models[version] = model
    return models


def test_export_writes_the_asked_version(tmp_path, capsys):
    models = save_versions(tmp_path / "ckpt")
    out = tmp_path / "v1.onnx"
    assert main(["export", "--checkpoint-dir", str(tmp_path / "ckpt"), "--version", "1", "--format", "onnx",
                 str(out)]) == 0
    assert "exported version 1 (ssd-small) as onnx" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    images = torch.randn(1, 3, 256, 256)
    loc, conf, _ = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        expected_loc, expected_conf, _ = models[1](images)
    assert (torch.from_numpy(loc) - expected_loc).abs().max() <= 1e-4
    assert (torch.from_numpy(conf) - expected_conf).abs().max() <= 1e-4
    assert session.get_modelmeta().custom_metadata_map["class_names"] == '["a", "b", "c"]'


@pytest.mark.parametrize(("argv", "message"), [
    (["--version", "9", "--format", "onnx"], "no such checkpoint"),
    (["--format", "onnx"], "no loadable checkpoint"),
])
def test_export_errors_exit_2_with_a_message(tmp_path, capsys, argv, message):
    if "--version" in argv:
        save_versions(tmp_path / "ckpt")
    (tmp_path / "ckpt").mkdir(exist_ok=True)
    assert main(["export", "--checkpoint-dir", str(tmp_path / "ckpt"), *argv, str(tmp_path / "m.onnx")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
