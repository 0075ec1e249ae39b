"""The LoRA layer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a frozen
nn.Linear plus a trainable low-rank update, and its merge and unmerge."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _lora_a_init_params(lora_A: torch.Tensor) -> None:
    """Kaiming-uniform with a=sqrt(5), the default of nn.Linear, as in the LoRA paper's code and PEFT."""
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))


def _lora_b_init_params(lora_B: torch.Tensor) -> None:
    """Zeros, so B·A = 0 and an injected model computes exactly what its base computes at step 0."""
    nn.init.zeros_(lora_B)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

        h = W0 x + b + scaling · B A dropout(x),   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

    Shapes: x (..., in_features); W0 `weight` (out_features, in_features), frozen;
    A `lora_A` (r, in_features); B `lora_B` (out_features, r); h (..., out_features).

    `weight` and `bias` keep nn.Linear's names, so a base checkpoint loads into an injected model and a
    merged state dict into a plain nn.Linear. Dropout touches the LoRA branch's input only, in train mode.
    Merging is explicit (`merge()`/`unmerge()`); `.train()` and `.eval()` never merge. W0 may be bf16
    (`set_base_dtype`) while A and B stay fp32: the branch computes in A's dtype, then casts.
    """

    lora_layer = True  # what lora_layers() finds
    base_product = staticmethod(F.linear)  # W0 x + b; an NF4 base (lora/nf4.py) or a faster one may replace it

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, bias: bool = False, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        check_adapter_shape(in_features, out_features, r, alpha, dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while the update is folded into `weight`
        self.disabled = False  # True while the layer is its base alone (`lora_disabled`)
        self.init = "lora"  # how A and B were initialised: "lora", or PiSSA's "pissa" / "pissa_niter_N"
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        """Wrap `linear`, sharing (not copying) its weight and bias, frozen; A and B are fp32 over a bf16 weight."""
        layer = cls(linear.in_features, linear.out_features, r, alpha, dropout, use_rslora,
                    bias=linear.bias is not None, device="meta", dtype=linear.weight.dtype)  # fmt: skip
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.requires_grad_(False)  # the base is frozen; A and B, allocated next, are trained
        dtype = torch.float32 if linear.weight.dtype in (torch.bfloat16, torch.float16) else linear.weight.dtype
        for name, param in layer.adapter_params().items():  # built on "meta": allocate them beside the weight
            setattr(layer, name, nn.Parameter(torch.empty_like(param, device=linear.weight.device, dtype=dtype)))
        layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        _lora_a_init_params(self.lora_A)
        _lora_b_init_params(self.lora_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this layer adds to its base: the only ones LoRA trains."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_product(x, self.weight, self.bias)  # (..., out)
        if self.merged or self.disabled:
            return result
        return result + self.lora_update(x).to(result.dtype)

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """scaling · B A dropout(x), (..., out), in A's dtype."""
        low_rank = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return self.scaling * F.linear(low_rank, self.lora_B)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, (out, in), computed in fp32 whatever the parameters' dtype."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self) -> torch.Tensor:
        """W0 + scaling·B@A, (out, in), in fp32: the one weight that computes this layer's output."""
        return self.weight.float() + self.delta_weight()

    def unmerged_weight(self) -> torch.Tensor:
        """W0 again from a merged `weight`, in fp32: the inverse of `merged_weight` (DoRA's differs)."""
        return self.weight.float() - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (idempotent), rounding once into its dtype. Afterwards the forward
        is the base product alone."""
        if self.merged:
            return
        merged = self.merged_weight()
        check_finite_merge(merged, self.weight.dtype)
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of `weight` again (idempotent): the inverse of `merge`."""
        if self.merged:
            self.weight.copy_(self.unmerged_weight().to(self.weight.dtype))
            self.merged = False

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


MAX_RANK = 65536  # beyond any layer of any T5: a larger r is a typo, and would try to allocate r x in
MAX_ALPHA = 1e6  # alpha / r scales the update; past this, merged weights overflow fp16 and bf16


def check_lora_hyperparameters(r: int, alpha: float, dropout: float = 0.0) -> None:
    """The one check of LoRA's hyperparameters, for the layer, the command line and adapter files alike."""
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_RANK:
        raise ValueError(f"LoRA rank r must be a positive integer up to {MAX_RANK}, got {r!r}.")
    if not _is_number(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"LoRA alpha must be a positive number up to {MAX_ALPHA:g}, got {alpha!r}.")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_adapter_shape(in_features: int, out_features: int, r: int, alpha: float, dropout: float) -> None:
    """The hyperparameters, and a rank that stays below the layer's smallest dimension."""
    check_lora_hyperparameters(r, alpha, dropout)
    if r > min(in_features, out_features):
        raise ValueError(
            f"LoRA rank r={r} exceeds this layer's smallest dimension ({out_features}x{in_features}): "
            "the update would not be low-rank; choose a smaller r."
        )


def check_finite_merge(merged: torch.Tensor, dtype: torch.dtype) -> None:
    """A merge that would write NaN or inf into the base weight is refused."""
    if not torch.isfinite(merged).all():
        raise ValueError(
            f"merging this LoRA layer ({merged.shape[0]}x{merged.shape[1]}) gives non-finite weights; the adapter "
            f"is damaged (NaN or inf in its parameters) or overflows the weight dtype {dtype}: merge in float32 or "
            "retrain."
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
