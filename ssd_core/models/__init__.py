"""The SSD networks (`build_model` by name), their post-processing, ssd.pytorch import and export."""

from ssd_core.models.base import SSD, ModelSpec
from ssd_core.models.build import LEGACY_PRIOR_SETS, MODEL_NAMES, build_model
from ssd_core.models.postprocess import Detections, detect, detect_with_spec
from ssd_core.models.small import SmallConfig, SSDSmall
from ssd_core.models.vgg import SSD300, SSD512

__all__ = ["LEGACY_PRIOR_SETS", "MODEL_NAMES", "SSD", "SSD300", "SSD512", "Detections", "ModelSpec", "SSDSmall", "SmallConfig",
           "build_model", "detect", "detect_with_spec"]
