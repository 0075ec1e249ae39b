"""Hand-written LoRA for T5: the layer, injection, merging and PEFT-layout adapter files."""

from .adapter_io import AdapterError, load_adapter, save_adapter
from .layer import (
    LoRALinear,
    check_lora_hyperparameters,
    count_parameters,
    inject_lora,
    lora_disabled,
    lora_layers,
    merge_lora,
    merged_state_dict,
    unmerge_lora,
)

__all__ = [
    "AdapterError",
    "LoRALinear",
    "check_lora_hyperparameters",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_disabled",
    "lora_layers",
    "merge_lora",
    "merged_state_dict",
    "save_adapter",
    "unmerge_lora",
]
