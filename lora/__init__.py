"""Hand-written LoRA for T5: the layer, injection, merging, PEFT-layout adapter files, and the LoRA
paper's analyses of what an adapter learned (`python -m lora.inspect`)."""

from .adapter_io import AdapterError, load_adapter, save_adapter
from .inspect import amplification, energy_rank, entropy_effective_rank, inspect_adapter, subspace_similarity
from .layer import (
    LoRALinear,
    check_lora_hyperparameters,
    count_parameters,
    inject_lora,
    lora_disabled,
    lora_layers,
    lora_param_groups,
    merge_lora,
    merged_state_dict,
    set_base_dtype,
    unmerge_lora,
)

__all__ = [
    "AdapterError",
    "amplification",
    "energy_rank",
    "entropy_effective_rank",
    "inspect_adapter",
    "subspace_similarity",
    "LoRALinear",
    "check_lora_hyperparameters",
    "count_parameters",
    "inject_lora",
    "load_adapter",
    "lora_disabled",
    "lora_layers",
    "lora_param_groups",
    "merge_lora",
    "merged_state_dict",
    "save_adapter",
    "set_base_dtype",
    "unmerge_lora",
]
