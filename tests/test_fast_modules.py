"""support/fast_modules.py: the faster dropout, linear and GELU compute the same functions as T5's own."""

import math

import torch
from conftest import logits, toy_t5
from torch import nn

from support.fast_modules import Dropout, Linear, use_fast_modules


def test_dropout_keeps_each_element_with_probability_1_minus_p_scaled_and_independent():
    torch.manual_seed(0)
    p, n = 0.1, 1_000_000
    dropout = Dropout(p).train()
    x = torch.ones(n, requires_grad=True)
    y = dropout(x)
    kept = y != 0
    # Binomial(n, 1 - p): 5 standard deviations either side.
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))
    y.backward(torch.full_like(y, 2.0))
    assert torch.equal(x.grad, kept * (2.0 / (1 - p)))  # the gradient goes through the kept elements only
    second = dropout(torch.ones(n)) != 0  # the next call draws a new mask, independent of the first
    both = (kept & second).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n)
    assert torch.equal(dropout.eval()(x), x)


def test_dropout_masks_follow_torchs_seed():
    dropout = Dropout(0.3).train()
    torch.manual_seed(5)
    first = dropout(torch.ones(4, 33))
    torch.manual_seed(5)
    assert torch.equal(dropout(torch.ones(4, 33)), first)  # odd sizes too: the last 32-bit half is unused


def test_fast_modules_compute_what_t5s_modules_compute(t5_batch):
    model, fast = toy_t5(dropout_rate=0.1), toy_t5(dropout_rate=0.1)  # gated-gelu, as flan-t5
    assert use_fast_modules(fast) > 0
    assert not any(type(m) is nn.Dropout for m in fast.modules())
    assert any(isinstance(m, nn.GELU) for m in fast.modules())
    assert not any(type(m) is nn.Linear for m in fast.modules()) and isinstance(fast.lm_head, Linear)
    tied = model.lm_head.weight is model.shared.weight
    assert (fast.lm_head.weight is fast.shared.weight) == tied  # the swap keeps the Parameters, so the tie
    model.eval(), fast.eval()  # dropout off: the GELU alone differs, by rounding
    torch.testing.assert_close(logits(fast, t5_batch), logits(model, t5_batch), rtol=1e-6, atol=1e-6)
    for m in (model, fast):
        m(**t5_batch).loss.backward()
    for (name, ours), (_, theirs) in zip(fast.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-5, atol=1e-6, msg=name)
