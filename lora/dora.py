"""DoRA: LoRA that trains the direction and the magnitude of each weight row apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRALinear


def row_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖_c of the DoRA paper: the L2 norm of each output row, (out, in) -> (out,)."""
    return torch.linalg.vector_norm(weight, dim=1)


class DoRALinear(LoRALinear):
    """Weight-decomposed LoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"):

        h = m ⊙ (W0 + s·B A) x / ‖W0 + s·B A‖_c + b,    s = scaling, ‖·‖_c = per-output-row L2 norm

    Shapes: as LoRALinear, plus the magnitude m `lora_magnitude` (out_features,), trained, which starts at
    ‖W0 + s·B A‖_c (= ‖W0‖_c while B = 0), so the layer computes its base at step 0.

    The norm is a constant in the backward pass (detached, the paper's Section 4.3, as PEFT): it saves
    holding an (out, in) matrix for autograd. The forward is written, as PEFT's, as the base output plus
    a correction, so that W0 x is computed once:

        h = W0 x + b + (m/n - 1) ⊙ W0 x' + (m/n) ⊙ s·B A x',    n = ‖W0 + s·B A‖_c,  x' = dropout(x)

    With dropout off (or in eval mode) x' = x and this is the formula above. With dropout on, W0 x
    keeps the whole input and only the correction sees the dropped one: that is PEFT's choice, which
    the paper does not specify; it is kept here so that the two train alike.
    The norm and the scale m/n are computed in fp32 from W0 whatever its storage dtype.
    """

    def __init__(self, in_features: int, out_features: int, *args, **kwargs) -> None:
        super().__init__(in_features, out_features, *args, **kwargs)
        weight = self.weight
        self.lora_magnitude = nn.Parameter(torch.empty(out_features, device=weight.device, dtype=weight.dtype))
        self.norm_at_merge = None  # n while merged: unmerging needs it, and the merged weight alone cannot give it
        self.reset_magnitude()

    def reset_lora_parameters(self) -> None:
        super().reset_lora_parameters()
        if hasattr(self, "lora_magnitude"):  # not yet while LoRALinear.__init__ runs
            self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m = ‖W0 + s·B A‖_c: the layer then computes W0 + s·B A (after a PiSSA init, that is the original W0)."""
        self.lora_magnitude.copy_(self.weight_norm())

    def weight_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·B A‖_c, (out,), fp32, from the unmerged weight."""
        return row_norm(self.weight.float() + self.delta_weight())

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {**super().adapter_params(), "lora_magnitude": self.lora_magnitude}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_product(x, self.weight, self.bias)  # (..., out)
        if self.merged or self.disabled:
            return result
        dropped = self.dropout(x)
        with torch.no_grad():  # a constant for autograd (DoRA, Section 4.3)
            norm = self.weight_norm()  # (out,)
        scale = self.lora_magnitude / norm  # (out,) m / n
        if isinstance(self.dropout, nn.Identity) or not self.training:  # W0 x' = W0 x: reuse it
            base = result if self.bias is None else result - self.bias  # (..., out)
        else:
            base = self.base_product(dropped, self.weight, None)  # (..., out)
        low_rank = F.linear(F.linear(dropped.to(self.lora_A.dtype), self.lora_A), self.lora_B)  # (..., out)
        return result + ((scale - 1) * base + scale * low_rank * self.scaling).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """m / ‖W0 + s·B A‖_c ⊙ (W0 + s·B A), (out, in), fp32."""
        directed = super().merged_weight()  # W0 + s·B A
        return (self.lora_magnitude.float() / row_norm(directed)).unsqueeze(1) * directed

    def unmerged_weight(self) -> torch.Tensor:
        """W0 = W · n / m - s·B A, with the n recorded at merge time."""
        factor = self.norm_at_merge / self.lora_magnitude.float()  # (out,)
        return self.weight.float() * factor.unsqueeze(1) - self.delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.norm_at_merge = self.weight_norm()
        super().merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self.norm_at_merge = None
