"""The rules of online learning, framework-free: the holdout, screening, the publish gate, replay."""

from ssd_core.online.gate import (
    GateConfig,
    GateDecision,
    ReferenceLine,
    ValidationScore,
    decide,
    score_model,
    ungated,
)
from ssd_core.online.holdout import HoldoutSplit, split_holdout
from ssd_core.online.replay import ReplayMemory, balanced_draw
from ssd_core.online.screening import ScreeningConfig, ScreeningHistory, ScreeningVerdict

__all__ = ["GateConfig", "GateDecision", "HoldoutSplit", "ReferenceLine", "ReplayMemory", "ScreeningConfig", "ScreeningHistory", "ScreeningVerdict", "ValidationScore", "balanced_draw", "decide", "score_model", "split_holdout", "ungated"]
