"""The LoRA layer and the functions that put it into a model, merge it and take it out again."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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

    `weight` and `bias` keep the names nn.Linear gives them, so a base checkpoint loads into an
    injected model and a merged state dict loads into a plain nn.Linear. Dropout touches the LoRA
    branch's input only, and only in train mode. Merging is explicit (`merge()`/`unmerge()`);
    `.train()` and `.eval()` never merge.

    Mixed precision: the frozen W0 may be stored in bf16 or fp16 (`set_base_dtype`) while A and B stay
    fp32, the dtype the optimizer updates. The low-rank branch casts its input to A's dtype, computes
    B A x there, and casts the update to the base output's dtype before the sum (under autocast, autocast
    picks the matmuls' dtype as usual). `merge()` computes scaling·B@A in fp32 and rounds once into W0's dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_lora_hyperparameters(r, alpha, dropout)
        if r > min(in_features, out_features):
            raise ValueError(
                f"LoRA rank r={r} exceeds this layer's smallest dimension ({out_features}x{in_features}): "
                "the update would not be low-rank; choose a smaller r."
            )
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while scaling·B·A is folded into `weight`
        self.disabled = False  # True inside `lora_disabled`: the layer is its base
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias, which it freezes."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            r,
            alpha,
            dropout,
            use_rslora,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.weight.requires_grad_(False)  # the base is frozen, as in a LoRALinear built from scratch
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        device = linear.weight.device
        layer.lora_A = nn.Parameter(torch.empty_like(layer.lora_A, device=device))  # (r, in)
        layer.lora_B = nn.Parameter(torch.empty_like(layer.lora_B, device=device))  # (out, r)
        layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        _lora_a_init_params(self.lora_A)
        _lora_b_init_params(self.lora_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this layer adds to its base: the only ones LoRA trains."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.merged or self.disabled:
            return result
        low_rank = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A)  # (..., r), in A's dtype
        return result + (self.scaling * F.linear(low_rank, self.lora_B)).to(result.dtype)  # (..., out)

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, (out, in), computed in fp32 whatever the parameters' dtype."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scaling·B·A into `weight` (idempotent). Afterwards the forward is the base matmul alone."""
        if self.merged:
            return
        merged = self.weight.float() + self.delta_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging this LoRA layer ({self.out_features}x{self.in_features}) gives non-finite weights; "
                "the adapter is damaged (NaN or inf in lora_A/lora_B) or overflows the weight dtype "
                f"{self.weight.dtype}: merge in float32 or retrain."
            )
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scaling·B·A from `weight` again (idempotent): the inverse of `merge`."""
        if not self.merged:
            return
        self.weight.copy_((self.weight.float() - self.delta_weight()).to(self.weight.dtype))
        self.merged = False

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"
        )


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


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by its module path."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def inject_lora(
    model: nn.Module,
    target_modules: Sequence[str] = ("q", "v"),
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    use_rslora: bool = False,
) -> list[str]:
    """Replace each nn.Linear whose last name component is in `target_modules` by a LoRALinear.

    Names are matched exactly, so "v" matches `SelfAttention.v` and never `relative_attention_bias`;
    a name that matches no linear layer is an error. Every other parameter of the model is frozen.
    Returns the replaced module paths.
    """
    check_lora_hyperparameters(r, alpha, dropout)
    if isinstance(target_modules, str):
        target_modules = (target_modules,)
    targets = set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name at least one module, e.g. ('q', 'v').")
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers: inject once, or build a fresh base model.")
    linear_names = {
        name: name.rsplit(".", 1)[-1] for name, module in model.named_modules() if type(module) is nn.Linear
    }
    unmatched = sorted(targets - set(linear_names.values()))
    if unmatched:  # e.g. "wi" on a gated T5, whose feed-forward layers are wi_0 and wi_1
        raise ValueError(
            f"target module(s) {unmatched} match no nn.Linear in the model; its linear layers are named "
            f"{', '.join(sorted(set(linear_names.values())))}."
        )
    replaced = [name for name, last in linear_names.items() if last in targets]
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [name for name in replaced if owners[id(model.get_submodule(name).weight)] > 1]
    if tied:  # e.g. lm_head tied to the input embeddings: merging would change the embeddings too
        raise ValueError(
            f"{tied[0]} shares its weight with another module (tied embeddings), so merging an update into it "
            "would change that module too; leave it out of target_modules, or untie it first."
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in replaced:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child_name)
        layer = LoRALinear.from_linear(linear, r, alpha, dropout, use_rslora)
        layer.train(linear.training)  # the mode of the model it joins: no dropout in an eval-mode model
        setattr(parent, child_name, layer)
    return replaced


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer of `model` into its base weight (idempotent)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (idempotent)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model behaves as its base model; on exit (exceptions included) it is restored.

    A merged layer is unmerged for the block and merged again on exit, so its weight afterwards
    equals the merged weight up to float rounding.
    """
    layers = lora_layers(model).values()
    saved = [(layer, layer.disabled, layer.merged) for layer in layers]
    try:
        for layer in layers:
            layer.unmerge()
            layer.disabled = True
        yield model
    finally:
        for layer, was_disabled, was_merged in saved:
            layer.disabled = was_disabled
            if was_merged:
                layer.merge()


@torch.no_grad()
def set_base_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Store every frozen parameter (the base model) in `dtype`; the trainable ones (A, B) keep theirs."""
    for param in model.parameters():
        if not param.requires_grad:
            param.data = param.data.to(dtype)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every adapter folded into its base weight and no lora_A/lora_B keys:
    what a plain copy of the base model (or a plain nn.Linear, given a LoRALinear) loads with strict=True.

    The model itself is left as it is; ΔW is computed in fp32 and rounded once into the weight's dtype.
    """
    layers = lora_layers(model) if not isinstance(model, LoRALinear) else {"": model}
    state = model.state_dict()
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        del state[f"{prefix}lora_A"], state[f"{prefix}lora_B"]
        if not layer.merged:
            state[f"{prefix}weight"] = (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype)
    return state


def lora_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float | None = None) -> list[dict]:
    """Optimizer parameter groups of the model's adapter parameters, from the layers' own adapter_params().

    One group at `lr` (A and B of each layer in turn); with LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low
    Rank Adaptation of Large Models") two: every A at `lr`, every B at `lr * loraplus_lr_ratio`, since B,
    starting at zero, learns better with a larger step (the paper suggests a ratio of 16).
    """
    layers = lora_layers(model).values()
    if loraplus_lr_ratio is None:
        return [{"params": [p for layer in layers for p in layer.adapter_params().values()], "lr": lr}]
    return [
        {"params": [layer.adapter_params()["lora_A"] for layer in layers], "lr": lr},
        {"params": [layer.adapter_params()["lora_B"] for layer in layers], "lr": lr * loraplus_lr_ratio},
    ]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
