"""Saving an adapter in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` (r, in), `...lora_B.weight` (out, r) and, for
DoRA, `...lora_magnitude_vector` (out,): exactly what `peft.PeftModel.from_pretrained` reads and what
PEFT's `save_pretrained` writes (the magnitude's key has no `.weight`: read from PEFT's own files).
Loading them back, strictly, is lora/load.py's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .dora import DoRALinear
from .files import atomic_write_all
from .model import lora_layers
from .pissa import pissa_as_lora as as_plain_lora

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


class AdapterError(ValueError):
    """An adapter directory or file that cannot be used as it is."""


def single_adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's LoRA layers, by module path, when they hold one adapter (what this module saves and loads)."""
    layers = lora_layers(model)
    if not layers:
        raise AdapterError("the model has no LoRA layers: call inject_lora(model) first.")
    if any("lora_A" not in layer.adapter_params() for layer in layers.values()):  # lora/multi_layer.py's layers
        raise AdapterError(
            "the model holds several adapters (lora.adapters): save or load one by its name, with "
            "lora.named_adapter_io's save_named_adapter and load_named_adapter."
        )
    return layers


def adapter_state_dict(layers: dict[str, nn.Module], pissa_as_lora: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one adapter, held by `layers` (by module path), under PEFT's key names, copied to the CPU
    (see `save_adapter` for pissa_as_lora)."""
    state = {}
    for path, layer in layers.items():
        tensors = {param_name: param.detach() for param_name, param in layer.adapter_params().items()}
        if pissa_as_lora and layer.init != "lora":
            tensors["lora_A"], tensors["lora_B"], _, _ = as_plain_lora(layer)
        for param_name, tensor in tensors.items():
            state[f"{KEY_PREFIX}{path}.{PEFT_NAMES[param_name]}"] = tensor.to("cpu", copy=True).contiguous()
    damaged = [key for key, tensor in state.items() if not torch.isfinite(tensor).all()]
    if damaged:  # never write an adapter that no one can use
        raise AdapterError(f"the adapter holds NaN or infinite values (e.g. '{damaged[0]}'); it is not saved.")
    return state


def adapter_config(
    layers: dict[str, nn.Module], base_model_name_or_path: str | None = None, pissa_as_lora: bool = False
) -> dict:
    """PEFT's LoraConfig fields for one adapter, held by `layers` (by module path; they share one setting)."""
    settings = {
        (lay.r, lay.alpha, _dropout_p(lay), lay.use_rslora, isinstance(lay, DoRALinear), lay.init)
        for lay in layers.values()
    }
    if len(settings) != 1:
        raise AdapterError(
            f"LoRA layers differ in (r, alpha, dropout, use_rslora, use_dora, init): {sorted(settings)}; "
            "one adapter file holds one setting."
        )
    r, alpha, dropout, use_rslora, use_dora, init = settings.pop()
    if pissa_as_lora and init != "lora":  # a rank-2r plain LoRA of the original base
        _, _, r, alpha = as_plain_lora(next(iter(layers.values())))
        init = "lora"
    return {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "target_modules": sorted({name.rsplit(".", 1)[-1] for name in layers}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": use_rslora,
        "use_dora": use_dora,
        "init_lora_weights": True if init == "lora" else init,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _dropout_p(layer) -> float:
    return layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0


def save_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    base_model_name_or_path: str | None = None,
    pissa_as_lora: bool = False,
) -> Path:
    """Write the model's adapter to `directory` in PEFT's layout, both files atomically, as a pair.

    A PiSSA adapter applies to the residual base W0 − s·B0 A0, which a loader rebuilds by redoing the
    SVD. With `pissa_as_lora` it is written instead as the rank-2r plain LoRA adapter of the original
    base (`pissa_as_lora` in pissa.py; PEFT's `path_initial_model_for_weight_conversion`), which any
    LoRA loader applies to the unmodified model. Without PiSSA layers the flag changes nothing.
    """
    layers = single_adapter_layers(model)
    config = adapter_config(layers, base_model_name_or_path, pissa_as_lora)
    return write_adapter(directory, config, adapter_state_dict(layers, pissa_as_lora))


def write_adapter(directory: str | os.PathLike, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """Both files of an adapter, written atomically as a pair."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Serialised in memory, written by Python: a full disk is then an OSError naming its errno, not a
    # SafetensorError from inside the library.
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write_all({directory / WEIGHTS_NAME: weights, directory / CONFIG_NAME: json.dumps(config, indent=2) + "\n"})
    return directory
