"""ssd.pytorch's MultiBoxLoss, transcribed per image as the slow reference.

Plain transcription of ../shared/seed/MultiBoxLoss.md with its helpers (point_form, jaccard, encode,
log_sum_exp from ssd.pytorch's box_utils), modernised only where old torch APIs are gone
(`Variable`, `size_average=False` -> `reduction="sum"`). Deliberate fixes:
  * loss_c is reshaped to [B, P] before zeroing the positives (the known ssd.pytorch bug);
  * an image without truths gets conf_t = 0 everywhere (ssd.pytorch crashes on max over 0 truths);
  * tensors are created on the inputs' device and dtype instead of `torch.Tensor`/`.cuda()`.
Used by the parity tests and by benchmarks/bench_loss.py. Deliberately independent of ssd_core.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def point_form(boxes):
    return torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)


def intersect(box_a, box_b):
    A, B = box_a.size(0), box_b.size(0)
    max_xy = torch.min(box_a[:, 2:].unsqueeze(1).expand(A, B, 2), box_b[:, 2:].unsqueeze(0).expand(A, B, 2))
    min_xy = torch.max(box_a[:, :2].unsqueeze(1).expand(A, B, 2), box_b[:, :2].unsqueeze(0).expand(A, B, 2))
    inter = torch.clamp(max_xy - min_xy, min=0)
    return inter[:, :, 0] * inter[:, :, 1]


def jaccard(box_a, box_b):
    inter = intersect(box_a, box_b)
    area_a = ((box_a[:, 2] - box_a[:, 0]) * (box_a[:, 3] - box_a[:, 1])).unsqueeze(1).expand_as(inter)
    area_b = ((box_b[:, 2] - box_b[:, 0]) * (box_b[:, 3] - box_b[:, 1])).unsqueeze(0).expand_as(inter)
    union = area_a + area_b - inter
    return inter / union


def encode(matched, priors, variances):
    g_cxcy = (matched[:, :2] + matched[:, 2:]) / 2 - priors[:, :2]
    g_cxcy /= variances[0] * priors[:, 2:]
    g_wh = (matched[:, 2:] - matched[:, :2]) / priors[:, 2:]
    g_wh = torch.log(g_wh) / variances[1]
    return torch.cat([g_cxcy, g_wh], 1)


def match(threshold, truths, priors, variances, labels, loc_t, conf_t, idx):
    overlaps = jaccard(truths, point_form(priors))
    best_prior_overlap, best_prior_idx = overlaps.max(1, keepdim=True)
    best_truth_overlap, best_truth_idx = overlaps.max(0, keepdim=True)
    best_truth_idx.squeeze_(0)
    best_truth_overlap.squeeze_(0)
    best_prior_idx.squeeze_(1)
    best_prior_overlap.squeeze_(1)
    best_truth_overlap.index_fill_(0, best_prior_idx, 2)
    for j in range(best_prior_idx.size(0)):
        best_truth_idx[best_prior_idx[j]] = j
    matches = truths[best_truth_idx]
    conf = labels[best_truth_idx] + 1
    conf[best_truth_overlap < threshold] = 0
    loc_t[idx] = encode(matches, priors, variances)
    conf_t[idx] = conf


def log_sum_exp(x):
    x_max = x.data.max()
    return torch.log(torch.sum(torch.exp(x - x_max), 1, keepdim=True)) + x_max


def ssd_pytorch_multibox_loss(loc_data, conf_data, priors, targets, num_classes, threshold=0.5, negpos_ratio=3,
                              variance=(0.1, 0.2)):
    """ssd.pytorch's forward with its default arguments; targets: list of B Tensor[n_i, 5]."""
    num = loc_data.size(0)
    priors = priors[: loc_data.size(1), :]
    num_priors = priors.size(0)
    loc_t = torch.zeros(num, num_priors, 4, dtype=loc_data.dtype, device=loc_data.device)
    conf_t = torch.zeros(num, num_priors, dtype=torch.long, device=loc_data.device)
    for idx in range(num):
        if len(targets[idx]) == 0:
            continue
        truths = targets[idx][:, :-1].data
        labels = targets[idx][:, -1].data.long()
        match(threshold, truths, priors.data, variance, labels, loc_t, conf_t, idx)

    pos = conf_t > 0
    pos_idx = pos.unsqueeze(pos.dim()).expand_as(loc_data)
    loc_p = loc_data[pos_idx].view(-1, 4)
    loc_t = loc_t[pos_idx].view(-1, 4)
    loss_l = F.smooth_l1_loss(loc_p, loc_t, reduction="sum")

    batch_conf = conf_data.view(-1, num_classes)
    loss_c = log_sum_exp(batch_conf) - batch_conf.gather(1, conf_t.view(-1, 1))
    loss_c = loss_c.view(num, -1)  # the fix: reshape before zeroing the positives
    loss_c[pos] = 0
    _, loss_idx = loss_c.sort(1, descending=True)
    _, idx_rank = loss_idx.sort(1)
    num_pos = pos.long().sum(1, keepdim=True)
    num_neg = torch.clamp(negpos_ratio * num_pos, max=pos.size(1) - 1)
    neg = idx_rank < num_neg.expand_as(idx_rank)

    pos_idx = pos.unsqueeze(2).expand_as(conf_data)
    neg_idx = neg.unsqueeze(2).expand_as(conf_data)
    conf_p = conf_data[(pos_idx + neg_idx).gt(0)].view(-1, num_classes)
    targets_weighted = conf_t[(pos + neg).gt(0)]
    loss_c = F.cross_entropy(conf_p, targets_weighted, reduction="sum")

    N = num_pos.data.sum()
    loss_l /= N
    loss_c /= N
    return loss_l, loss_c
