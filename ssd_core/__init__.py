"""SSD core library: boxes, priors, box coder, batched matching and the MultiBoxLoss."""

from ssd_core.loss.matching import MatchResult, match
from ssd_core.loss.multibox import LossOutput, MultiBoxLoss
from ssd_core.loss.stats import ClassStats, MatchStats
from ssd_core.loss.targets import pad_targets
from ssd_core.ops.boxes import (
    batched_box_iou,
    box_iou,
    center_size,
    invalid_box_mask,
    point_form,
    validate_boxes,
)
from ssd_core.ops.coder import decode, encode
from ssd_core.ops.priors import (
    COCO_300,
    COCO_512,
    VOC_300,
    VOC_512,
    PriorConfig,
    prior_boxes,
    scaled_prior_config,
)

__all__ = [
    "COCO_300",
    "COCO_512",
    "VOC_300",
    "VOC_512",
    "ClassStats",
    "LossOutput",
    "MatchResult",
    "MatchStats",
    "MultiBoxLoss",
    "PriorConfig",
    "batched_box_iou",
    "box_iou",
    "center_size",
    "decode",
    "encode",
    "invalid_box_mask",
    "match",
    "pad_targets",
    "point_form",
    "prior_boxes",
    "scaled_prior_config",
    "validate_boxes",
]
