"""SSD core library: boxes, priors, box coder, batched matching and the MultiBoxLoss."""

from ssd_core.boxes import batched_box_iou, box_iou, center_size, invalid_box_mask, point_form, validate_boxes
from ssd_core.coder import decode, encode
from ssd_core.loss import LossOutput, MultiBoxLoss
from ssd_core.matching import MatchResult, match
from ssd_core.priors import (
    COCO_300,
    COCO_512,
    VOC_300,
    VOC_512,
    PriorConfig,
    prior_boxes,
    scaled_prior_config,
)
from ssd_core.stats import ClassStats, MatchStats
from ssd_core.targets import pad_targets

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
