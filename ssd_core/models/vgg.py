"""SSD300 and SSD512 on VGG16, layer for layer as ssd.pytorch's `ssd.py`.

The attribute names and layer indices are ssd.pytorch's, so the state_dict keys are too
(`vgg.N.*`, `L2Norm.weight`, `extras.N.*`, `loc.N.*`, `conf.N.*`) and its checkpoints load as is
(see ssd_core.models.convert).

Input convention (ssd.pytorch's BaseTransform): the image is read BGR by OpenCV, the BGR means
(104, 117, 123) are subtracted, then the channels are swapped to RGB. Per channel of the RGB
input the mean is therefore (123, 117, 104) (R, G, B), with std 1 (no scaling).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssd_core.models.base import SSD, ModelSpec, multibox_heads, xavier_init
from ssd_core.ops.priors import PriorConfig, resolve_prior_set, vgg_prior_config

__all__ = ["SSD300", "SSD512", "VGGSSD", "VGG_BASE", "ExtraBlock", "L2Norm", "extra_layers", "vgg_layers"]

# ssd.pytorch base['300'] (= base['512']): conv widths, 'M' max pool, 'C' max pool with ceil_mode
VGG_BASE = (64, 64, "M", 128, 128, "M", 256, 256, 256, "C", 512, 512, 512, "M", 512, 512, 512)
CONV4_3_END = 23  # vgg[:23] ends with conv4_3's ReLU: the first source, through L2Norm
RGB_MEAN = (123.0, 117.0, 104.0)  # ssd.pytorch's BGR means (104, 117, 123) in RGB input order
RGB_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class ExtraBlock:
    """One extra feature layer: 1x1 conv to `mid` channels, then a `kernel` conv to `out` (a source)."""

    mid: int
    out: int
    kernel: int = 3
    stride: int = 2
    padding: int = 1


# ssd.pytorch extras['300'] = [256, 'S', 512, 128, 'S', 256, 128, 256, 128, 256]: 19 -> 10 -> 5 -> 3 -> 1
EXTRAS_300 = (
    ExtraBlock(256, 512),
    ExtraBlock(128, 256),
    ExtraBlock(128, 256, 3, 1, 0),
    ExtraBlock(128, 256, 3, 1, 0),
)
# Caffe SSD512 (as ported to ssd.pytorch): four stride-2 blocks, then a 4x4 conv, padding 1: 32 -> 16 -> 8 -> 4 -> 2 -> 1
EXTRAS_512 = (
    *(ExtraBlock(m, o) for m, o in ((256, 512), (128, 256), (128, 256), (128, 256))),
    ExtraBlock(128, 256, 4, 1, 1),
)


def vgg_layers(cfg: Sequence[int | str] = VGG_BASE, in_channels: int = 3) -> list[nn.Module]:
    """ssd.pytorch's `vgg(cfg, i)`: the VGG16 convs, then pool5 3x3/1, conv6 (dilation 6) and conv7 (1x1).

    Returns:
        35 layers for VGG_BASE: vgg[21] is conv4_3, vgg[31] conv6, vgg[33] conv7 (1024 channels).
    """
    layers: list[nn.Module] = []
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        elif v == "C":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
        else:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(v)
    pool5 = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
    conv6 = nn.Conv2d(in_channels, 1024, kernel_size=3, padding=6, dilation=6)
    conv7 = nn.Conv2d(1024, 1024, kernel_size=1)
    return [*layers, pool5, conv6, nn.ReLU(inplace=True), conv7, nn.ReLU(inplace=True)]


def extra_layers(blocks: Sequence[ExtraBlock], in_channels: int = 1024) -> list[nn.Conv2d]:
    """ssd.pytorch's `add_extras`: two convs per block (no activation here, forward applies ReLU)."""
    layers = []
    for block in blocks:
        layers.append(nn.Conv2d(in_channels, block.mid, kernel_size=1))
        layers.append(
            nn.Conv2d(
                block.mid, block.out, kernel_size=block.kernel, stride=block.stride, padding=block.padding
            )
        )
        in_channels = block.out
    return layers


class L2Norm(nn.Module):
    """Channel-wise L2 normalisation with a learned per-channel scale (ParseNet), as ssd.pytorch's."""

    def __init__(self, n_channels: int, scale: float) -> None:
        super().__init__()
        self.eps = 1e-10
        self.weight = nn.Parameter(torch.full((n_channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        """x (Tensor[B, C, H, W]) -> same shape, each position's channel vector at L2 norm `weight`."""
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + self.eps  # [B, 1, H, W]
        return self.weight[None, :, None, None] * (x / norm)


class VGGSSD(SSD):
    """SSD on the VGG16 base with ssd.pytorch's layer layout and state_dict keys."""

    def __init__(
        self, name: str, num_classes: int, prior_config: PriorConfig, extras: Sequence[ExtraBlock], prior_set: str
    ) -> None:
        super().__init__()
        self.vgg = nn.ModuleList(vgg_layers())
        self.L2Norm = L2Norm(512, 20.0)
        self.extras = nn.ModuleList(extra_layers(extras))
        channels = [512, 1024, *(block.out for block in extras)]
        self.loc, self.conf = multibox_heads(channels, prior_config.boxes_per_location, num_classes)
        self._set_spec(ModelSpec(name, num_classes, prior_config.image_size, prior_config, RGB_MEAN, RGB_STD,
                                 prior_set))
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG init for a base trained from scratch (ssd.pytorch loads a pretrained one)
        for layer in self.vgg:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(layer.bias)
        xavier_init([self.extras, self.loc, self.conf])

    def sources(self, x: Tensor) -> list[Tensor]:
        """[B, 3, S, S] -> conv4_3 (L2-normalised, 512 ch), conv7 (1024 ch), then one map per extra block."""
        for layer in self.vgg[:CONV4_3_END]:
            x = layer(x)
        feats = [self.L2Norm(x)]
        for layer in self.vgg[CONV4_3_END:]:
            x = layer(x)
        feats.append(x)
        for k, layer in enumerate(self.extras):
            x = F.relu(layer(x), inplace=True)
            if k % 2 == 1:
                feats.append(x)
        return feats


class SSD300(VGGSSD):
    """SSD300 (ssd.pytorch `build_ssd('train', 300, num_classes)`): P = 8732.

    `prior_set` "voc" (VOC_300) or "coco" (COCO_300); default ssd.pytorch's rule (VOC for 21 classes).
    """

    def __init__(self, num_classes: int, prior_set: str | None = None) -> None:
        prior_set = resolve_prior_set("ssd300", num_classes, prior_set)
        super().__init__("ssd300", num_classes, vgg_prior_config(prior_set, 300), EXTRAS_300, prior_set)


class SSD512(VGGSSD):
    """SSD512 (Caffe SSD512 layout): P = 24564; `prior_set` as SSD300's (VOC_512 or COCO_512)."""

    def __init__(self, num_classes: int, prior_set: str | None = None) -> None:
        prior_set = resolve_prior_set("ssd512", num_classes, prior_set)
        super().__init__("ssd512", num_classes, vgg_prior_config(prior_set, 512), EXTRAS_512, prior_set)
