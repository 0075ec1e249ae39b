"""The layer of several adapters (lora/adapters.py): one frozen nn.Linear and named LoRA adapters beside
each other, every one alike, the forward adding the active one's update."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layer import LoRALinear, _lora_a_init_params, check_adapter_shape, check_finite_merge, lora_scaling


class LowRank(nn.Module):
    """One named adapter of a MultiLoRALinear: A (r, in), B (out, r), its scaling and dropout; initialised as
    LoRA (A kaiming-uniform, B zero)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool,
                 device=None) -> None:  # fmt: skip
        super().__init__()
        check_adapter_shape(in_features, out_features, r, alpha, dropout)
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, "lora"
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _lora_a_init_params(self.lora_A)

    @classmethod
    def of(cls, layer: LoRALinear) -> LowRank:
        """The adapter a single-adapter LoRALinear holds, as a LowRank sharing its parameters."""
        adapter = cls(layer.in_features, layer.out_features, layer.r, layer.alpha, 0.0, layer.use_rslora, "meta")
        adapter.lora_A, adapter.lora_B, adapter.dropout = layer.lora_A, layer.lora_B, layer.dropout
        adapter.init = layer.init
        return adapter.train(layer.training)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """scaling · B A dropout(x), (..., out), in A's dtype: LoRALinear's update."""
        low_rank = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r)
        return self.scaling * F.linear(low_rank, self.lora_B)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, (out, in), in fp32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


class MultiLoRALinear(nn.Module):
    """A frozen linear layer with several named LoRA adapters; the forward adds the active one's update.

        h = W0 x + b + scaling_a · B_a A_a dropout_a(x)   for the active adapter a (none: h = W0 x + b)

    `adapters` maps each name to its LowRank (state-dict keys `adapters.NAME.lora_A`); every adapter is
    alike, so adding or deleting one never moves another. Merging folds the active adapter into `weight`.
    """

    lora_layer = True  # what lora_layers() finds
    # W0 x + b, as in LoRALinear (support/fast_modules.py may give a layer a faster product of the same values).
    base_product = staticmethod(F.linear)

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight, self.bias = weight, bias  # the base's own Parameters, frozen
        self.adapters = nn.ModuleDict()
        self.active: str | None = None  # whose update the forward adds
        self.merged_name: str | None = None  # whose update is folded into `weight`, while merged
        self.disabled = False  # True while the layer is its base alone (`lora_disabled`)

    @classmethod
    def of(cls, layer: nn.Module, name: str) -> MultiLoRALinear:
        """A plain nn.Linear (no adapter yet) or a single-adapter LoRALinear, whose adapter is called `name`."""
        multi = cls(layer.weight, layer.bias).train(layer.training)
        if isinstance(layer, LoRALinear):
            multi.adapters[name] = LowRank.of(layer)
            multi.active = None if layer.disabled else name  # a disabled single adapter: none is active
        if "base_product" in vars(layer):  # a faster product given by support/fast_modules.py
            multi.base_product = layer.base_product
        return multi

    @property
    def merged(self) -> bool:
        return self.merged_name is not None

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """Every adapter's A and B, by their state-dict names within this layer."""
        return {
            f"adapters.{name}.{key}": param
            for name, adapter in self.adapters.items()
            for key, param in adapter.adapter_params().items()
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_product(x, self.weight, self.bias)  # (..., out)
        if self.merged or self.disabled or self.active not in self.adapters:
            return result
        return result + self.adapters[self.active].lora_update(x).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        """W0 + the active adapter's scaling·B@A, in fp32 (W0 alone if it does not adapt this layer)."""
        if self.active not in self.adapters:
            return self.weight.float()
        return self.weight.float() + self.adapters[self.active].delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the active adapter's update into `weight` (idempotent; nothing to do if it is not here)."""
        if self.merged or self.active not in self.adapters:
            return
        merged = self.merged_weight()
        check_finite_merge(merged, self.weight.dtype)
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged_name = self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """The inverse of `merge` (idempotent)."""
        if self.merged:
            unmerged = self.weight.float() - self.adapters[self.merged_name].delta_weight()
            self.weight.copy_(unmerged.to(self.weight.dtype))
            self.merged_name = None
