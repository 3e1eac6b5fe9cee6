"""The loss of a request: the criterion of its options, the loss's own refusals and an overflow as 422s
naming the field."""

from __future__ import annotations

import pytest
import torch

from app.api.errors import ApiError
from app.api.loss_batch import LossBatch
from app.api.loss_requests import batch_loss, criterion_for, loss_response
from app.api.schemas import LossOptions


def batch(options: LossOptions, scale: float = 1.0) -> LossBatch:
    priors = torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.75, 0.75, 0.5, 0.5]])  # [P=2, 4] cxcywh
    targets = torch.tensor([[[0.0, 0.0, 0.5, 0.5, 1.0, 0.0]]])  # [B=1, M=1, 6]
    return LossBatch(torch.zeros(1, 2, 4), torch.full((1, 2, 4), scale), priors, targets, options)


def test_the_criterion_takes_the_request_options():
    criterion = criterion_for(LossOptions(neg_pos=5, match_type="bipartite"), 4)
    assert criterion.num_classes == 4 and criterion.negpos_ratio == 5 and criterion.match_type == "bipartite"


def test_a_batch_is_scored_and_answered_with_the_version():
    output = batch_loss(batch(LossOptions()), 4)
    answer = loss_response(output, 7, ["a", "b", "c"])
    assert answer.model_version == 7
    assert answer.loss == pytest.approx(answer.loss_l + answer.loss_c)
    assert answer.num_positives == 1


def test_a_non_finite_loss_is_a_422_on_the_predictions():
    output = batch_loss(batch(LossOptions()), 4)._replace(loss_c=torch.tensor(float("inf")))
    with pytest.raises(ApiError) as refused:
        loss_response(output, 0, ["a", "b", "c"])
    assert (refused.value.status, refused.value.field) == (422, "predictions")
