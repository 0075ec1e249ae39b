"""Many adapters on one base: add them by name, choose the active one, or give each row of a batch its own.

A model injected once (`inject_lora`, `load_adapter` without a name) holds one adapter, named "default",
in its LoRALinear layers, and nothing here changes how it computes or saves. Adding a second adapter
turns every LoRA layer into a MultiLoRALinear (lora/multi_layer.py), which holds each named adapter alike,
each with its own r, alpha and targets. The forward adds the active adapter's update (`set_active_adapter`;
None: the base alone), or, inside `mixed_adapters(model, names)`, each row's own adapter's update, with the
rows grouped by adapter in every layer: one low-rank product per adapter in the batch, not one per row.
Merging folds in the active adapter only, and is refused while a mixed batch runs; switching the active
adapter unmerges first.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn

from .dora import DoRALinear
from .layer import LoRALinear, check_lora_hyperparameters
from .model import inject_lora, lora_layers
from .multi_layer import LowRank, MultiLoRALinear
from .nf4 import LinearNF4, NF4Weight

SINGLE = "default"  # the name of a model's one adapter when it was given none (PEFT's too)
PEFT_BASE = "__base__"  # PEFT's name for a row that wants the base model alone; ours is None


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters in `model`, in the order they were added."""
    layers = lora_layers(model).values()
    if not layers:
        return []
    if not isinstance(next(iter(layers)), MultiLoRALinear):
        return [getattr(model, "lora_adapter_name", SINGLE)]
    return list(dict.fromkeys(name for layer in layers for name in layer.adapters))


def adapters_of(layer: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """A layer's adapters by name, each a module with lora_A, lora_B and lora_update(); `names` are the
    model's (adapter_names), whose only one a single-adapter layer holds."""
    return dict(layer.adapters) if isinstance(layer, MultiLoRALinear) else {names[0]: layer}


def check_adapter_name(name) -> None:
    """An adapter's name is a Python identifier: it becomes a module name (`adapters[name]`)."""
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
        model.lora_adapter_name = name
        accept_adapter_names(model)
        return replaced
    check_lora_hyperparameters(r, alpha, dropout)
    layers = lora_layers(model)
    if any(isinstance(layer, DoRALinear) or getattr(layer, "init", "lora") != "lora" for layer in layers.values()):
        raise ValueError("several adapters work with plain LoRA only; this model holds a DoRA or PiSSA adapter.")
    if any(layer.merged for layer in layers.values()):
        raise ValueError("the model has a merged adapter: unmerge_lora(model) before adding another.")
    targets = set(target_modules)
    plain = {path for path, module in model.named_modules() if type(module) is nn.Linear}
    paths = [path for path in [*layers, *plain] if path.rsplit(".", 1)[-1] in targets]
    unmatched = targets - {path.rsplit(".", 1)[-1] for path in paths}
    if unmatched:
        in_nf4 = unmatched & {path.rsplit(".", 1)[-1] for path, m in model.named_modules() if isinstance(m, LinearNF4)}
        if in_nf4:
            raise ValueError(
                f"target module(s) {sorted(in_nf4)} are stored in NF4 without an adapter (lora.nf4.quantize_base "
                "ran first): add every adapter before quantising the base, or target only the layers that hold one."
            )
        raise ValueError(f"target module(s) {sorted(unmatched)} match no linear layer of the model.")
    for path, layer in layers.items():  # one adapter so far: its layers become layers of several
        if isinstance(layer, LoRALinear):
            _replace(model, path, MultiLoRALinear.of(layer, existing[0]))
    if hasattr(model, "lora_adapter_name"):
        del model.lora_adapter_name
    layers = lora_layers(model)
    active = next(iter(layers.values())).active
    try:
        for path in paths:
            layer = layers.get(path)
            if layer is None:  # a layer the earlier adapters leave alone
                layer = MultiLoRALinear.of(model.get_submodule(path), name)
                layer.active = active
                _replace(model, path, layer)
            adapter = LowRank(layer.in_features, layer.out_features, r, alpha, dropout, use_rslora, layer.weight.device)
            layer.adapters[name] = adapter.train(layer.training)
    except ValueError:  # e.g. a rank larger than a layer: leave nothing of this adapter behind
        if name in adapter_names(model):
            delete_adapter(model, name)
        raise
    accept_adapter_names(model)  # the model holds named adapters now
    return paths


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
    was_active = name == active_name(model)
    emptied = {  # each layer left with no adapter, and the plain layer that takes its place: built before any change
        path: _plain_layer(layer)
        for path, layer in layers.items()
        if not isinstance(layer, MultiLoRALinear) or set(layer.adapters) <= {name}
    }
    for path, layer in layers.items():
        if isinstance(layer, MultiLoRALinear) and name in layer.adapters:
            del layer.adapters[name]
        if path in emptied:
            _replace(model, path, emptied[path])
    if hasattr(model, "lora_adapter_name") and not lora_layers(model):
        del model.lora_adapter_name
    remaining = adapter_names(model)
    if was_active and remaining:
        warnings.warn(f"adapter '{name}' was active and is deleted: '{remaining[0]}' is active now.", stacklevel=2)
        set_active_adapter(model, remaining[0])


def _plain_layer(layer: nn.Module) -> nn.Module:
    """The layer a LoRA layer was before its adapters: an nn.Linear, or a LinearNF4 over an NF4 base, holding
    the same weight and bias."""
    if isinstance(layer.weight, NF4Weight):
        return LinearNF4.holding(layer.weight, layer.bias).train(layer.training)
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    linear.weight, linear.bias = layer.weight, layer.bias
    return linear.train(layer.training)


def active_name(model: nn.Module) -> str | None:
    """The adapter the forward applies (None: the base alone)."""
    layers = list(lora_layers(model).values())
    if not layers:
        return None
    if isinstance(layers[0], MultiLoRALinear):
        return layers[0].active
    return None if layers[0].disabled else adapter_names(model)[0]


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Make `name` the adapter the forward applies (None: none; on a model of one adapter that disables its
    layers, as `lora_disabled` does). A layer merged with another adapter is unmerged first, so a merged
    model never mixes two adapters' updates."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"unknown adapter '{name}': the model has {', '.join(adapter_names(model))}.")
    for layer in lora_layers(model).values():
        if isinstance(layer, MultiLoRALinear):
            if layer.merged and layer.merged_name != name:
                layer.unmerge()
            layer.active = name
        else:  # the model's one adapter: active, or disabled
            if layer.merged and name is None:
                layer.unmerge()
            layer.disabled = name is None


@contextmanager
def active_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """`set_active_adapter` for the block; the previous active adapter is restored on exit."""
    before = active_name(model)
    set_active_adapter(model, name)
    try:
        yield model
    finally:
        set_active_adapter(model, before)


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child_name = path.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


# A mixed batch: while it runs, each LoRA layer's forward is _mixed_forward, which gives row i the update of
# names[i]'s adapter. Nothing of it is stored in the layers: leaving the block gives them their forward back.


@dataclass
class MixedBatch:
    rows: int  # one name per row
    groups: dict[str, torch.Tensor]  # adapter name -> the indices of its rows
    beams: bool = False  # inside generate(): row i may come as k consecutive rows, its k beams


@contextmanager
def mixed_adapters(model: nn.Module, names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of every batch gets adapter names[i]'s update (None or "__base__": the base
    alone). For model(...) and model.generate(...) alike; generate's beams repeat their row's adapter.
    `model(..., adapter_names=names)` and `model.generate(..., adapter_names=names)` do the same for one call."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise ValueError(f"adapter names for a mixed batch are a non-empty list, one per row; got {names!r}.")
    names = [None if name == PEFT_BASE else name for name in names]
    known = adapter_names(model)
    unknown = sorted({str(name) for name in names if name is not None and name not in known})
    if unknown:
        has = f"the model has {', '.join(known)}" if known else "the model holds no adapter"
        raise ValueError(f"unknown adapter(s) {unknown} in the batch: {has} (and {PEFT_BASE!r} for the base).")
    layers = lora_layers(model)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("a mixed batch needs every adapter unmerged: call unmerge_lora(model) first.")
    if any(isinstance(layer, DoRALinear) for layer in layers.values()):
        raise ValueError("mixed batches work with plain LoRA adapters; this model holds a DoRA adapter.")
    device = next(iter(layers.values())).weight.device
    groups = {
        name: torch.tensor([i for i, row in enumerate(names) if row == name], device=device)
        for name in dict.fromkeys(names)
        if name is not None
    }
    batch = MixedBatch(len(names), groups)
    outer = [(layer, vars(layer).get("forward")) for layer in layers.values()]  # an enclosing block's
    for layer in layers.values():
        layer.forward = MethodType(_mixed_forward(batch, adapters_of(layer, known)), layer)
    model._mixed_batches = [*getattr(model, "_mixed_batches", []), batch]
    try:
        yield model
    finally:
        model._mixed_batches = model._mixed_batches[:-1]
        for layer, forward in outer:
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _mixed_forward(batch: MixedBatch, adapters: dict[str, nn.Module]):
    gathered: dict = {}  # the stacked factors and each row's slot, built at the first call without gradients

    def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter's update. Without gradients (inference), the way S-LoRA and Punica batch
        adapters: every adapter's A and B stacked once, each row's gathered by one index, two batched
        products for the whole batch whatever the number of adapters. With gradients (training), the rows
        grouped by adapter: one low-rank product per adapter, each reaching that adapter's A and B."""
        if layer.merged:  # merged inside the block: the base product would hold one adapter's update for all
            raise ValueError("a layer was merged inside a mixed batch: merge only outside mixed_adapters.")
        result = layer.base_product(x, layer.weight, layer.bias)  # (batch, ..., out)
        if layer.disabled:
            return result
        repeats = x.shape[0] // batch.rows if batch.beams else 1  # in generate(), the beams per row
        if x.shape[0] != batch.rows * repeats or repeats == 0:
            raise ValueError(
                f"a mixed batch names an adapter for each of {batch.rows} rows, but this batch has {x.shape[0]} "
                "rows: give one name per row."
            )
        dtype = next(iter(adapters.values())).lora_A.dtype
        if not torch.is_grad_enabled() and not any(adapter.training for adapter in adapters.values()):
            version = _factor_versions(adapters)  # restacked when a factor changed inside the block
            if version is None or gathered.get("version") != version:
                gathered.update(_stacked_factors(batch, adapters, layer.in_features, layer.out_features))
                gathered["version"] = version
            slot = gathered["slot"].repeat_interleave(repeats)  # (batch,)
            rows = x.to(dtype).reshape(x.shape[0], -1, x.shape[-1])  # (batch, tokens, in)
            low_rank = torch.bmm(rows, gathered["A"][slot].transpose(1, 2))  # (batch, tokens, r)
            update = torch.bmm(low_rank, gathered["B"][slot].transpose(1, 2))  # (batch, tokens, out)
            update = gathered["scaling"][slot].view(-1, 1, 1) * update  # scaled last, as lora_update does
            return result + update.reshape(*x.shape[:-1], -1).to(result.dtype)
        update = x.new_zeros(*x.shape[:-1], layer.out_features, dtype=dtype)  # (batch, ..., out)
        for name, index in batch.groups.items():
            adapter = adapters.get(name)
            if adapter is None:  # this adapter does not target this layer: its rows get no update here
                continue
            if repeats > 1:
                index = (index.unsqueeze(1) * repeats + torch.arange(repeats, device=index.device)).flatten()
            update.index_add_(0, index, adapter.lora_update(x.index_select(0, index)))
        return result + update.to(result.dtype)

    return forward


def _factor_versions(adapters: dict[str, nn.Module]) -> list | None:
    """What identifies the adapters' factors as they are now: each tensor's storage and its version counter,
    which every in-place change (an optimizer step, a copy_) moves on, and each scaling. None when a factor
    is an inference tensor (made under torch.inference_mode), which keeps no version counter: then nothing
    can tell a change, and the factors are stacked afresh at every call."""
    factors = [tensor for adapter in adapters.values() for tensor in (adapter.lora_A, adapter.lora_B)]
    if any(tensor.is_inference() for tensor in factors):
        return None
    return [(t.data_ptr(), t._version) for t in factors] + [adapter.scaling for adapter in adapters.values()]


def _stacked_factors(batch: MixedBatch, adapters: dict[str, nn.Module], in_features: int, out_features: int):
    """A (slots, r, in), B (slots, out, r) and the scaling (slots,) of the batch's adapters, zero-padded to the
    largest r (padding adds zero), one all-zero slot last for the base's rows and for adapters that skip this
    layer; and each row's slot."""
    names = list(batch.groups)
    present = [adapters[name] for name in names if name in adapters]
    first = next(iter(adapters.values()))
    r = max((adapter.r for adapter in present), default=1)
    factors_a = first.lora_A.new_zeros(len(names) + 1, r, in_features)
    factors_b = first.lora_A.new_zeros(len(names) + 1, out_features, r)
    scaling = first.lora_A.new_zeros(len(names) + 1)
    slot = torch.full((batch.rows,), len(names), dtype=torch.long, device=first.lora_A.device)
    for k, name in enumerate(names):
        adapter = adapters.get(name)
        if adapter is not None:
            factors_a[k, : adapter.r] = adapter.lora_A
            factors_b[k, :, : adapter.r] = adapter.lora_B
            scaling[k] = adapter.scaling
            slot[batch.groups[name]] = k
    return {"A": factors_a, "B": factors_b, "scaling": scaling, "slot": slot}


# PEFT's form, `model(..., adapter_names=[...])` and `model.generate(..., adapter_names=[...])`. transformers'
# T5 forward takes **kwargs and drops what it does not know, so a model of named adapters handles the keyword
# itself: a forward pre-hook takes it out of the call and opens mixed_adapters for the call, and generate
# (whose encoder pass does not go through the model's forward) is wrapped the same way. Plain inject_lora
# installs none of it: a model of one adapter pays nothing per step for a keyword it is never given.


def accept_adapter_names(model: nn.Module) -> None:
    """Let `model(...)` and `model.generate(...)` take PEFT's `adapter_names=`: done once, by add_adapter and
    load_named_adapter; call it yourself to pass the keyword to a model from plain inject_lora."""
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
    batches = getattr(model, "_mixed_batches", [])
    batch = batches[-1] if batches else None
    if batch is None or batch.beams:
        yield
        return
    batch.beams = True
    try:
        yield
    finally:
        batch.beams = False
