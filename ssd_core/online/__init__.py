"""The rules of online learning, framework-free: the holdout, screening (losses and label quality), the
publish gate, replay, and the annotation corruptions they are measured against."""

from ssd_core.online.gate import (
    GateConfig,
    GateDecision,
    PairedComparison,
    ReferenceLine,
    ValidationScore,
    compare_images,
    decide,
    score_model,
    ungated,
)
from ssd_core.online.holdout import HoldoutSplit, split_holdout
from ssd_core.online.label_quality import BoxIssue, LabelCheckConfig, check_labels
from ssd_core.online.replay import ReplayMemory, balanced_draw
from ssd_core.online.screening import Competence, ImageLoss, ScreeningConfig, ScreeningVerdict, screen_batch

__all__ = [
    "BoxIssue", "Competence", "GateConfig", "GateDecision", "HoldoutSplit", "ImageLoss", "LabelCheckConfig",
    "PairedComparison", "ReferenceLine", "ReplayMemory", "ScreeningConfig", "ScreeningVerdict", "ValidationScore",
    "balanced_draw", "check_labels", "compare_images", "decide", "score_model", "screen_batch", "split_holdout",
    "ungated",
]
