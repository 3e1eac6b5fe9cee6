"""Screening a fine-tune batch before its first step: is its loss under the served model far above
what accepted jobs showed?

A batch whose boxes are in the wrong coordinates or whose labels are shifted scores a loss several
times that of clean batches on the model being served (measured in benchmarks/README.md, "Online
learning"). The rule: reject when the batch's loss exceeds `ratio` times the median pre-training
loss of the last `window` accepted jobs, once at least `min_jobs` of them are known.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ScreeningConfig", "ScreeningHistory", "ScreeningVerdict"]

BOX_HINT = ("the localisation loss is the outlier: boxes in the wrong coordinates? (normalised instead of pixels, "
            "(x, y, w, h) instead of (x1, y1, x2, y2), shifted or scaled)")
LABEL_HINT = ("the classification loss is the outlier: labels off by one or in another class order? (labels are "
              "0-based object classes, background not counted)")


@dataclass(frozen=True)
class ScreeningConfig:
    """ratio: how many times the median loss a batch may reach; window: accepted jobs remembered;
    min_jobs: accepted jobs needed before screening judges anything."""

    ratio: float = 1.75
    window: int = 20
    min_jobs: int = 5

    def __post_init__(self) -> None:
        if not self.ratio > 1:
            raise ValueError(f"ratio must be > 1, got {self.ratio}")
        if not 1 <= self.min_jobs <= self.window:
            raise ValueError(f"need 1 <= min_jobs <= window, got min_jobs={self.min_jobs}, window={self.window}")


@dataclass(frozen=True)
class ScreeningVerdict:
    """passed; the batch's loss (loss_l + loss_c) and parts; the window's median and the threshold
    (None while fewer than min_jobs are known); jobs: accepted jobs the median is over; reason when rejected."""

    passed: bool
    loss: float
    loss_l: float
    loss_c: float
    median: float | None
    threshold: float | None
    jobs: int
    reason: str | None = None

    def stops(self, force: bool) -> bool:
        """Whether the job ends here, rejected: a batch that failed screening trains only when its client
        forces it past (the publish gate still judges what it trains)."""
        return not self.passed and not force


class ScreeningHistory:
    """The pre-training losses (loss_l, loss_c) of the last `config.window` accepted jobs."""

    def __init__(self, config: ScreeningConfig, losses: Iterable[tuple[float, float]] = ()) -> None:
        self.config = config
        self._losses: deque[tuple[float, float]] = deque(losses, maxlen=config.window)

    def __len__(self) -> int:
        return len(self._losses)

    def accept(self, loss_l: float, loss_c: float) -> None:
        """An accepted job's pre-training loss joins the window."""
        if math.isfinite(loss_l + loss_c):
            self._losses.append((loss_l, loss_c))

    def judge(self, loss_l: float, loss_c: float) -> ScreeningVerdict:
        """Pass or reject a batch whose served-model loss parts are `loss_l`, `loss_c`."""
        loss, jobs = loss_l + loss_c, len(self._losses)
        if not math.isfinite(loss):
            return ScreeningVerdict(False, loss, loss_l, loss_c, None, None, jobs,
                                    "the served model's loss on this batch is not finite")
        if jobs < self.config.min_jobs:
            return ScreeningVerdict(True, loss, loss_l, loss_c, None, None, jobs)
        median = statistics.median(loc + conf for loc, conf in self._losses)
        threshold = self.config.ratio * median
        if loss <= threshold:
            return ScreeningVerdict(True, loss, loss_l, loss_c, median, threshold, jobs)
        median_l = statistics.median(loc for loc, _ in self._losses)
        median_c = statistics.median(conf for _, conf in self._losses)
        ratio_l, ratio_c = loss_l / max(median_l, 1e-12), loss_c / max(median_c, 1e-12)
        reason = (f"screening: the served model's loss on this batch is {loss:.3f}, above {self.config.ratio:g} x "
                  f"the median {median:.3f} of the last {jobs} accepted jobs ({threshold:.3f}; loss_l {ratio_l:.1f} x "
                  f"its median, loss_c {ratio_c:.1f} x); {BOX_HINT if ratio_l >= ratio_c else LABEL_HINT}. "
                  f"Send \"force\": true to skip screening (the gate still applies)")
        return ScreeningVerdict(False, loss, loss_l, loss_c, median, threshold, jobs, reason)
