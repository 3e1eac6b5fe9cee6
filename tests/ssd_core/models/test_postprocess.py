"""detect(): hand-worked cases and a per-class loop reference; detect_with_spec()."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torchvision.ops import nms

from ssd_core.models import build_model
from ssd_core.models.postprocess import detect, detect_with_spec
from ssd_core.ops.boxes import point_form
from ssd_core.ops.coder import decode

# three priors (cx, cy, w, h): 0 and 1 overlap (IoU 0.818), 2 is far away
PRIORS = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.32, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])


def run(probabilities, **kwargs):
    """detect() on one image whose loc is zero (boxes = priors) and whose softmax is `probabilities`."""
    conf = torch.tensor(probabilities).log()[None]  # [1, P, C]
    return detect(torch.zeros(1, len(probabilities), 4), conf, PRIORS, **kwargs)


def test_overlapping_boxes_of_one_class_keep_the_best():
    # columns: background, class 0, class 1
    (det,) = run([[0.1, 0.85, 0.05], [0.2, 0.75, 0.05], [0.6, 0.05, 0.35]], score_threshold=0.1)
    assert det.labels.tolist() == [0, 1]
    assert torch.allclose(det.scores, torch.tensor([0.85, 0.35]))
    assert torch.allclose(det.boxes, point_form(PRIORS[[0, 2]]))


def test_overlapping_boxes_of_different_classes_are_both_kept():
    (det,) = run([[0.1, 0.85, 0.05], [0.2, 0.05, 0.75], [0.6, 0.05, 0.35]], score_threshold=0.1)
    assert det.labels.tolist() == [0, 1, 1]
    assert torch.allclose(det.scores, torch.tensor([0.85, 0.75, 0.35]))
    assert torch.allclose(det.boxes, point_form(PRIORS))


def test_threshold_and_max_detections():
    probabilities = [[0.1, 0.85, 0.05], [0.2, 0.05, 0.75], [0.6, 0.05, 0.35]]
    (det,) = run(probabilities, score_threshold=0.5)
    assert torch.allclose(det.scores, torch.tensor([0.85, 0.75]))
    (det,) = run(probabilities, score_threshold=0.1, max_detections=1)
    assert det.labels.tolist() == [0] and torch.allclose(det.scores, torch.tensor([0.85]))
    # the low default threshold also keeps the 0.05 scores that no same-class box suppresses
    (det,) = run(probabilities)
    assert det.labels.tolist() == [0, 1, 1, 0]  # (0,c0) (1,c1) (2,c1) (2,c0)
    assert torch.allclose(det.scores, torch.tensor([0.85, 0.75, 0.35, 0.05]))  # (1,c0), (0,c1) suppressed


def test_boxes_are_scaled_to_pixels_and_clipped():
    priors = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.05, 0.95, 0.2, 0.2]])
    conf = torch.tensor([[[0.1, 0.9], [0.1, 0.8]]]).log()
    (det,) = detect(torch.zeros(1, 2, 4), conf, priors, image_sizes=[(100, 200)])  # height 100, width 200
    expected = torch.tensor([[40.0, 20.0, 80.0, 40.0], [0.0, 85.0, 30.0, 100.0]])
    assert torch.allclose(det.boxes, expected, atol=1e-4)


def test_empty_result():
    (det,) = run([[0.98, 0.01, 0.01], [0.98, 0.01, 0.01], [0.98, 0.01, 0.01]], score_threshold=0.5)
    assert det.boxes.shape == (0, 4) and det.scores.shape == (0,) and det.labels.shape == (0,)
    assert det.labels.dtype == torch.int64


def test_background_column_elsewhere():
    conf = torch.tensor([[[0.85, 0.05, 0.1], [0.05, 0.75, 0.2], [0.05, 0.35, 0.6]]]).log()
    (det,) = detect(torch.zeros(1, 3, 4), conf, PRIORS, score_threshold=0.3, bkg_label=2)
    assert det.labels.tolist() == [0, 1, 1]  # columns 0, 1 are object classes 0, 1


def reference_detect(loc, conf, priors, score_threshold, nms_iou, max_detections, size, top_k_per_class=None):
    """Obvious per-image, per-class loop with torchvision.ops.nms: ssd.pytorch's `Detect`, whose top-k per
    class comes before the threshold."""
    out = []
    for b in range(loc.shape[0]):
        boxes = decode(loc[b], priors).clamp(0, 1)
        probs = conf[b].softmax(-1)
        found = []
        for c in range(1, conf.shape[-1]):
            mask = probs[:, c] > score_threshold
            if top_k_per_class is not None:
                mask &= torch.zeros_like(mask).index_fill_(0, probs[:, c].topk(top_k_per_class).indices, True)
            for i in nms(boxes[mask], probs[mask, c], nms_iou).tolist():
                found.append((probs[mask, c][i].item(), c - 1, boxes[mask][i]))
        found.sort(key=lambda t: -t[0])
        found = found[:max_detections]
        out.append(
            (
                torch.stack([f[2] for f in found]) * size,
                torch.tensor([f[0] for f in found]),
                torch.tensor([f[1] for f in found]),
            )
        )
    return out


def test_matches_per_class_loop_reference():
    torch.manual_seed(0)
    priors = torch.cat([torch.rand(60, 2) * 0.6 + 0.2, torch.rand(60, 2) * 0.3 + 0.1], 1)
    loc, conf = torch.randn(2, 60, 4) * 0.5, torch.randn(2, 60, 4) * 2
    got = detect(
        loc, conf, priors, score_threshold=0.2, nms_iou=0.3, max_detections=15, image_sizes=[(50, 50)] * 2
    )
    expected = reference_detect(loc, conf, priors, 0.2, 0.3, 15, 50.0)
    for det, (boxes, scores, labels) in zip(got, expected, strict=True):
        assert len(det.scores) == 15
        assert torch.allclose(det.scores, scores)
        assert torch.equal(det.labels, labels)
        assert torch.allclose(det.boxes, boxes, atol=1e-4)


def test_the_batch_at_once_matches_the_per_image_reference_with_per_image_options():
    # enough candidates (> 1000) that batched_nms offsets each (image, class) group's boxes instead of looping
    torch.manual_seed(1)
    priors = torch.cat([torch.rand(300, 2) * 0.6 + 0.2, torch.rand(300, 2) * 0.3 + 0.1], 1)
    loc, conf = torch.randn(8, 300, 4) * 0.5, torch.randn(8, 300, 9) * 2
    thresholds, limits = [0.05, 0.2, 0.1, 0.3, 0.05, 0.15, 0.4, 0.01], [200, 15, 1, 50, 7, 100, 3, 200]
    sizes = [(50 + 10 * b, 80 - 5 * b) for b in range(8)]
    got = detect(loc, conf, priors, score_threshold=thresholds, nms_iou=0.3, max_detections=limits,
                 image_sizes=sizes, top_k_per_class=300)
    assert sum(len(d.scores) for d in got) > 300
    for b, det in enumerate(got):
        (height, width) = sizes[b]
        ((boxes, scores, labels),) = reference_detect(loc[b : b + 1], conf[b : b + 1], priors, thresholds[b], 0.3,
                                                      limits[b], torch.tensor([width, height, width, height]))
        assert torch.equal(det.labels, labels)
        assert torch.allclose(det.scores, scores)
        assert torch.allclose(det.boxes, boxes, atol=1e-4)


def test_crowded_classes_keep_their_top_k_as_the_per_class_top_k_then_threshold_reference():
    # top_k_per_class 12: the 0.05 images' classes have more candidates (only their best 12 enter NMS), the 0.4
    # and 0.6 images' fewer; classes of both kinds in one batch
    torch.manual_seed(2)
    priors = torch.cat([torch.rand(80, 2) * 0.6 + 0.2, torch.rand(80, 2) * 0.3 + 0.1], 1)
    loc, conf = torch.randn(4, 80, 4) * 0.5, torch.randn(4, 80, 5) * 2
    thresholds, sizes = [0.05, 0.4, 0.05, 0.6], [(60, 70)] * 4
    probs = conf.softmax(-1)[..., 1:]
    passing = (probs > torch.tensor(thresholds)[:, None, None]).sum(dim=1)  # [B, K]
    assert (passing > 12).any() and (passing <= 12).any()
    got = detect(loc, conf, priors, score_threshold=thresholds, nms_iou=0.3, max_detections=200, image_sizes=sizes,
                 top_k_per_class=12)
    for b, det in enumerate(got):
        ((boxes, scores, labels),) = reference_detect(loc[b : b + 1], conf[b : b + 1], priors, thresholds[b], 0.3, 200,
                                                      torch.tensor([70, 60, 70, 60]), top_k_per_class=12)
        assert torch.equal(det.labels, labels)
        assert torch.allclose(det.scores, scores)
        assert torch.allclose(det.boxes, boxes, atol=1e-4)


def test_equal_scores_come_in_prior_then_class_order():
    # four priors far apart; every kept pair scores 0.4, class 0 (three pairs above 0.25) crowded by top_k 2
    priors = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.8, 0.2, 0.1, 0.1], [0.2, 0.8, 0.1, 0.1], [0.8, 0.8, 0.1, 0.1]])
    probabilities = [[0.2, 0.4, 0.4], [0.5, 0.3, 0.2], [0.2, 0.4, 0.4], [0.8, 0.1, 0.1]]
    conf = torch.tensor(probabilities).log()[None]
    (det,) = detect(torch.zeros(1, 4, 4), conf, priors, score_threshold=0.25, top_k_per_class=2)
    assert det.labels.tolist() == [0, 1, 0, 1]
    assert torch.allclose(det.scores, torch.full((4,), 0.4))
    assert torch.allclose(det.boxes, point_form(priors[[0, 0, 2, 2]]))


def test_per_image_options_must_match_the_batch():
    with pytest.raises(ValueError, match="score_threshold has 2 entries for a batch of 1"):
        detect(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), PRIORS, score_threshold=[0.1, 0.2])
    with pytest.raises(ValueError, match=r"max_detections must be >= 1, got 0"):
        detect(torch.zeros(2, 3, 4), torch.zeros(2, 3, 2), PRIORS, max_detections=[3, 0])


def test_model_output_runs_through():
    model = build_model("ssd-small", 4).eval()
    with torch.no_grad():
        loc, conf, priors = model(torch.randn(2, 3, 256, 256))
    dets = detect(loc, conf, priors, image_sizes=[(480, 640), (100, 100)])
    assert len(dets) == 2
    for det, (height, width) in zip(dets, [(480, 640), (100, 100)], strict=True):
        assert 0 < len(det.scores) <= 100
        assert (
            (det.boxes[:, 2] <= width).all() and (det.boxes[:, 3] <= height).all() and (det.boxes >= 0).all()
        )
        assert ((det.labels >= 0) & (det.labels < 3)).all()


def test_detect_with_spec_decodes_with_the_specs_variances():
    model = build_model("ssd-small", 4).eval()
    spec = replace(model.spec, prior_config=replace(model.spec.prior_config, variance=(0.2, 0.3)))
    generator = torch.Generator().manual_seed(5)
    loc, conf = torch.randn(1, 6, 4, generator=generator), torch.randn(1, 6, 4, generator=generator)
    priors = torch.tensor([[0.2, 0.2, 0.2, 0.2], [0.5, 0.5, 0.3, 0.3], [0.8, 0.3, 0.2, 0.4]] * 2)
    (got,) = detect_with_spec(spec, loc, conf, priors, score_threshold=0.05)
    (want,) = detect(loc, conf, priors, variances=(0.2, 0.3), score_threshold=0.05)
    (default,) = detect(loc, conf, priors, score_threshold=0.05)
    assert len(got.boxes) > 0 and torch.equal(got.boxes, want.boxes) and torch.equal(got.scores, want.scores)
    assert not torch.equal(got.boxes, default.boxes)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_sizes": [(10, 10), (10, 10)]}, "image_sizes has 2 entries"),
        ({"image_sizes": [(0, 10)]}, r"image_sizes\[0\]"),
        ({"bkg_label": 3}, "bkg_label"),
        ({"score_threshold": 1.0}, "score_threshold"),
        ({"nms_iou": 0.0}, "nms_iou"),
        ({"max_detections": 0}, "max_detections"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run([[0.1, 0.85, 0.05], [0.2, 0.75, 0.05], [0.6, 0.05, 0.35]], **kwargs)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match="priors must have shape"):
        detect(torch.zeros(1, 3, 4), torch.zeros(1, 3, 2), PRIORS[:2])
    with pytest.raises(ValueError, match="conf must have shape"):
        detect(torch.zeros(1, 3, 4), torch.zeros(1, 2, 2), PRIORS)
