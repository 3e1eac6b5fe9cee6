"""Prior sets of the VGG models: ssd.pytorch's `(coco, voc)[num_classes == 21]` rule, explicit choices,
and an 81-class SSD300 whose priors and decoded boxes equal ssd.pytorch's (its PriorBox and decode
written out below)."""

from __future__ import annotations

import math
from itertools import product

import pytest
import torch

from ssd_core.models import build_model
from ssd_core.ops.coder import decode
from ssd_core.ops.priors import COCO_300, VOC_300, prior_boxes, resolve_prior_set

# ssd.pytorch data/config.py
SSD_PYTORCH_CONFIGS = {
    "voc": {"min_sizes": [30, 60, 111, 162, 213, 264], "max_sizes": [60, 111, 162, 213, 264, 315]},
    "coco": {"min_sizes": [21, 45, 99, 153, 207, 261], "max_sizes": [45, 99, 153, 207, 261, 315]},
}
FEATURE_MAPS, STEPS = [38, 19, 10, 5, 3, 1], [8, 16, 32, 64, 100, 300]
ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


def ssd_pytorch_priors(name: str) -> torch.Tensor:
    """ssd.pytorch layers/functions/prior_box.py `PriorBox.forward`, loop for loop."""
    config, mean = SSD_PYTORCH_CONFIGS[name], []
    for k, f in enumerate(FEATURE_MAPS):
        for i, j in product(range(f), repeat=2):
            f_k = 300 / STEPS[k]
            cx, cy = (j + 0.5) / f_k, (i + 0.5) / f_k
            s_k = config["min_sizes"][k] / 300
            mean += [cx, cy, s_k, s_k]
            s_k_prime = math.sqrt(s_k * (config["max_sizes"][k] / 300))
            mean += [cx, cy, s_k_prime, s_k_prime]
            for ar in ASPECT_RATIOS[k]:
                mean += [cx, cy, s_k * math.sqrt(ar), s_k / math.sqrt(ar)]
                mean += [cx, cy, s_k / math.sqrt(ar), s_k * math.sqrt(ar)]
    return torch.tensor(mean).view(-1, 4).clamp_(max=1, min=0)


def ssd_pytorch_decode(loc: torch.Tensor, priors: torch.Tensor, variances=(0.1, 0.2)) -> torch.Tensor:
    """ssd.pytorch layers/box_utils.py `decode`."""
    boxes = torch.cat((priors[:, :2] + loc[:, :2] * variances[0] * priors[:, 2:],
                       priors[:, 2:] * torch.exp(loc[:, 2:] * variances[1])), 1)
    boxes[:, :2] -= boxes[:, 2:] / 2
    boxes[:, 2:] += boxes[:, :2]
    return boxes


@pytest.mark.parametrize(("model", "classes", "given", "expected"), [
    ("ssd300", 21, None, "voc"), ("ssd300", 81, None, "coco"), ("ssd300", 4, None, "coco"),
    ("ssd512", 21, None, "voc"), ("ssd300", 81, "voc", "voc"), ("ssd300", 21, "coco", "coco"),
    ("ssd-small", 4, None, "scaled"), ("ssd-small", 21, None, "scaled"),
])
def test_the_prior_set_follows_ssd_pytorchs_rule_unless_given(model, classes, given, expected):
    assert resolve_prior_set(model, classes, given) == expected


def test_unknown_or_misplaced_prior_sets_are_refused():
    with pytest.raises(ValueError, match="unknown priors 'kitti'"):
        resolve_prior_set("ssd300", 21, "kitti")
    with pytest.raises(ValueError, match="ssd-small has its own scaled priors"):
        resolve_prior_set("ssd-small", 4, "coco")


def test_an_81_class_ssd300_decodes_as_ssd_pytorchs():
    model = build_model("ssd300", 81).eval()
    assert model.spec.prior_set == "coco" and model.spec.prior_config == COCO_300
    reference = ssd_pytorch_priors("coco")
    torch.testing.assert_close(model.priors, reference, rtol=0, atol=1e-6)
    assert (model.priors - ssd_pytorch_priors("voc")).abs().max() > 0.05  # the sets differ: the test can tell
    torch.manual_seed(0)
    with torch.no_grad():
        loc, conf, priors = model(torch.randn(1, 3, 300, 300))  # [1, P, 4], [1, P, 81], [P, 4]
    assert conf.shape == (1, 8732, 81)
    torch.testing.assert_close(decode(loc[0], priors), ssd_pytorch_decode(loc[0], reference), rtol=0, atol=1e-5)


def test_21_classes_keep_voc_priors():
    model = build_model("ssd300", 21)
    assert model.spec.prior_set == "voc"
    torch.testing.assert_close(model.priors, ssd_pytorch_priors("voc"), rtol=0, atol=1e-6)
    torch.testing.assert_close(build_model("ssd300", 81, "voc").priors, prior_boxes(VOC_300))
