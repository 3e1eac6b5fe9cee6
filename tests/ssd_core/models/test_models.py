"""Model shapes, ssd.pytorch state_dict layout, priors and initialisation."""

from __future__ import annotations

import pytest
import torch

from ssd_core.models import MODEL_NAMES, SSD300, SSD512, SmallConfig, SSDSmall, build_model
from ssd_core.models.vgg import L2Norm
from ssd_core.ops.priors import COCO_512, VOC_300, VOC_512, prior_boxes

# conv layer indices of ssd.pytorch's `vgg(base['300'], 3)`: 13 VGG16 convs, conv6 (31), conv7 (33)
VGG_CONVS = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, 31, 33)


def expected_keys(num_extras: int, num_sources: int) -> set[str]:
    """The state_dict keys ssd.pytorch's SSD has."""
    convs = [f"vgg.{i}" for i in VGG_CONVS] + [f"extras.{i}" for i in range(num_extras)]
    convs += [f"{head}.{i}" for head in ("loc", "conf") for i in range(num_sources)]
    return {f"{c}.{p}" for c in convs for p in ("weight", "bias")} | {"L2Norm.weight"}


def forward_with_sources(model, x):
    """One forward pass, also returning the source feature maps it used."""
    seen = []
    original = model.sources
    model.sources = lambda inp: seen.append(original(inp)) or seen[-1]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        del model.sources
    return out, seen[0]


@pytest.fixture(scope="module")
def ssd300():
    torch.manual_seed(0)
    return SSD300(21).eval()


@pytest.fixture(scope="module")
def ssd512():
    torch.manual_seed(0)
    return SSD512(81).eval()


def test_model_names_and_builders():
    assert MODEL_NAMES == ("ssd300", "ssd512", "ssd-small")
    model = build_model("ssd-small", 5)
    assert isinstance(model, SSDSmall)
    assert model.spec.name == "ssd-small" and model.spec.num_classes == 5


@pytest.mark.parametrize(
    ("name", "num_classes"), [("ssd301", 21), ("", 21), ("ssd-small", 1), ("ssd-small", 0)]
)
def test_build_model_rejects_bad_arguments(name, num_classes):
    with pytest.raises(ValueError, match=r"model name|num_classes"):
        build_model(name, num_classes)


def test_ssd300_state_dict_matches_ssd_pytorch(ssd300):
    state = ssd300.state_dict()
    assert set(state) == expected_keys(num_extras=8, num_sources=6)
    assert len(state) == 71
    assert "priors" not in state
    assert state["vgg.21.weight"].shape == (512, 512, 3, 3)  # conv4_3
    assert state["vgg.31.weight"].shape == (1024, 512, 3, 3)  # conv6
    assert ssd300.vgg[31].dilation == (6, 6) and ssd300.vgg[31].padding == (6, 6)
    assert state["vgg.33.weight"].shape == (1024, 1024, 1, 1)  # conv7
    assert state["extras.7.weight"].shape == (256, 128, 3, 3)
    assert state["L2Norm.weight"].shape == (512,)
    assert state["loc.0.weight"].shape == (16, 512, 3, 3)
    assert state["loc.5.weight"].shape == (16, 256, 3, 3)
    assert state["conf.1.weight"].shape == (6 * 21, 1024, 3, 3)
    assert ssd300.vgg[30].kernel_size == 3 and ssd300.vgg[30].stride == 1  # pool5
    assert ssd300.vgg[16].ceil_mode  # the 'C' pool
    assert list(state)[:2] == ["vgg.0.weight", "vgg.0.bias"]


def test_ssd512_state_dict_matches_ssd_pytorch_layout(ssd512):
    state = ssd512.state_dict()
    assert set(state) == expected_keys(num_extras=10, num_sources=7)
    assert state["extras.9.weight"].shape == (256, 128, 4, 4)
    assert state["conf.6.weight"].shape == (4 * 81, 256, 3, 3)
    assert tuple(m.out_channels // 4 for m in ssd512.loc) == VOC_512.boxes_per_location


def test_ssd300_forward_shapes(ssd300):
    (loc, conf, priors), feats = forward_with_sources(ssd300, torch.randn(1, 3, 300, 300))
    assert loc.shape == (1, 8732, 4) and conf.shape == (1, 8732, 21) and priors.shape == (8732, 4)
    assert tuple(f.shape[-1] for f in feats) == VOC_300.feature_maps
    assert tuple(f.shape[1] for f in feats) == (512, 1024, 512, 256, 256, 256)
    assert torch.equal(priors, prior_boxes(VOC_300))
    assert torch.isfinite(loc).all() and torch.isfinite(conf).all()
    assert ssd300.spec.pixel_mean == (123.0, 117.0, 104.0) and ssd300.spec.pixel_std == (1.0, 1.0, 1.0)


def test_ssd512_forward_shapes(ssd512):
    (loc, conf, priors), feats = forward_with_sources(ssd512, torch.randn(1, 3, 512, 512))
    assert loc.shape == (1, 24564, 4) and conf.shape == (1, 24564, 81) and priors.shape == (24564, 4)
    assert tuple(f.shape[-1] for f in feats) == VOC_512.feature_maps
    assert ssd512.spec.prior_set == "coco"  # 81 classes: ssd.pytorch's rule picks the COCO sizes
    assert torch.equal(priors, prior_boxes(COCO_512))


def test_vgg_initialisation(ssd300):
    assert torch.equal(ssd300.L2Norm.weight, torch.full((512,), 20.0))
    for layer in [*ssd300.extras, *ssd300.loc, *ssd300.conf]:
        assert torch.count_nonzero(layer.bias) == 0
        area = layer.kernel_size[0] * layer.kernel_size[1]
        xavier_bound = (6 / ((layer.in_channels + layer.out_channels) * area)) ** 0.5
        assert xavier_bound / 2 < layer.weight.abs().max() <= xavier_bound


def test_l2norm_matches_formula():
    x = torch.randn(2, 8, 3, 3)
    layer = L2Norm(8, 20.0)
    expected = 20.0 * x / x.pow(2).sum(1, keepdim=True).sqrt()
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.allclose(layer(x).norm(dim=1), torch.full((2, 3, 3), 20.0), atol=1e-3)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("num_classes", [21, 81])
def test_ssd_small_forward_shapes(batch, num_classes):
    model = build_model("ssd-small", num_classes).eval()
    size = model.spec.image_size
    (loc, conf, priors), feats = forward_with_sources(model, torch.randn(batch, 3, size, size))
    num_priors = model.spec.prior_config.num_priors
    assert loc.shape == (batch, num_priors, 4)
    assert conf.shape == (batch, num_priors, num_classes)
    assert priors.shape == (num_priors, 4)
    assert tuple(f.shape[-1] for f in feats) == model.spec.prior_config.feature_maps
    assert torch.equal(priors, prior_boxes(model.spec.prior_config))
    assert model.spec.pixel_mean == (127.5,) * 3 and model.spec.pixel_std == (127.5,) * 3


def test_ssd_small_priors_follow_its_own_feature_maps():
    model = SSDSmall(4, SmallConfig(image_size=192))
    assert model.spec.prior_config.feature_maps == (24, 12, 6, 3, 2, 1)
    assert model.spec.image_size == 192
    loc, conf, priors = model(torch.randn(2, 3, 192, 192))  # training mode, batch 2
    assert loc.shape[1] == conf.shape[1] == priors.shape[0] == model.spec.prior_config.num_priors
    assert "priors" not in model.state_dict()
    (loc.square().mean() + conf.logsumexp(-1).mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_outputs_are_in_prior_order():
    """loc[:, p] is head k's output at (row i, column j, box a) for prior p, as priors are ordered."""
    torch.manual_seed(0)
    model = SSDSmall(3, SmallConfig(image_size=160)).eval()
    x = torch.randn(1, 3, 160, 160)
    with torch.no_grad():
        loc, conf, _ = model(x)
        feats = model.sources(x)
        rows_loc, rows_conf = [], []
        for k, f in enumerate(feats):
            out_loc, out_conf = model.loc[k](f)[0], model.conf[k](f)[0]  # [A*4, H, W], [A*C, H, W]
            boxes = out_loc.shape[0] // 4
            for i in range(f.shape[2]):
                for j in range(f.shape[3]):
                    for a in range(boxes):
                        rows_loc.append(out_loc[a * 4 : (a + 1) * 4, i, j])
                        rows_conf.append(out_conf[a * 3 : (a + 1) * 3, i, j])
    assert torch.equal(loc[0], torch.stack(rows_loc))
    assert torch.equal(conf[0], torch.stack(rows_conf))


def test_forward_rejects_wrong_input_size():
    model = build_model("ssd-small", 3)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 3, 256, 256\]"):
        model(torch.randn(1, 3, 200, 200))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.randn(3, 256, 256))
