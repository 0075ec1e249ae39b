"""Adapter files in PEFT's layout: `adapter_config.json` and `adapter_model.safetensors`.

Keys are `base_model.model.<module path>.lora_A.weight` (r, in), `...lora_B.weight` (out, r) and, for
DoRA, `...lora_magnitude_vector` (out,): exactly what `peft.PeftModel.from_pretrained` reads and what
PEFT's `save_pretrained` writes (the magnitude's key has no `.weight`: read from PEFT's own files).
PEFT ignores keys that lack the `base_model.model.` prefix with only a warning; our loader is strict.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from .adapters import adapter_names, adapters_of, add_adapter, check_adapter_name, delete_adapter
from .dora import DoRALinear
from .files import atomic_write_all, loads_json
from .layer import check_lora_hyperparameters
from .model import inject_lora, lora_layers
from .pissa import pissa_as_lora as as_plain_lora
from .pissa import pissa_niter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PEFT_NAMES = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "lora_magnitude": "lora_magnitude_vector"}


class AdapterError(ValueError):
    """An adapter directory or file that cannot be used as it is."""


def named_adapter(model: nn.Module, name: str | None) -> dict[str, nn.Module]:
    """The modules that hold adapter `name` (LoRA layers, or a MultiLoRALinear's LowRank adapters), by the
    module path of their layer; name=None: the model's only adapter."""
    layers = lora_layers(model)
    names = adapter_names(model)
    if name is None:
        if len(names) > 1:
            raise AdapterError(f"the model holds several adapters ({', '.join(names)}): say which, with name=.")
        return layers
    if name not in names:
        raise AdapterError(f"the model has no adapter named '{name}' (it has {', '.join(names) or 'none'}).")
    holders = {path: adapters_of(layer, names).get(name) for path, layer in layers.items()}
    return {path: holder for path, holder in holders.items() if holder is not None}


def adapter_state_dict(
    model: nn.Module, pissa_as_lora: bool = False, name: str | None = None
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names, copied to the CPU (see `save_adapter` for pissa_as_lora)."""
    state = {}
    for path, layer in named_adapter(model, name).items():
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
    model: nn.Module, base_model_name_or_path: str | None = None, pissa_as_lora: bool = False, name: str | None = None
) -> dict:
    """PEFT's LoraConfig fields for the LoRA layers in `model` (they must share one setting)."""
    if not lora_layers(model):
        raise AdapterError("the model has no LoRA layers: call inject_lora(model) first.")
    layers = named_adapter(model, name)
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
    name: str | None = None,
) -> Path:
    """Write the model's adapter to `directory` in PEFT's layout, both files atomically, as a pair.

    A PiSSA adapter applies to the residual base W0 − s·B0 A0, which a loader rebuilds by redoing the
    SVD. With `pissa_as_lora` it is written instead as the rank-2r plain LoRA adapter of the original
    base (`pissa_as_lora` in pissa.py; PEFT's `path_initial_model_for_weight_conversion`), which any
    LoRA loader applies to the unmodified model. Without PiSSA layers the flag changes nothing.
    A model holding several adapters (lora/adapters.py) saves the one called `name`.
    """
    directory = Path(directory)
    config = adapter_config(model, base_model_name_or_path, pissa_as_lora, name)
    state = adapter_state_dict(model, pissa_as_lora, name)
    directory.mkdir(parents=True, exist_ok=True)
    # Serialised in memory, written by Python: a full disk is then an OSError naming its errno, not a
    # SafetensorError from inside the library.
    weights = safetensors_bytes(state, metadata={"format": "pt"})
    atomic_write_all({directory / WEIGHTS_NAME: weights, directory / CONFIG_NAME: json.dumps(config, indent=2) + "\n"})
    return directory


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


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> list[str]:
    """Load an adapter saved by `save_adapter` or by PEFT into `model`; return the loaded module paths.

    Injects LoRA (DoRA, PiSSA) with the file's settings when the model has none yet; for a PiSSA file
    that redoes the SVD, so `model` must be the original base. Strict where PEFT is lenient: a missing
    or unexpected key, a shape mismatch or an unsupported config field is an AdapterError that names
    it. Reads safetensors only; nothing is unpickled.

    With `name`, the adapter is added beside those the model holds (lora/adapters.py), under that name;
    if anything is wrong with it, nothing of it stays in the model.
    """
    directory = Path(directory)
    config, state = read_adapter(directory)
    setting = {
        "r": config["r"],
        "alpha": config["lora_alpha"],
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": config["use_dora"],
        "init": config["init"],
    }
    if name is not None:
        return _load_named(model, directory, name, config, setting, state)
    return _load_single(model, directory, config, setting, state)


def _load_single(model: nn.Module, directory: Path, config: dict, setting: dict, state: dict) -> list[str]:
    """load_adapter without a name: inject with the file's settings, or check the layers already there."""
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
        names = adapter_names(model)
        if len(names) > 1:  # which one would it replace? Never the first one silently
            raise AdapterError(
                f"the model holds several adapters ({', '.join(names)}): load {directory} beside them under a "
                "name of its own, load_adapter(model, directory, name=...), or delete_adapter one first."
            )
        merged = [path for path, layer in layers.items() if layer.merged]
        layers = named_adapter(model, names[0])
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
            if name in merged:
                raise AdapterError(f"LoRA layer {name} is merged: unmerge_lora(model) before loading an adapter.")
    return _copy_checked(layers, state, directory)


def _copy_checked(holders: dict[str, nn.Module], state: dict[str, torch.Tensor], directory: Path) -> list[str]:
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


def _load_named(model: nn.Module, directory: Path, name: str, config: dict, setting: dict, state: dict) -> list[str]:
    try:
        check_adapter_name(name)
    except ValueError as err:
        raise AdapterError(str(err)) from None
    if not lora_layers(model):  # the first adapter: loaded as a single one (DoRA and PiSSA too), then named
        try:
            loaded = _load_single(model, directory, config, setting, state)
        except AdapterError:
            if lora_layers(model):
                delete_adapter(model, adapter_names(model)[0])  # nothing half-loaded stays behind
            raise
        model.lora_adapter_name = name
        return loaded
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
        return _copy_checked(named_adapter(model, name), state, directory)
    except AdapterError:
        delete_adapter(model, name)  # nothing half-loaded stays behind
        raise
