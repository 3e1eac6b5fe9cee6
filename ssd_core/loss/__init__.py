"""The SSD MultiBoxLoss and its parts: matching, target tensors, partial labels, match statistics."""

from ssd_core.loss.criterion import LossCriterion
from ssd_core.loss.matching import MATCH_TYPES, MatchResult, match
from ssd_core.loss.multibox import LossOutput, MultiBoxLoss
from ssd_core.loss.partial_labels import labelled_class_mask
from ssd_core.loss.stats import ClassStats, MatchStats
from ssd_core.loss.targets import pad_targets, validate_targets

__all__ = ["MATCH_TYPES", "ClassStats", "LossCriterion", "LossOutput", "MatchResult", "MatchStats", "MultiBoxLoss", "labelled_class_mask", "match", "pad_targets", "validate_targets"]
