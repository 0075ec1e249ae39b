"""Faster stand-ins for three of T5's training-time modules, computing the same functions.

`use_fast_modules(model)` (train.py calls it once the adapter is injected) swaps, in place:

- every `nn.Dropout` (T5's own, rate 0.1 in every layer, and LoRA's) for `Dropout`: the same
  distribution (each element kept with probability 1 - p, independently, and scaled by 1 / (1 - p)),
  but on the CPU its masks come from NumPy's PCG64 instead of torch's bernoulli_ (mt19937, one
  draw per element, the step's third most expensive operator). Each call seeds PCG64 from torch's
  generator, so --seed, --resume and activation checkpointing's replay still fix every mask; the
  random stream is not the one nn.Dropout draws. On a GPU it is F.dropout (Philox, already fast).
- every plain `nn.Linear` (k, o, the feed-forward's, lm_head) for `Linear`, whose product is
  `frozen_linear`: F.linear, except for a frozen bf16 weight on a CPU without bf16 matrix instructions,
  where PyTorch's bf16 GEMM is many times slower than computing the same product in fp32 and rounding once.
  The same Parameters, so ties are kept. The LoRA layers' base product becomes `frozen_linear` too.
- (`lm_head_on`, which train.py's loss uses) the LM head and the softmax on the labelled positions only:
  a padded position would cost a projection onto the whole vocabulary (32,128 words), then be ignored.
- transformers' `NewGELUActivation` (flan-t5's gated-GELU, the tanh approximation written as six
  elementwise operations) for `nn.GELU(approximate="tanh")`: the same formula in one kernel (outputs
  within 3e-7 of each other in fp32).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation

from lora import lora_layers
from lora.nf4 import NF4Weight


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN runs bf16 matrix products natively here (AVX-512 or AMX); False on AVX2-only CPUs.
    Asked of the CPU once, when first needed."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query: the fp32 path below is right anywhere
        return False


class _Bf16LinearInFp32(torch.autograd.Function):
    """y = x W^T + b for bf16 x and a frozen bf16 W, each product computed in fp32 and rounded once to bf16:
    the values a bf16 GEMM with fp32 accumulation gives. Saves only W (a parameter: nothing new is kept);
    the fp32 copies live for the one product."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out) -> (..., in); W and b are frozen: no gradient of theirs
        (weight,) = ctx.saved_tensors
        grad_x = (grad.float() @ weight.float()).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a frozen base weight. The one exception: bf16 on a CPU without bf16 matrix instructions
    (AVX2 ones), where PyTorch's bf16 GEMM is many times slower than fp32's, the input's gradient most of
    all: there the product is computed in fp32 of the same bf16 values and rounded once, as above. Memory
    stays that of a bf16 base."""
    if (
        weight.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not weight.requires_grad
        and not cpu_has_bf16_matmul()
    ):
        return _Bf16LinearInFp32.apply(x, weight, bias)
    return F.linear(x, weight, bias)


class Dropout(nn.Dropout):
    """nn.Dropout whose CPU masks come from NumPy's PCG64 (faster than torch's bernoulli_), seeded from torch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        seed = int(torch.randint(2**62, ()))  # from torch's generator: --seed and saved RNG states fix it
        words = np.random.PCG64(seed).random_raw((x.numel() + 1) // 2)  # 64 random bits each
        bits = words.view(np.uint32)[: x.numel()]  # two 32-bit draws per word
        kept = torch.from_numpy(bits >= round(self.p * 2**32)).view(x.shape)  # P(kept) = 1 - p, within 2^-33
        return (x * kept).mul_(1 / (1 - self.p))  # autograd keeps the 1-byte mask, as nn.Dropout does


class Linear(nn.Linear):
    """nn.Linear whose product is frozen_linear: fast for a frozen bf16 weight on an AVX2 CPU too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return frozen_linear(x, self.weight, self.bias)

    @classmethod
    def sharing(cls, linear: nn.Linear) -> Linear:
        """A Linear holding `linear`'s own weight and bias (the same Parameters: a tie stays a tie)."""
        fast = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        fast.weight, fast.bias = linear.weight, linear.bias
        return fast.train(linear.training)


def use_fast_modules(model: nn.Module) -> int:
    """Swap the model's dropout, linear and tanh-GELU modules for the faster ones above; return how many."""
    swapped = 0
    for layer in lora_layers(model).values():
        if not isinstance(layer.weight, NF4Weight):  # a 4-bit base keeps its own product
            layer.base_product = frozen_linear
            swapped += 1
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, Dropout(child.p, child.inplace).train(child.training))
            elif type(child) is nn.Linear:
                setattr(parent, name, Linear.sharing(child))
            elif type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
            else:
                continue
            swapped += 1
    return swapped


@contextmanager
def lm_head_on(model, positions: torch.Tensor):
    """Inside the block, the model's LM head projects only the decoder states at `positions` ((B, T), bool),
    so the model returns (N, V) logits for the N positions that are True."""
    t5 = getattr(model, "_orig_mod", model)  # inside torch.compile's wrapper
    t5 = getattr(t5, "module", t5)  # inside DistributedDataParallel's
    handle = t5.lm_head.register_forward_pre_hook(lambda head, args: (args[0][positions],))
    try:
        yield
    finally:
        handle.remove()
