"""The conf loss's passes (ssd_core.loss.selected_cross_entropy) against plain log_softmax / cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssd_core.loss import selected_cross_entropy
from ssd_core.loss.selected_cross_entropy import SelectedCrossEntropy, background_log_prob


@pytest.mark.parametrize("with_bias", [False, True])
def test_background_log_prob_equals_log_softmax_across_blocks(monkeypatch, with_bias):
    generator = torch.Generator().manual_seed(0)
    conf = torch.randn(3, 50, 5, generator=generator)  # [B, P, C]
    bias = None
    if with_bias:
        bias = torch.zeros(3, 5)
        bias[1, 2:] = float("-inf")  # image 1 uses background and class column 1 only
    monkeypatch.setattr(selected_cross_entropy, "_ELEMENTS_PER_BLOCK", 35)  # 7 rows a block: blocks cut images
    expected = F.log_softmax(conf + (0 if bias is None else bias[:, None, :]), dim=-1)[..., 0]  # [B, P]
    torch.testing.assert_close(background_log_prob(conf, 0, bias), expected)


@pytest.fixture
def torch_threads():
    """Sets torch's intra-op threads for one test (`background_log_prob` takes another path with one)."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_background_log_prob_of_extreme_and_non_finite_logits_equals_log_softmax(
    monkeypatch, torch_threads, threads, dtype
):
    torch_threads(threads)
    generator = torch.Generator().manual_seed(3)
    conf = (torch.randn(2, 40, 6, generator=generator) * 4).to(dtype)  # [B, P, C]
    conf[0, 0] += 800  # exp overflows in float32 and float64
    conf[0, 1] -= 800  # every exp underflows
    conf[0, 2, 3] = float("inf")
    conf[0, 3, 0] = float("nan")
    conf[0, 4] = float("-inf")
    conf[0, 5, 1:] = float("-inf")  # only the background is possible: log-probability 0
    conf[1, 7, 2] = 80.0  # a large but finite exp in float32
    monkeypatch.setattr(selected_cross_entropy, "_ELEMENTS_PER_BLOCK", 48)  # 8 rows a block
    for label in (0, 5):
        expected = F.log_softmax(conf, dim=-1)[..., label]  # [B, P]
        result = background_log_prob(conf, label)
        assert result.dtype == dtype and result.shape == (2, 40)
        torch.testing.assert_close(result, expected, equal_nan=True)
    assert background_log_prob(conf[:, :0], 0).shape == (2, 0)


def test_selected_cross_entropy_equals_cross_entropy_on_the_selected_rows():
    generator = torch.Generator().manual_seed(1)
    conf = torch.randn(2, 6, 4, dtype=torch.float64, generator=generator, requires_grad=True)
    row = torch.tensor([0, 3, 7, 11])  # rows of the flattened [B * P, C]
    target = torch.tensor([1, 0, 3, 2])
    loss = SelectedCrossEntropy.apply(conf, row, target, None)  # [K]
    reference = F.cross_entropy(conf.reshape(-1, 4)[row], target, reduction="none")
    torch.testing.assert_close(loss, reference)
    (grad,) = torch.autograd.grad(loss.sum(), conf)
    (reference_grad,) = torch.autograd.grad(reference.sum(), conf)
    torch.testing.assert_close(grad, reference_grad)
    assert grad.reshape(-1, 4)[[1, 2, 4, 5, 6, 8, 9, 10]].abs().sum() == 0  # unselected rows untouched


def test_selected_cross_entropy_gradcheck_with_a_row_bias():
    generator = torch.Generator().manual_seed(2)
    conf = torch.randn(1, 5, 3, dtype=torch.float64, generator=generator, requires_grad=True)
    row, target = torch.tensor([0, 2, 4]), torch.tensor([0, 2, 0])
    row_bias = torch.zeros(3, 3, dtype=torch.float64)
    row_bias[0, 1] = float("-inf")  # a class the image did not declare
    assert torch.autograd.gradcheck(lambda c: SelectedCrossEntropy.apply(c, row, target, row_bias), (conf,))


def test_selected_cross_entropy_of_no_rows_is_empty():
    conf = torch.randn(1, 4, 3, requires_grad=True)
    loss = SelectedCrossEntropy.apply(conf, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), None)
    assert loss.shape == (0,)
    loss.sum().backward()
    assert torch.equal(conf.grad, torch.zeros_like(conf))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])  # calloc + numpy, and torch
def test_a_large_gradient_is_zero_off_the_selected_rows_and_accumulates(dtype):
    # 48 MB in float32: past glibc's largest mmap threshold (32 MB), so d conf lies on freshly mapped pages
    conf = torch.randn(2, 60_000, 100, dtype=dtype, requires_grad=True)
    row = torch.tensor([5, 70_000, 119_999])
    target = torch.tensor([0, 42, 99])
    for _ in range(2):  # the second backward adds into conf.grad, the first one's tensor
        SelectedCrossEntropy.apply(conf, row, target, None).sum().backward()
    assert conf.grad.dtype == dtype and conf.grad.shape == conf.shape
    rows = conf.detach().reshape(-1, 100)[row].double()
    expected = (2 * (rows.softmax(dim=-1) - F.one_hot(target, 100).double())).to(dtype)  # [3, 100]
    # bfloat16's log_softmax then exp errs by up to 2% of a probability, past its default relative tolerance
    tolerance = {"atol": 2e-2, "rtol": 0} if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(conf.grad.reshape(-1, 100)[row], expected, **tolerance)
    untouched = torch.ones(len(conf.grad.reshape(-1, 100)), dtype=torch.bool)
    untouched[row] = False
    assert conf.grad.reshape(-1, 100)[untouched].count_nonzero() == 0
