"""Screening's rules on a job (ssd_core.online.screening): a failed batch stops its job unless forced, and
only a finite pre-training loss joins the window."""

from __future__ import annotations

import math

from ssd_core.online.screening import ScreeningConfig, ScreeningHistory, ScreeningVerdict


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
