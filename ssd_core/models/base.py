"""What every SSD network shares: its `ModelSpec`, its prior boxes and the multibox heads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ssd_core.ops.priors import PriorConfig, prior_boxes

__all__ = ["SSD", "ModelSpec", "multibox_heads", "xavier_init"]


@dataclass(frozen=True)
class ModelSpec:
    """What callers need to know to feed a model and read its output.

    Attributes:
        name: model name as used by `build_model` ('ssd300', 'ssd512', 'ssd-small').
        num_classes: conf columns, background (index 0) included.
        image_size: side S of the square input [B, 3, S, S].
        prior_config: geometry of the priors the model predicts offsets for.
        pixel_mean, pixel_std: per input channel, in RGB order and 0-255 units: the model's
            input is (rgb_pixels - pixel_mean) / pixel_std.
        prior_set: which priors: "voc" or "coco" (ssd300/ssd512, see `priors.resolve_prior_set`) or
            "scaled" (ssd-small's own); recorded in checkpoints and checked on load.
    """

    name: str
    num_classes: int
    image_size: int
    prior_config: PriorConfig
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]
    prior_set: str


def multibox_heads(
    in_channels: Sequence[int], boxes_per_location: Sequence[int], num_classes: int
) -> tuple[nn.ModuleList, nn.ModuleList]:
    """The loc and conf 3x3 convolutions of ssd.pytorch's `multibox`, one pair per source map.

    Returns:
        (loc, conf): head k maps source k [B, in_channels[k], H, W] to
        [B, A_k * 4, H, W] and [B, A_k * num_classes, H, W], A_k = boxes_per_location[k].
    """
    pairs = list(zip(in_channels, boxes_per_location, strict=True))
    loc = nn.ModuleList(nn.Conv2d(c, a * 4, kernel_size=3, padding=1) for c, a in pairs)
    conf = nn.ModuleList(nn.Conv2d(c, a * num_classes, kernel_size=3, padding=1) for c, a in pairs)
    return loc, conf


def xavier_init(modules: Sequence[nn.Module]) -> None:
    """ssd.pytorch's `weights_init`: xavier_uniform conv weights, zero biases."""
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.xavier_uniform_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)


def _flatten_head(out: Tensor, width: int) -> Tensor:
    """[B, A * width, H, W] -> [B, H * W * A, width], in the priors' order (row, column, box)."""
    return out.permute(0, 2, 3, 1).reshape(out.shape[0], -1, width)


class SSD(nn.Module):
    """Base of every SSD network.

    A subclass builds its layers, then `loc` and `conf` (see `multibox_heads`), calls
    `_set_spec`, and implements `sources`. The priors are a non-persistent buffer: they follow
    `.to(device)` but stay out of the state_dict, as in ssd.pytorch's checkpoints.
    """

    spec: ModelSpec
    priors: Tensor  # [P, 4] normalised (cx, cy, w, h)
    loc: nn.ModuleList
    conf: nn.ModuleList

    def _set_spec(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.register_buffer("priors", prior_boxes(spec.prior_config), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def sources(self, x: Tensor) -> list[Tensor]:
        """The feature maps the heads read, largest first: [B, C_k, f_k, f_k] with f_k = feature_maps[k]."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Run the network.

        Args:
            x (Tensor[B, 3, S, S]): normalised images, S = spec.image_size.

        Returns:
            loc (Tensor[B, P, 4]): offsets from the priors (see coder.encode).
            conf (Tensor[B, P, C]): raw class logits, background column included.
            priors (Tensor[P, 4]): the priors in normalised (cx, cy, w, h).
        """
        size = self.spec.image_size
        if x.dim() != 4 or x.shape[1] != 3 or x.shape[2:] != (size, size):
            raise ValueError(f"x must have shape [B, 3, {size}, {size}], got {tuple(x.shape)}")
        feats = self.sources(x)
        loc = torch.cat([_flatten_head(head(f), 4) for head, f in zip(self.loc, feats, strict=True)], 1)
        conf = torch.cat(
            [_flatten_head(head(f), self.num_classes) for head, f in zip(self.conf, feats, strict=True)], 1
        )
        return loc, conf, self.priors  # [B, P, 4], [B, P, C], [P, 4]
