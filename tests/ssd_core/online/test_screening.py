"""Screening (ssd_core.online.screening): the window's median and ratio, the hints, a failed batch stops its
job unless forced, and only a finite pre-training loss joins the window."""

from __future__ import annotations

import math

import pytest

from ssd_core.online.screening import (
    BOX_HINT,
    LABEL_HINT,
    ScreeningConfig,
    ScreeningHistory,
    ScreeningVerdict,
)


def _verdict(passed: bool) -> ScreeningVerdict:
    return ScreeningVerdict(passed, 9.0, 7.0, 2.0, 3.0, 4.5, 5, None if passed else "too high")


def test_a_failed_batch_stops_its_job_unless_forced_and_a_passed_one_never():
    assert _verdict(False).stops(force=False)
    assert not _verdict(False).stops(force=True)
    assert not _verdict(True).stops(force=False) and not _verdict(True).stops(force=True)


def test_only_a_finite_loss_joins_the_window():
    history = ScreeningHistory(ScreeningConfig(ratio=2.0, window=5, min_jobs=1))
    for parts in [(math.nan, 1.0), (1.0, math.inf), (math.nan, math.nan)]:
        history.accept(*parts)
    assert len(history) == 0
    history.accept(1.0, 2.0)
    assert len(history) == 1 and history.judge(1.0, 2.0).median == 3.0


def test_screening_waits_for_min_jobs_then_rejects_above_ratio_with_a_hint():
    history = ScreeningHistory(ScreeningConfig(ratio=1.5, window=10, min_jobs=5))
    for parts in [(1.0, 2.0), (1.1, 2.0), (0.9, 2.1), (1.0, 1.9)]:
        assert history.judge(*parts).passed and history.judge(*parts).median is None
        history.accept(*parts)
    assert history.judge(9.0, 9.0).passed  # 4 jobs: not judged yet
    history.accept(1.0, 2.2)
    verdict = history.judge(1.0, 2.0)
    assert verdict.passed and verdict.median == pytest.approx(3.0) and verdict.threshold == pytest.approx(4.5)
    boxes = history.judge(7.0, 2.0)
    assert not boxes.passed and BOX_HINT in boxes.reason and "4.500" in boxes.reason and "force" in boxes.reason
    labels = history.judge(1.0, 5.0)
    assert not labels.passed and LABEL_HINT in labels.reason
    assert not history.judge(float("nan"), 1.0).passed


def test_screening_window_forgets_old_jobs():
    history = ScreeningHistory(ScreeningConfig(ratio=2.0, window=5, min_jobs=5), [(10.0, 10.0)] * 5)
    assert history.judge(30.0, 0.0).passed
    for _ in range(5):
        history.accept(1.0, 1.0)
    assert len(history) == 5 and not history.judge(3.0, 2.0).passed


def test_screening_config_checks():
    with pytest.raises(ValueError, match=r"ratio must be > 1, got 1\.0"):
        ScreeningConfig(ratio=1.0)
    with pytest.raises(ValueError, match="min_jobs=6, window=5"):
        ScreeningConfig(window=5, min_jobs=6)


# ---- the gate
