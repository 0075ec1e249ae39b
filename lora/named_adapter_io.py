"""Adapter files of a model of several adapters (lora/adapters.py): each saved and loaded by its name, in the
same PEFT layout as a single adapter (lora/save.py, lora/load.py) (PEFT's `save_pretrained(selected_adapters=[name])`
and `load_adapter(path, adapter_name=name)`)."""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from .adapters import accept_adapter_names, adapter_names, adapters_of, add_adapter, check_adapter_name, delete_adapter
from .load import apply_adapter, copy_checked, read_adapter, setting_of
from .model import lora_layers
from .save import AdapterError, adapter_config, adapter_state_dict, write_adapter


def named_adapter(model: nn.Module, name: str) -> dict[str, nn.Module]:
    """The modules that hold adapter `name` (LoRA layers, or a MultiLoRALinear's LowRank adapters), by the
    module path of their layer."""
    names = adapter_names(model)
    if name not in names:
        raise AdapterError(f"the model has no adapter named '{name}' (it has {', '.join(names) or 'none'}).")
    holders = {path: adapters_of(layer, names).get(name) for path, layer in lora_layers(model).items()}
    return {path: holder for path, holder in holders.items() if holder is not None}


def save_named_adapter(
    model: nn.Module,
    directory: str | os.PathLike,
    name: str,
    base_model_name_or_path: str | None = None,
    pissa_as_lora: bool = False,
) -> Path:
    """Write adapter `name` of `model` to `directory` in PEFT's layout (lora.save_adapter's files)."""
    holders = named_adapter(model, name)
    config = adapter_config(holders, base_model_name_or_path, pissa_as_lora)
    return write_adapter(directory, config, adapter_state_dict(holders, pissa_as_lora))


def load_named_adapter(model: nn.Module, directory: str | os.PathLike, name: str) -> list[str]:
    """Load the adapter in `directory` beside those the model holds, under `name`; return the module paths it
    adapts. The model's first adapter may be DoRA or PiSSA (loaded as lora.load_adapter does); the
    ones beside it are plain LoRA. If anything is wrong with the file, nothing of it stays in the model.
    Afterwards the model takes PEFT's `adapter_names=` (lora.adapters.accept_adapter_names)."""
    try:
        check_adapter_name(name)
    except ValueError as err:
        raise AdapterError(str(err)) from None
    directory = Path(directory)
    config, state = read_adapter(directory)
    if not lora_layers(model):  # the first adapter: loaded as a single one (DoRA and PiSSA too), then named
        try:
            loaded = apply_adapter(model, directory, config, state)
        except AdapterError:
            if lora_layers(model):
                delete_adapter(model, adapter_names(model)[0])  # nothing half-loaded stays behind
            raise
        model.lora_adapter_name = name
        accept_adapter_names(model)
        return loaded
    setting = setting_of(config)
    if setting["use_dora"] or setting["init"] != "lora":
        raise AdapterError(f"{directory} is a DoRA or PiSSA adapter; several adapters on one model take plain LoRA.")
    try:
        add_adapter(
            model,
            name,
            config["target_modules"],
            r=setting["r"],
            alpha=setting["alpha"],
            dropout=config.get("lora_dropout", 0.0),
            use_rslora=setting["use_rslora"],
        )
    except ValueError as err:
        raise AdapterError(f"{directory} cannot be added as '{name}': {err}") from None
    try:
        return copy_checked(named_adapter(model, name), state, directory)
    except AdapterError:
        delete_adapter(model, name)  # nothing half-loaded stays behind
        raise
