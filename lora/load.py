"""Loading an adapter in PEFT's layout (lora/save.py), ours or PEFT's, strictly where PEFT is lenient: PEFT
ignores keys that lack the `base_model.model.` prefix with only a warning, and the adapter then does nothing;
here a missing, unexpected or mis-shaped key, or a config field this implementation would not reproduce, is
an AdapterError that names it. Reads safetensors only: nothing is unpickled."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .dora import DoRALinear
from .files import loads_json
from .layer import check_lora_hyperparameters
from .model import inject_lora, lora_layers
from .pissa import pissa_niter
from .save import CONFIG_NAME, KEY_PREFIX, PEFT_NAMES, WEIGHTS_NAME, AdapterError, single_adapter_layers


def read_adapter_config(directory: str | os.PathLike) -> dict:
    """Read and check `adapter_config.json`; refuse what this implementation would not reproduce."""
    directory = Path(directory)
    if not directory.is_dir():
        what = "is a file" if directory.exists() else "does not exist"
        raise AdapterError(f"adapter directory {directory} {what}: pass the --output-dir of a training run.")
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{config_path} is missing: {directory} is not a complete adapter directory.")
    try:
        config = loads_json(config_path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterError(f"{config_path} is not valid JSON ({err}).") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path} must hold a JSON object.")

    def refuse(field, why):
        raise AdapterError(f"{config_path}: field '{field}' {why}.")

    if config.get("peft_type") != "LORA":
        refuse("peft_type", f"is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    for field in ("r", "lora_alpha", "target_modules"):
        if field not in config:
            refuse(field, "is missing")
    try:
        check_lora_hyperparameters(config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0))
    except ValueError as err:  # the fields are 'r', 'lora_alpha' and 'lora_dropout'
        raise AdapterError(f"{config_path}: {err}") from None
    if "lora_dropout" in config and config["lora_dropout"] is None:
        config["lora_dropout"] = 0.0
    for field in ("use_rslora", "use_dora", "inference_mode"):
        if field in config and not isinstance(config[field], bool):
            refuse(field, f"must be true or false, got {config[field]!r}")
    base = config.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):
        refuse("base_model_name_or_path", f"must be a model name or path, got {base!r}")
    targets = config["target_modules"]
    if isinstance(targets, str) and targets.isidentifier():
        targets = [targets]
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        refuse(
            "target_modules", f"must be a non-empty list of module names, got {targets!r} (regexes are not supported)"
        )
    config["target_modules"] = targets
    init = config.get("init_lora_weights", True)
    is_pissa = isinstance(init, str) and init.startswith("pissa")
    if is_pissa:
        try:
            pissa_niter(init)
        except ValueError:
            refuse("init_lora_weights", f"is {init!r}; PiSSA's are 'pissa' and 'pissa_niter_N'")
    config["init"] = init if is_pissa else "lora"
    config["use_dora"] = bool(config.get("use_dora"))
    unsupported = {
        "bias": ("none", None),
        "fan_in_fan_out": (False, None),
        "lora_bias": (False, None),
        "modules_to_save": (None, []),
        "layers_to_transform": (None, []),
        "rank_pattern": ({}, None),
        "alpha_pattern": ({}, None),
        # OLoRA, LoftQ, EVA... change the base weights or need data to rebuild them; PiSSA is read above
        "init_lora_weights": (True, False, "gaussian", None, *([init] if is_pissa else [])),
        "layer_replication": (None, []),
        "target_parameters": (None, []),
        "exclude_modules": (None, []),
        "loftq_config": ({}, None),
        "use_qalora": (False, None),
    }
    for field, allowed in unsupported.items():
        if field in config and config[field] not in allowed:
            refuse(field, f"is {config[field]!r}; this implementation supports only {allowed[0]!r}")
    return config


def read_adapter(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checked config and tensors of an adapter directory (ours or PEFT's), without a model."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights_path = directory / WEIGHTS_NAME
    if weights_path.is_dir():
        raise AdapterError(f"{weights_path} is a directory, not a safetensors file: the adapter is damaged.")
    if not weights_path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise AdapterError(
                f"{directory} holds only adapter_model.bin, a pickle, which this loader never unpickles; "
                "re-save it as safetensors (PEFT: model.save_pretrained(dir, safe_serialization=True))."
            )
        raise AdapterError(f"{weights_path} is missing: {directory} is not a complete adapter directory.")

    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_path} is not a readable safetensors file ({err}).") from None
    for key, tensor in state.items():  # checked before the model is touched
        if not tensor.is_floating_point():
            raise AdapterError(f"{weights_path}: '{key}' holds {tensor.dtype} values; LoRA weights are floats.")
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"{weights_path}: '{key}' holds NaN or infinite values: the adapter is damaged.")
    return config, state


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> list[str]:
    """Load an adapter saved by `save_adapter` or by PEFT into `model`; return the loaded module paths.

    Injects LoRA (DoRA, PiSSA) with the file's settings when the model has none yet; for a PiSSA file
    that redoes the SVD, so `model` must be the original base. Strict where PEFT is lenient: a missing
    or unexpected key, a shape mismatch or an unsupported config field is an AdapterError that names
    it. Reads safetensors only; nothing is unpickled.
    """
    directory = Path(directory)
    config, state = read_adapter(directory)
    return apply_adapter(model, directory, config, state)


def setting_of(config: dict) -> dict:
    """What an adapter's LoRA layers must share with the file's config: r, alpha, rsLoRA, DoRA, init."""
    return {
        "r": config["r"],
        "alpha": config["lora_alpha"],
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": config["use_dora"],
        "init": config["init"],
    }


def apply_adapter(model: nn.Module, directory: Path, config: dict, state: dict) -> list[str]:
    """load_adapter once the directory is read: inject with the file's settings, or check the layers there."""
    setting = setting_of(config)
    layers = lora_layers(model)
    if not layers:
        if setting["init"] not in ("lora", "pissa"):  # "pissa_niter_N"
            raise AdapterError(
                f"{directory} is a PiSSA adapter initialised by a randomised SVD ({setting['init']}), whose "
                "residual base cannot be rebuilt exactly: save it with pissa_as_lora=True (train.py does) "
                "and load that plain LoRA adapter instead."
            )
        try:
            inject_lora(
                model,
                config["target_modules"],
                r=setting["r"],
                alpha=setting["alpha"],
                dropout=config.get("lora_dropout", 0.0),
                use_rslora=setting["use_rslora"],
                use_dora=setting["use_dora"],
                init=setting["init"],
            )
        except ValueError as err:  # a target the model lacks, a rank larger than its layers, a tied lm_head
            raise AdapterError(f"{directory / CONFIG_NAME} does not fit this model: {err}") from None
        layers = lora_layers(model)
    else:
        try:
            layers = single_adapter_layers(model)
        except AdapterError:  # which one would it replace? Never the first one silently
            raise AdapterError(
                f"the model holds several adapters: load {directory} beside them under a name of its own "
                "(lora.named_adapter_io.load_named_adapter), or delete_adapter one first."
            ) from None
        for name, layer in layers.items():
            ours = {
                "r": layer.r,
                "alpha": layer.alpha,
                "use_rslora": layer.use_rslora,
                "use_dora": isinstance(layer, DoRALinear),
                "init": layer.init,
            }
            if ours != setting:
                differ = ", ".join(
                    f"{key}={ours[key]!r} here, {setting[key]!r} in the file"
                    for key in ours
                    if ours[key] != setting[key]
                )
                raise AdapterError(
                    f"the model's LoRA layer {name} does not match {directory} ({differ}); "
                    "load into a fresh base model."
                )
            if layer.merged:
                raise AdapterError(f"LoRA layer {name} is merged: unmerge_lora(model) before loading an adapter.")
    return copy_checked(layers, state, directory)


def copy_checked(holders: dict[str, nn.Module], state: dict[str, torch.Tensor], directory: Path) -> list[str]:
    """Copy `state` into the adapter parameters of `holders` (by module path), refusing any key missing,
    unexpected or mis-shaped before a single value is copied."""
    weights_path = directory / WEIGHTS_NAME
    expected = {}
    for path, holder in holders.items():
        for param_name, param in holder.adapter_params().items():
            expected[f"{KEY_PREFIX}{path}.{PEFT_NAMES[param_name]}"] = param
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    magnitude = PEFT_NAMES["lora_magnitude"]
    if missing and missing[0].endswith(magnitude):
        raise AdapterError(
            f"{directory / CONFIG_NAME} says use_dora: true, but {weights_path} holds no DoRA magnitude "
            f"(no '{missing[0]}'): the adapter is damaged or its config is wrong."
        )
    stray_magnitudes = [key for key in unexpected if key.endswith(magnitude)]
    if stray_magnitudes:
        raise AdapterError(
            f"{weights_path} holds a DoRA magnitude ('{stray_magnitudes[0]}') but {directory / CONFIG_NAME} "
            "does not say use_dora: true: the adapter is damaged or its config is wrong."
        )
    if missing:
        raise AdapterError(
            f"{weights_path} lacks {len(missing)} key(s) the model needs, e.g. '{missing[0]}': "
            "it was saved for another model or other target modules."
        )
    if unexpected:
        raise AdapterError(
            f"{weights_path} has {len(unexpected)} key(s) the model does not, e.g. '{unexpected[0]}': "
            "it was saved for another model or other target modules."
        )
    for key, param in expected.items():
        if state[key].shape != param.shape:
            raise AdapterError(
                f"{weights_path}: '{key}' has shape {tuple(state[key].shape)} but the model expects "
                f"{tuple(param.shape)}: it was saved for another model size or rank."
            )
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])
    return list(holders)
