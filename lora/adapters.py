"""Many adapters on one base: add them by name, choose the active one, or give each row of a batch its own.

A model injected once (`inject_lora`, `load_adapter` without a name) holds one adapter, named "default",
and nothing here changes how it computes or saves. `add_adapter` puts more beside it: each named
adapter has its own r, alpha and targets. The forward adds the active adapter's update
(`set_active_adapter`), or, inside `mixed_adapters(model, names)`, each row's own adapter's update
(None: the base alone), with the rows grouped by adapter in every layer: one low-rank product per
adapter in the batch, not one per row. Merging folds in the active adapter only, and is refused
while a mixed batch runs; switching the active adapter unmerges first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import MethodType

import torch
from torch import nn

from .dora import DoRALinear
from .layer import LoRALinear, LowRank, check_lora_hyperparameters
from .model import inject_lora, lora_layers

BASE = None  # the "adapter" of a row that wants the base model alone


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in `model`, in the order they were added."""
    names = {}
    for layer in lora_layers(model).values():
        names.update(dict.fromkeys(layer.adapters()))
    return list(names)


def check_adapter_name(name) -> None:
    """An adapter's name is a Python identifier: it becomes a module name (extra_adapters[name])."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"an adapter name must be a Python identifier such as 'retail', got {name!r}.")


def add_adapter(
    model: nn.Module,
    name: str,
    target_modules: Sequence[str] = ("q", "v"),
    r: int = 16,
    alpha: float = 32,
    dropout: float = 0.0,
    use_rslora: bool = False,
) -> list[str]:
    """Add a LoRA adapter called `name` (B = 0: it changes nothing until trained or loaded) to the layers
    named in `target_modules`, beside the adapters already there; return the module paths it adapts.
    The active adapter stays what it was (the new one, if it is the model's first)."""
    check_adapter_name(name)
    existing = adapter_names(model)
    if name in existing:
        raise ValueError(f"the model already has an adapter named '{name}': delete_adapter it first, or pick another.")
    if not existing:
        replaced = inject_lora(model, target_modules, r, alpha, dropout, use_rslora)
        for layer in lora_layers(model).values():
            layer.name = layer.active = name
        return replaced
    check_lora_hyperparameters(r, alpha, dropout)
    layers = lora_layers(model)
    if any(isinstance(layer, DoRALinear) or layer.init != "lora" for layer in layers.values()):
        raise ValueError("several adapters work with plain LoRA only; this model holds a DoRA or PiSSA adapter.")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model has a merged adapter: unmerge_lora(model) before adding another.")
    active = next(iter(layers.values())).active
    targets = set(target_modules)
    plain = {path for path, module in model.named_modules() if type(module) is nn.Linear}
    paths = [path for path in [*layers, *plain] if path.rsplit(".", 1)[-1] in targets]
    unmatched = targets - {path.rsplit(".", 1)[-1] for path in paths}
    if unmatched:
        raise ValueError(f"target module(s) {sorted(unmatched)} match no linear layer of the model.")
    added = []
    try:
        for path in paths:
            if path in layers:
                layer = layers[path]
                shape = (layer.in_features, layer.out_features)
                extra = LowRank(*shape, r, alpha, dropout, use_rslora, device=layer.lora_A.device)
                layer.extra_adapters[name] = extra.train(layer.training)
            else:  # a layer the earlier adapters leave alone: a LoRALinear whose own adapter is this one
                parent_name, _, child_name = path.rpartition(".")
                linear = model.get_submodule(path)
                layer = LoRALinear.from_linear(linear, r, alpha, dropout, use_rslora).train(linear.training)
                layer.name, layer.active = name, active
                setattr(model.get_submodule(parent_name), child_name, layer)
            added.append(path)
    except ValueError:  # e.g. a rank larger than a layer: leave nothing of this adapter behind
        if name in adapter_names(model):
            delete_adapter(model, name)
        raise
    return added


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove the adapter `name` from every layer; a layer left with none becomes its plain nn.Linear again.
    Checked before anything changes. If it was the active adapter, the first remaining one becomes active,
    with a warning, as in PEFT (none left: the base model)."""
    layers = lora_layers(model)
    names = adapter_names(model)
    if name not in names:
        raise ValueError(f"the model has no adapter named {name!r} (it has {', '.join(names) or 'none'}).")
    merged = [path for path, layer in layers.items() if layer.merged]
    if merged:
        raise ValueError(f"layer {merged[0]} is merged: unmerge_lora(model) before deleting an adapter.")
    was_active = any(layer.active == name for layer in layers.values())
    for path, layer in layers.items():
        if name not in layer.adapters():
            continue
        if name in layer.extra_adapters:
            del layer.extra_adapters[name]
        elif layer.extra_adapters:  # its own adapter goes: the first extra one takes its place
            successor, extra = next(iter(layer.extra_adapters.items()))
            del layer.extra_adapters[successor]
            layer.name, layer.lora_A, layer.lora_B, layer.dropout = successor, extra.lora_A, extra.lora_B, extra.dropout
            layer.r, layer.alpha, layer.scaling = extra.r, extra.alpha, extra.scaling
            layer.use_rslora = extra.use_rslora
        else:
            linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
            linear.weight, linear.bias = layer.weight, layer.bias
            parent_name, _, child_name = path.rpartition(".")
            setattr(model.get_submodule(parent_name), child_name, linear.train(layer.training))
    if was_active:
        remaining = adapter_names(model)
        active = remaining[0] if remaining else BASE
        if remaining:
            warnings.warn(f"adapter '{name}' was active and is deleted: '{active}' is active now.", stacklevel=2)
        for layer in lora_layers(model).values():
            layer.active = active


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the adapter the forward applies (None: none). A layer merged with another adapter is
    unmerged first, so a merged model never mixes two adapters' updates."""
    if name is not BASE and name not in adapter_names(model):
        raise ValueError(f"unknown adapter '{name}': the model has {', '.join(adapter_names(model))}.")
    for layer in lora_layers(model).values():
        if layer.merged and layer.merged_name != name:
            layer.unmerge()
        layer.active = name


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """`set_active_adapter` for the block; the previous active adapter is restored on exit."""
    layers = lora_layers(model).values()
    before = next(iter(layers)).active if layers else None
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        set_active_adapter(model, before)


PEFT_BASE = "__base__"  # PEFT's name for a row that wants the base model alone; ours is None


@contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch gets adapter names[i]'s update (None or "__base__": the base
    alone). For model(...) and model.generate(...) alike; generate's beams repeat their row's adapter.
    `model(..., adapter_names=names)` and `model.generate(..., adapter_names=names)` do the same for one call."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapter names for a mixed batch are a non-empty list, one per row; got {names!r}.")
    names = [BASE if name == PEFT_BASE else name for name in names]
    known = adapter_names(model)
    unknown = sorted({str(name) for name in names if name is not BASE and name not in known})
    if unknown:
        has = f"the model has {', '.join(known)}" if known else "the model holds no adapter"
        raise ValueError(f"unknown adapter(s) {unknown} in the batch: {has} (and {PEFT_BASE!r} for the base).")
    layers = lora_layers(model).values()
    if any(layer.merged for layer in layers):
        raise ValueError("a mixed batch needs every adapter unmerged: call unmerge_lora(model) first.")
    if any(isinstance(layer, DoRALinear) for layer in layers):
        raise ValueError("mixed batches work with plain LoRA adapters; this model holds a DoRA adapter.")
    device = next(iter(layers)).lora_A.device if layers else torch.device("cpu")
    groups = {
        name: torch.tensor([i for i, row in enumerate(names) if row == name], device=device)
        for name in dict.fromkeys(names)
        if name is not BASE
    }
    outer = [(layer, layer.row_groups) for layer in layers]  # a block inside another one gives them back
    for layer in layers:
        layer.row_groups = (len(names), groups, False)  # generate() lets beams repeat rows (_beams_repeat_rows)
    try:
        yield model
    finally:
        for layer, row_groups in outer:
            layer.row_groups = row_groups


# PEFT's form, `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])`. transformers'
# T5 forward takes **kwargs and drops what it does not know, so a model with LoRA layers handles the keyword
# itself: a forward pre-hook takes it out of the call and opens mixed_adapters for the call, and generate
# (whose encoder pass does not go through the model's forward) is wrapped the same way.


def accept_adapter_names(model: nn.Module) -> None:
    """Let `model(...)` and `model.generate(...)` take PEFT's `adapter_names=`; done once, by inject_lora."""
    if getattr(model, "_accepts_adapter_names", False):
        return
    model.register_forward_pre_hook(_open_mixed_batch, with_kwargs=True)
    model.register_forward_hook(_close_mixed_batch, with_kwargs=True, always_call=True)
    if callable(getattr(model, "generate", None)):
        model.generate = MethodType(_generate_with_adapter_names, model)
    model._accepts_adapter_names = True


def _rows_of(args: tuple, kwargs: dict, keys: Sequence[str]) -> int:
    for value in (*args[:1], *(kwargs.get(key) for key in keys)):
        if isinstance(value, torch.Tensor):
            return value.shape[0]
    raise ValueError(f"adapter_names= needs the batch as a tensor ({' or '.join(keys)}) to match names to rows.")


def _check_rows(names, rows: int) -> None:
    if isinstance(names, Sequence) and not isinstance(names, str) and len(names) != rows:
        raise ValueError(f"adapter_names= has {len(names)} names for a batch of {rows} rows: give one name per row.")


def _open_mixed_batch(model, args, kwargs):
    if "adapter_names" not in kwargs:
        return None
    names = kwargs.pop("adapter_names")
    if names is None:  # as PEFT: no names, the active adapter
        return args, kwargs
    _check_rows(names, _rows_of(args, kwargs, ("input_ids", "inputs_embeds", "decoder_input_ids")))
    block = mixed_adapters(model, names)
    block.__enter__()
    model._mixed_batch_calls = [*getattr(model, "_mixed_batch_calls", []), block]
    return args, kwargs


def _close_mixed_batch(model, args, kwargs, output):
    calls = getattr(model, "_mixed_batch_calls", None)
    if calls:
        calls.pop().__exit__(None, None, None)
    return None


def _generate_with_adapter_names(model, *args, adapter_names=None, **kwargs):
    generate = type(model).generate
    if adapter_names is None:
        with _beams_repeat_rows(model):  # inside a mixed_adapters block, if any
            return generate(model, *args, **kwargs)
    _check_rows(adapter_names, _rows_of(args, kwargs, ("input_ids", "inputs", "inputs_embeds")))
    with mixed_adapters(model, adapter_names), _beams_repeat_rows(model):
        return generate(model, *args, **kwargs)


@contextmanager
def _beams_repeat_rows(model: nn.Module) -> Iterator[None]:
    """Within generate() a mixed batch's row i may come as k consecutive rows, its k beams; elsewhere a batch
    whose size is a multiple of the names is a mistake, not beams, and is refused."""
    layers = [layer for layer in lora_layers(model).values() if layer.row_groups is not None]
    saved = [layer.row_groups for layer in layers]
    for layer in layers:
        layer.row_groups = (*layer.row_groups[:2], True)
    try:
        yield
    finally:
        for layer, row_groups in zip(layers, saved):
            layer.row_groups = row_groups
