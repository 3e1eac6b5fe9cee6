"""ssd-small: a narrow VGG-style SSD with BatchNorm for CPU training, demos and tests.

Stride-8, 16 and 32 backbone maps plus stride-2 extra blocks down to 1x1 feed plain 3x3
multibox heads. The prior geometry is derived from the feature-map sizes measured by running
a dummy image through the network at construction (`scaled_prior_config`), so changing the
input size or the layers keeps priors and heads consistent.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssd_core.models.base import SSD, ModelSpec, multibox_heads, xavier_init
from ssd_core.ops.priors import SCALED, scaled_prior_config

__all__ = ["SSDSmall", "SmallConfig"]


@dataclass(frozen=True)
class SmallConfig:
    """Shape of ssd-small.

    Attributes:
        image_size: input side S (160-320 is the intended range).
        stem: channels of the stride-2 and stride-4 stages.
        source_widths: channels of the stride-8, 16 and 32 backbone maps (the first three sources).
        extra_widths: channels of each extra (stride-2) source; the last reaches 1x1 at S = 256.
        aspect_ratios: extra prior aspect ratios per source map (each adds two priors).
        s_min, s_max: prior scale of the first and last map, as a fraction of the image side.
    """

    image_size: int = 256
    stem: tuple[int, int] = (16, 32)
    source_widths: tuple[int, int, int] = (96, 160, 256)
    extra_widths: tuple[int, ...] = (256, 256, 256)
    aspect_ratios: tuple[tuple[float, ...], ...] = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
    s_min: float = 0.1
    s_max: float = 0.85


def conv_bn_relu(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias, BatchNorm follows) + BatchNorm + ReLU; 'same' padding for odd kernels."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _stage(c_in: int, c_out: int, depth: int) -> nn.Sequential:
    """Halve the resolution with a stride-2 conv, then `depth - 1` 3x3 convs at c_out."""
    layers = [conv_bn_relu(c_in, c_out, stride=2)]
    layers += [conv_bn_relu(c_out, c_out) for _ in range(depth - 1)]
    return nn.Sequential(*layers)


def _extra(c_in: int, c_out: int) -> nn.Sequential:
    """SSD extra block: 1x1 squeeze to c_out / 2, then a stride-2 3x3 conv to c_out."""
    return nn.Sequential(conv_bn_relu(c_in, c_out // 2, kernel=1), conv_bn_relu(c_out // 2, c_out, stride=2))


class SSDSmall(SSD):
    """ssd-small: input [B, 3, S, S] with S = config.image_size, pixel mean/std 127.5."""

    def __init__(self, num_classes: int, config: SmallConfig = SmallConfig()) -> None:
        super().__init__()
        s8, s16, s32 = config.source_widths
        self.backbone = nn.Sequential(
            conv_bn_relu(3, config.stem[0], stride=2),  # S/2
            _stage(config.stem[0], config.stem[1], depth=2),  # S/4
            _stage(config.stem[1], s8, depth=3),  # S/8: source 0
        )
        extras = [
            _extra(c_in, c_out)
            for c_in, c_out in zip((s32, *config.extra_widths[:-1]), config.extra_widths, strict=True)
        ]
        self.blocks = nn.ModuleList([_stage(s8, s16, depth=2), _stage(s16, s32, depth=2), *extras])
        channels = [*config.source_widths, *config.extra_widths]
        prior_config = scaled_prior_config(
            config.image_size,
            self._measure_feature_maps(config.image_size),
            config.aspect_ratios,
            s_min=config.s_min,
            s_max=config.s_max,
        )
        self.loc, self.conf = multibox_heads(channels, prior_config.boxes_per_location, num_classes)
        mean, std = (127.5, 127.5, 127.5), (127.5, 127.5, 127.5)
        self._set_spec(ModelSpec("ssd-small", num_classes, config.image_size, prior_config, mean, std, SCALED))
        xavier_init([self.loc, self.conf])

    @torch.no_grad()
    def _measure_feature_maps(self, image_size: int) -> list[int]:
        """Side of each source map for a dummy [1, 3, S, S] input (eval mode: BatchNorm on one sample)."""
        was_training = self.training
        self.eval()
        sizes = [f.shape[-1] for f in self.sources(torch.zeros(1, 3, image_size, image_size))]
        self.train(was_training)
        return sizes

    def sources(self, x: Tensor) -> list[Tensor]:
        """[B, 3, S, S] -> maps at stride 8, 16, 32, then one per extra block (64, 128, ...)."""
        x = self.backbone(x)
        feats = [x]
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats
