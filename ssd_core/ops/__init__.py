"""Box operations: formats and IoU, user box formats, the box coder, prior (default) boxes, grouped NMS."""

from ssd_core.ops.box_formats import BOX_FORMATS, check_pixel_boxes, to_normalised_xyxy, xywh_to_xyxy
from ssd_core.ops.boxes import (
    batched_box_iou,
    box_iou,
    center_size,
    invalid_box_mask,
    point_form,
    validate_boxes,
)
from ssd_core.ops.coder import decode, encode
from ssd_core.ops.nms import grouped_nms
from ssd_core.ops.priors import (
    COCO_300,
    COCO_512,
    PRESETS,
    PRIOR_SETS,
    VOC_300,
    VOC_512,
    PriorConfig,
    prior_boxes,
    resolve_prior_set,
    scaled_prior_config,
    vgg_prior_config,
)

__all__ = ["BOX_FORMATS", "COCO_300", "COCO_512", "PRESETS", "PRIOR_SETS", "VOC_300", "VOC_512", "PriorConfig", "batched_box_iou", "box_iou", "center_size", "check_pixel_boxes", "decode", "encode", "grouped_nms", "invalid_box_mask", "point_form", "prior_boxes", "resolve_prior_set", "scaled_prior_config", "to_normalised_xyxy", "validate_boxes", "vgg_prior_config", "xywh_to_xyxy"]
