"""Images and labelled samples: decoding and model input, data set readers, the synthetic set, augmentation, class names."""

from ssd_core.data.augment import AugmentConfig, ssd_augmentation
from ssd_core.data.class_names import CLASS_NAME_PRESETS, expand_class_names
from ssd_core.data.datasets import VOC_CLASSES, CocoDataset, Sample, VOCDataset, collate
from ssd_core.data.images import (
    ImageError,
    decode_image_bytes,
    encode_jpeg,
    encode_png,
    image_dimensions,
    model_inputs,
    to_model_input,
)
from ssd_core.data.synthetic import ShapesDataset

__all__ = ["CLASS_NAME_PRESETS", "VOC_CLASSES", "AugmentConfig", "CocoDataset", "ImageError", "Sample", "ShapesDataset", "VOCDataset", "collate", "decode_image_bytes", "encode_jpeg", "encode_png", "expand_class_names", "image_dimensions", "model_inputs", "ssd_augmentation", "to_model_input"]
