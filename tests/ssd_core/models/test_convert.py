"""Importing ssd.pytorch files: full SSD300, VGG16 base, prefixes, refusal of pickled code, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ssd_core.models import SSD300, SSD512
from ssd_core.models.convert import import_checkpoint, load_ssd_pytorch, ssd_pytorch_state_dict


class NotATensor:
    """A pickled custom object: torch.load(weights_only=True) must refuse the file holding it."""


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(1)
    return SSD300(21).eval()


def test_full_ssd300_checkpoint_round_trip(source_model, tmp_path):
    src = tmp_path / "ssd300_VOC.pth"
    torch.save(source_model.state_dict(), src)  # exactly what ssd.pytorch's train.py writes
    out = import_checkpoint(src, "ssd300", 21, tmp_path / "imported.safetensors")

    with safe_open(out, "pt") as f:
        assert f.metadata() == {
            "model": "ssd300",
            "num_classes": "21",
            "priors": "voc",
            "source": "ssd.pytorch:ssd300_VOC.pth",
        }
    torch.manual_seed(2)
    model = SSD300(21).eval()
    model.load_state_dict(load_file(out), strict=True)
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        expected, got = source_model(x), model(x)
    assert all(torch.equal(e, g) for e, g in zip(expected, got, strict=True))
    assert not (tmp_path / "imported.safetensors.tmp").exists()


def test_dataparallel_prefix_and_wrapper_are_removed(source_model, tmp_path):
    src = tmp_path / "dp.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in source_model.state_dict().items()}, "epoch": 3}, src
    )
    state = ssd_pytorch_state_dict(load_ssd_pytorch(src), "ssd300", 21)
    assert state.keys() == source_model.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in source_model.state_dict().items())


def test_vgg_reducedfc_base(source_model, tmp_path):
    src = tmp_path / "vgg16_reducedfc.pth"
    torch.save(source_model.vgg.state_dict(), src)  # keys '0.weight' ... '33.bias'
    torch.manual_seed(3)
    state = ssd_pytorch_state_dict(load_ssd_pytorch(src), "ssd300", 4)

    model = SSD300(4)
    model.load_state_dict(state, strict=True)
    for key, value in source_model.vgg.state_dict().items():
        assert torch.equal(state[f"vgg.{key}"], value)
    assert torch.equal(state["L2Norm.weight"], torch.full((512,), 20.0))
    assert state["conf.0.weight"].shape == (4 * 4, 512, 3, 3)
    assert torch.count_nonzero(state["loc.3.bias"]) == 0


def test_ssd512_state_dict_converts():
    torch.manual_seed(0)
    source = SSD512(3).state_dict()
    state = ssd_pytorch_state_dict(source, "ssd512", 3)
    assert all(torch.equal(state[k], v) for k, v in source.items()) and state.keys() == source.keys()


def test_pickled_custom_object_is_refused(tmp_path):
    src = tmp_path / "evil.pth"
    torch.save({"vgg.0.weight": torch.zeros(1), "payload": NotATensor()}, src)
    with pytest.raises(ValueError, match=r"refused.*NotATensor.*weights_only=True"):
        load_ssd_pytorch(src)


def test_corrupt_and_non_state_dict_files(tmp_path):
    corrupt = tmp_path / "corrupt.pth"
    torch.save({"w": torch.zeros(10)}, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:40])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_ssd_pytorch(corrupt)
    tensor_only = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor_only)
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_ssd_pytorch(tensor_only)


def test_mismatches_are_listed(source_model):
    state = dict(source_model.state_dict())
    with pytest.raises(
        ValueError, match=r"conf\.0\.weight \[84, 512, 3, 3\] \(model: \[324, 512, 3, 3\]\).*21 classes"
    ):
        ssd_pytorch_state_dict(state, "ssd300", 81)
    del state["L2Norm.weight"]
    state["extras.8.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing keys \(1\): L2Norm\.weight; unexpected keys \(1\): extras\.8\.weight"
    ):
        ssd_pytorch_state_dict(state, "ssd300", 21)


def test_only_vgg_models_import(source_model):
    with pytest.raises(ValueError, match="model_name must be one of ssd300, ssd512"):
        ssd_pytorch_state_dict(source_model.state_dict(), "ssd-small", 21)
