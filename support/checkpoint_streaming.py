"""Reading a checkpoint tensor by tensor into a model built on the meta device, so that the full-precision
model is never in memory at once: QLoRA's base quantised to NF4 as each weight arrives (quantize_while_loading),
FSDP's shards cut from each tensor (support/fsdp.py), and LoRA's A and B allocated afterwards."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lora import lora_layers
from lora.nf4 import LinearNF4, NF4Weight, quantize_lora_layer


def missing_tensors_error(names: list[str]) -> ValueError:
    """What a load that did not find every frozen tensor raises: the first name, and how many more."""
    more = f" and {len(names) - 1} more" if len(names) > 1 else ""
    return ValueError(f"the checkpoint has no tensor for {names[0]}{more}")


def allocate_adapters(model: nn.Module) -> None:
    """A and B of LoRA injected into a model on the meta device: allocated in fp32 on the CPU and initialised
    as LoRA does (B = 0), in the order inject_lora initialises them, so a seed gives the values it gives on
    a model with real weights. Plain LoRA only: DoRA and PiSSA initialise from W0."""
    for layer in lora_layers(model).values():
        for name, param in layer.adapter_params().items():
            setattr(layer, name, nn.Parameter(torch.empty_like(param, device="cpu", dtype=torch.float32)))
        layer.reset_lora_parameters()


def checkpoint_files(path: str, local_only: bool) -> list[Path]:
    """The checkpoint's .safetensors files: a directory's, or a hub name's cached (or downloaded) snapshot's."""
    from huggingface_hub import snapshot_download

    directory = Path(path).expanduser()
    if not directory.is_dir():
        patterns = ["*.json", "*.safetensors"]
        directory = Path(snapshot_download(path, allow_patterns=patterns, local_files_only=local_only))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise OSError(f"no .safetensors weights in {directory}")
    return files


def checkpoint_tensors(files: list[Path]):
    """(name, tensor) for every tensor of the files, one at a time: each file is opened for each tensor, so
    its mapped pages are let go before the next one."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            keys = list(weights.keys())  # noqa: SIM118 (safe_open has keys(), not iteration)
        for key in keys:
            with safe_open(str(file), framework="pt") as weights:
                tensor = weights.get_tensor(key)
            yield key, tensor


def build_on_meta(path: str):
    """The model of `path`'s config on the meta device: shapes, dtypes and tied weights; no memory."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        return AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))


def quantize_while_loading(model: nn.Module, named_tensors, dtype: torch.dtype, double_quant: bool = True,
                           skip=("lm_head",)) -> None:  # fmt: skip
    """Fill a model built on the meta device (LoRA already injected) from (name, tensor) pairs read one at a
    time: each frozen linear layer's weight (but those named in `skip`) is quantised to NF4 as it arrives,
    every other frozen tensor is stored in `dtype`, so the full-precision model is never in memory at once.
    Then A and B are allocated in fp32 and initialised as LoRA does (B = 0), in the order inject_lora
    initialises them. Names the model lacks are ignored (a checkpoint's copies of tied weights); a frozen
    tensor the pairs never gave is refused."""
    modules = dict(model.named_modules())
    lora = lora_layers(model)
    loaded = set()
    for key, tensor in named_tensors:
        path, _, leaf = key.rpartition(".")
        module = modules.get(path)
        if module is None or not isinstance(getattr(module, leaf, None), (nn.Parameter, NF4Weight)):
            continue
        parent_path, _, name = path.rpartition(".")
        loaded.add(key)
        if leaf == "weight" and path in lora:
            quantize_lora_layer(path, module, tensor, dtype, double_quant)
        elif leaf == "weight" and isinstance(module, nn.Linear) and name not in skip:
            # a bias still on the meta device stays there until its own key comes
            modules[path] = LinearNF4(tensor, module.bias, dtype, double_quant)
            setattr(modules[parent_path], name, modules[path])
        else:
            setattr(module, leaf, nn.Parameter(tensor.to(dtype), requires_grad=False))
    # A tied weight the checkpoint does not hold (the tiny model's lm_head) is its source's, as from_pretrained
    # ties it; one the checkpoint holds (flan-t5's own lm_head) keeps its values.
    for target, source in (getattr(model, "_tied_weights_keys", None) or {}).items():
        target_path, _, target_name = target.rpartition(".")
        if target not in loaded and target_path in modules:
            setattr(modules[target_path], target_name, model.get_parameter(source))
    missing = [name for name, param in model.named_parameters() if param.is_meta and not param.requires_grad]
    if missing:
        raise missing_tensors_error(missing)
    allocate_adapters(model)
