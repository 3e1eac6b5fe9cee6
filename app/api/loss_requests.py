"""The SSD loss of a request and its answer, shared by `POST /score-loss` and the Open Inference Protocol's
`ssd-loss` model: the criterion of the request's options, the loss of a checked `LossBatch`, of a
safetensors body or of labelled images (the hosted model predicts), and the `ScoreLossResponse`.
A value the loss cannot use is an `ApiError` naming the field."""

from __future__ import annotations

import torch
from starlette.concurrency import run_in_threadpool

from app.api.errors import invalid
from app.api.inputs import check_bkg_label, labelled_samples
from app.api.loss_batch import LossBatch, joined, predictions_batch, safetensors_batch
from app.api.schemas import LossOptions, ScoreLossRequest, ScoreLossResponse
from app.core.metrics import Metrics, record_match_stats
from app.core.settings import Settings
from app.serving.inference import InferenceWorker, WaitForDisconnect
from app.serving.model_host import ModelHost
from app.serving.served_loss import loss_inputs, served_loss_batched
from ssd_core.loss.multibox import LossOutput, MultiBoxLoss


def criterion_for(options: LossOptions, num_classes: int) -> MultiBoxLoss:
    """ssd.pytorch's constructor with the request's options."""
    return MultiBoxLoss(
        num_classes, options.overlap_thresh, options.prior_for_matching, options.bkg_label, options.neg_mining,
        options.neg_pos, options.neg_overlap, options.encode_target,
        variance=options.variance, loc_weight=options.loc_weight, match_type=options.match_type,
    )


def batch_loss(batch: LossBatch, num_classes: int) -> LossOutput:
    """The loss of a validated batch (no gradients)."""
    with torch.inference_mode():
        try:
            return criterion_for(batch.options, num_classes).compute(
                (batch.loc, batch.conf, batch.priors), batch.targets, batch.class_mask)
        except ValueError as error:  # the loss's own checks (e.g. option combinations)
            raise invalid("body", str(error)) from None


def safetensors_answer(
    chunks: list[bytes], model_priors: torch.Tensor, version: int, settings: Settings, metrics: Metrics
) -> str:
    """The binary form in one worker-thread call: join the body, parse (tensors are views of it), check, score,
    and `scored_answer`."""
    output = batch_loss(safetensors_batch(joined(chunks), model_priors, settings), settings.num_classes)
    return scored_answer(output, version, settings, metrics)


def predictions_answer(
    request: ScoreLossRequest, model_priors: torch.Tensor, version: int, settings: Settings, metrics: Metrics
) -> str:
    """The JSON predictions form in one worker-thread call: check against the model, score, `scored_answer`."""
    output = batch_loss(predictions_batch(request, model_priors, settings), settings.num_classes)
    return scored_answer(output, version, settings, metrics)


def scored_answer(output: LossOutput, version: int, settings: Settings, metrics: Metrics) -> str:
    """`loss_response` as its JSON text, with the batch's match statistics recorded: building the answer reads
    every statistic tensor, so the route runs it on its worker thread, not on the event loop."""
    answer = loss_response(output, version, settings.object_class_names()).model_dump_json()
    record_match_stats(metrics, "score", output)
    return answer


async def labelled_images_loss(
    client_gone: WaitForDisconnect, parsed: ScoreLossRequest, route: str, host: ModelHost,
    inference: InferenceWorker, settings: Settings, metrics: Metrics,
) -> tuple[LossOutput, int]:
    """The image form: decode, run the current model version (batched with other requests), score its predictions.

    Returns:
        (the loss with its match statistics, the version that predicted).
    """
    assert parsed.images is not None
    check_bkg_label(parsed.options, settings)  # before any decoding
    criterion = criterion_for(parsed.options, settings.num_classes)

    def prepare() -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        samples = labelled_samples([(item.image, item) for item in parsed.images], settings)
        return loss_inputs(samples, host.spec, criterion)  # [B, 3, S, S], list[[n, 6]], [B, C] or None

    images, targets, class_mask = await run_in_threadpool(prepare)
    output, served = await served_loss_batched(
        client_gone, images, targets, class_mask, criterion, route, host, inference, metrics)
    return output, served.version


def loss_response(output: LossOutput, version: int, class_names: list[str]) -> ScoreLossResponse:
    """The answer of `/score-loss` to a loss computed with model version `version`'s priors or predictions;
    a 422 when the loss overflowed."""
    loss_l, loss_c = float(output.loss_l), float(output.loss_c)
    if not all(abs(v) < float("inf") for v in (loss_l, loss_c)):
        raise invalid("predictions", "the loss overflowed to a non-finite value (predictions too large)")
    stats = output.stats
    totals = stats.totals()
    return ScoreLossResponse(
        loss=loss_l + loss_c, loss_l=loss_l, loss_c=loss_c, num_positives=totals["num_positives"],
        num_negatives=totals["num_negatives"], per_image=stats.per_image(),
        per_class=stats.per_class.rows(class_names),
        loss_c_negatives=float(stats.per_class.negative_loss_c_sum / stats.normalizer), model_version=version,
    )
