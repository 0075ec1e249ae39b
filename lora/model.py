"""Putting LoRA into a model and taking it out: inject, merge, disable, optimizer groups, counts."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .dora import DoRALinear
from .layer import LoRALinear, check_lora_hyperparameters
from .pissa import pissa_init, pissa_niter


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every LoRA layer in `model`, by its module path: the modules whose class sets `lora_layer = True`
    (LoRALinear and its DoRA variant; lora.multi_layer's layer of several adapters). Each has `weight`,
    `bias`, `adapter_params()`, `merge()`, `unmerge()`, `merged` and `disabled`."""
    return {name: module for name, module in model.named_modules() if getattr(type(module), "lora_layer", False)}


def inject_lora(
    model: nn.Module,
    target_modules: Sequence[str] = ("q", "v"),
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.05,
    use_rslora: bool = False,
    use_dora: bool = False,
    init: str = "lora",
) -> list[str]:
    """Replace each nn.Linear whose last name component is in `target_modules` by a LoRALinear
    (a DoRALinear with `use_dora`), initialised as LoRA does (B = 0) or, with init="pissa" or
    "pissa_niter_N", from W0's principal singular vectors (see `pissa_init`).

    Names are matched exactly, so "v" matches `SelfAttention.v` and never `relative_attention_bias`;
    a name that matches no linear layer is an error. Every other parameter of the model is frozen.
    Returns the replaced module paths.
    """
    check_lora_hyperparameters(r, alpha, dropout)
    if init != "lora":
        pissa_niter(init)  # refuses an unknown init before the model is touched
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
        layer = (DoRALinear if use_dora else LoRALinear).from_linear(linear, r, alpha, dropout, use_rslora)
        if init != "lora":
            pissa_init(layer, init)
            if use_dora:
                layer.reset_magnitude()  # m = ‖W_res + s·B A‖_c = ‖W0‖_c
        layer.train(linear.training)  # the mode of the model it joins: no dropout in an eval-mode model
        setattr(parent, child_name, layer)
    return replaced


def merge_lora(model: nn.Module) -> None:
    """Merge every LoRA layer of `model` into its base weight (idempotent)."""
    layers = lora_layers(model).values()
    if any(not isinstance(layer.weight, torch.Tensor) for layer in layers):  # a quantised weight: lora/nf4.py
        raise ValueError(
            "the base is quantised (NF4): lora.nf4.dequantize_base(model, torch.bfloat16) (or torch.float32) "
            "first; an adapter is merged into a dense weight, never rounded back into 4 bits."
        )
    for layer in layers:
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora` (idempotent)."""
    for layer in lora_layers(model).values():
        layer.unmerge()


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model behaves as its base model; on exit (exceptions included) it is restored.

    A merged layer is unmerged for the block and merged again on exit, so its weight afterwards
    equals the merged weight up to float rounding. After a PiSSA init the base is the residual
    W0 − s·B0 A0, not the original W0 (as PEFT's disable_adapter).
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

    The model itself is left as it is; the merged weight is computed in fp32 and rounded once into its dtype.
    """
    layers = lora_layers(model) if not isinstance(model, LoRALinear) else {"": model}
    state = model.state_dict()
    for name, layer in layers.items():
        prefix = f"{name}." if name else ""
        for param_name in layer.adapter_params():
            del state[f"{prefix}{param_name}"]
        if not layer.merged:
            state[f"{prefix}weight"] = layer.merged_weight().to(layer.weight.dtype)
    return state


def lora_param_groups(model: nn.Module, lr: float, loraplus_lr_ratio: float | None = None) -> list[dict]:
    """Optimizer parameter groups of the model's adapter parameters, from the layers' own adapter_params().

    One group at `lr` (A and B of each layer in turn); with LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low
    Rank Adaptation of Large Models") two: every A at `lr`, every other adapter parameter (B, and DoRA's
    magnitude, grouped with B as PEFT's create_loraplus_optimizer does) at `lr * loraplus_lr_ratio`, since B,
    starting at zero, learns better with a larger step (the paper suggests a ratio of 16).
    """
    params = [param for layer in lora_layers(model).values() for param in layer.adapter_params().items()]
    if loraplus_lr_ratio is None:
        return [{"params": [param for _, param in params], "lr": lr}]
    return [
        {"params": [param for name, param in params if name.endswith("lora_A")], "lr": lr},
        {"params": [param for name, param in params if not name.endswith("lora_A")], "lr": lr * loraplus_lr_ratio},
    ]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared (tied) tensors are counted once."""
    params = list(model.parameters())  # parameters() yields a shared tensor once
    # A weight stored as a module of buffers (lora/nf4.py's 4-bit NF4Weight) counts as the values it stands for.
    stand_ins = [m.weight for m in model.modules() if isinstance(getattr(m, "weight", None), nn.Module)]
    quantized = sum(math.prod(weight.shape) for weight in stand_ins)
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params) + quantized
