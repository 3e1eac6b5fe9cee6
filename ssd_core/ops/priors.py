"""Prior (default) boxes, generated as in ssd.pytorch's `PriorBox`.

Order: feature map by feature map; within one map, location by location in row-major order
(row i, column j); at each location the min-size square, the sqrt(min * max) square, then for
each aspect ratio r the pair (w * sqrt(r), h / sqrt(r)), (w / sqrt(r), h * sqrt(r)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "COCO_300",
    "COCO_512",
    "PRESETS",
    "PRIOR_SETS",
    "VOC_300",
    "VOC_512",
    "PriorConfig",
    "prior_boxes",
    "resolve_prior_set",
    "scaled_prior_config",
    "vgg_prior_config",
]


@dataclass(frozen=True)
class PriorConfig:
    """Geometry of the prior boxes of one SSD model.

    Attributes:
        image_size: side of the square network input in pixels.
        feature_maps: side of each source feature map, largest first.
        steps: pixel stride of each feature map (image_size / step cells per side).
        min_sizes, max_sizes: box sizes in pixels per feature map.
        aspect_ratios: extra aspect ratios per feature map (each adds two boxes).
        clip: clamp the (cx, cy, w, h) values to [0, 1].
        variance: the (center, size) variances of the box coder.
    """

    image_size: int
    feature_maps: tuple[int, ...]
    steps: tuple[float, ...]
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: bool = True
    variance: tuple[float, float] = field(default=(0.1, 0.2))

    def __post_init__(self) -> None:
        n = len(self.feature_maps)
        for name in ("steps", "min_sizes", "max_sizes", "aspect_ratios"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, feature_maps has {n}")

    @property
    def boxes_per_location(self) -> tuple[int, ...]:
        """Number of priors at each location of each feature map: 2 + 2 * len(aspect_ratios[k])."""
        return tuple(2 + 2 * len(ratios) for ratios in self.aspect_ratios)

    @property
    def num_priors(self) -> int:
        return sum(f * f * k for f, k in zip(self.feature_maps, self.boxes_per_location, strict=True))


def _box_sizes(config: PriorConfig, k: int) -> list[tuple[float, float]]:
    s_k = config.min_sizes[k] / config.image_size
    s_k_prime = math.sqrt(s_k * (config.max_sizes[k] / config.image_size))
    sizes = [(s_k, s_k), (s_k_prime, s_k_prime)]
    for ratio in config.aspect_ratios[k]:
        r = math.sqrt(ratio)
        sizes += [(s_k * r, s_k / r), (s_k / r, s_k * r)]
    return sizes


def prior_boxes(config: PriorConfig, device: torch.device | str | None = None) -> Tensor:
    """Generate the prior boxes of `config`.

    Returns:
        Tensor[P, 4]: priors in normalised (cx, cy, w, h), float32.
    """
    per_map = []
    for k, f in enumerate(config.feature_maps):
        f_k = config.image_size / config.steps[k]
        centers = (torch.arange(f, dtype=torch.float64) + 0.5) / f_k  # [f]
        cy, cx = torch.meshgrid(centers, centers, indexing="ij")  # [f, f] each, row-major
        sizes = torch.tensor(_box_sizes(config, k), dtype=torch.float64)  # [K, 2]
        xy = torch.stack((cx, cy), dim=-1)[:, :, None, :].expand(f, f, len(sizes), 2)  # [f, f, K, 2]
        wh = sizes[None, None].expand(f, f, len(sizes), 2)  # [f, f, K, 2]
        per_map.append(torch.cat((xy, wh), dim=-1).reshape(-1, 4))
    priors = torch.cat(per_map)  # [P, 4]
    if config.clip:
        priors = priors.clamp(0.0, 1.0)
    return priors.to(dtype=torch.float32, device=device)


def scaled_prior_config(
    image_size: int,
    feature_maps: Sequence[int],
    aspect_ratios: Sequence[Sequence[float]],
    s_min: float = 0.2,
    s_max: float = 0.9,
    clip: bool = True,
) -> PriorConfig:
    """A `PriorConfig` for any feature-map sizes, with the SSD paper's linear scale rule.

    Scale of map k (0-based, m maps): s_k = s_min + (s_max - s_min) * k / (m - 1); the
    sqrt(min * max) box uses the next scale, s_{m} extrapolated for the last map.
    Steps are image_size / feature_map, so priors are centred on each cell.
    """
    m = len(feature_maps)
    span = (s_max - s_min) / max(m - 1, 1)
    scales = [s_min + span * k for k in range(m + 1)]
    return PriorConfig(
        image_size=image_size,
        feature_maps=tuple(int(f) for f in feature_maps),
        steps=tuple(image_size / f for f in feature_maps),
        min_sizes=tuple(s * image_size for s in scales[:-1]),
        max_sizes=tuple(s * image_size for s in scales[1:]),
        aspect_ratios=tuple(tuple(float(r) for r in ratios) for ratios in aspect_ratios),
        clip=clip,
    )


_AR_300 = ((2,), (2, 3), (2, 3), (2, 3), (2,), (2,))
_AR_512 = ((2,), (2, 3), (2, 3), (2, 3), (2, 3), (2,), (2,))

# ssd.pytorch's data/config.py: voc, coco
VOC_300 = PriorConfig(
    image_size=300,
    feature_maps=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(30, 60, 111, 162, 213, 264),
    max_sizes=(60, 111, 162, 213, 264, 315),
    aspect_ratios=_AR_300,
)
COCO_300 = PriorConfig(
    image_size=300,
    feature_maps=(38, 19, 10, 5, 3, 1),
    steps=(8, 16, 32, 64, 100, 300),
    min_sizes=(21, 45, 99, 153, 207, 261),
    max_sizes=(45, 99, 153, 207, 261, 315),
    aspect_ratios=_AR_300,
)
# original Caffe SSD512 (min_ratio 15 / 10 for VOC / COCO, max_ratio 90)
VOC_512 = PriorConfig(
    image_size=512,
    feature_maps=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(35.84, 76.8, 153.6, 230.4, 307.2, 384.0, 460.8),
    max_sizes=(76.8, 153.6, 230.4, 307.2, 384.0, 460.8, 537.6),
    aspect_ratios=_AR_512,
)
COCO_512 = PriorConfig(
    image_size=512,
    feature_maps=(64, 32, 16, 8, 4, 2, 1),
    steps=(8, 16, 32, 64, 128, 256, 512),
    min_sizes=(20.48, 51.2, 133.12, 215.04, 296.96, 378.88, 460.8),
    max_sizes=(51.2, 133.12, 215.04, 296.96, 378.88, 460.8, 542.72),
    aspect_ratios=_AR_512,
)

PRESETS: dict[str, PriorConfig] = {
    "voc300": VOC_300,
    "coco300": COCO_300,
    "voc512": VOC_512,
    "coco512": COCO_512,
}

# The prior sets of the VGG models (ssd300, ssd512); ssd-small's own priors are "scaled" (`scaled_prior_config`).
PRIOR_SETS: tuple[str, ...] = ("voc", "coco")
SCALED = "scaled"
VOC_CLASS_COUNT = 21


def resolve_prior_set(model_name: str, num_classes: int, prior_set: str | None = None) -> str:
    """The prior set a model uses: `prior_set` when given, else ssd.pytorch's rule.

    ssd.pytorch's `SSD` takes `(coco, voc)[num_classes == 21]`: VOC priors for 21 classes, COCO priors for
    every other class count. ssd-small always has its own ("scaled") priors.

    Raises:
        ValueError: an unknown set, or voc/coco asked of ssd-small.
    """
    if model_name == "ssd-small":
        if prior_set not in (None, SCALED):
            raise ValueError(f"priors {prior_set!r}: ssd-small has its own scaled priors; voc/coco are for ssd300/ssd512")
        return SCALED
    if prior_set is None:
        return "voc" if num_classes == VOC_CLASS_COUNT else "coco"
    if prior_set not in PRIOR_SETS:
        raise ValueError(f"unknown priors {prior_set!r}; expected one of {', '.join(PRIOR_SETS)}")
    return prior_set


def vgg_prior_config(prior_set: str, image_size: int) -> PriorConfig:
    """The `PRESETS` entry of a VGG model: `vgg_prior_config("coco", 300)` is COCO_300."""
    key = f"{prior_set}{image_size}"
    if key not in PRESETS:
        raise ValueError(f"no {prior_set!r} priors for a {image_size} px input; presets: {', '.join(PRESETS)}")
    return PRESETS[key]
