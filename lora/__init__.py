"""Hand-written LoRA for T5: the layer (`layer.py`) and its variants DoRA (`dora.py`) and PiSSA
(`pissa.py`), putting them into a model and merging them (`model.py`), PEFT-layout adapter files
(`adapter_io.py`, written through `files.py`). Beside them, imported by name only: the LoRA paper's analyses
of what an adapter learned (`lora.inspect`, `python -m lora.inspect`) and checks of anyone's LoRA layer
against the formula (`lora.testing`, `python -m lora.testing`)."""

from .adapter_io import AdapterError, load_adapter, save_adapter
from .dora import DoRALinear
from .layer import LoRALinear, check_lora_hyperparameters
from .model import (
    allocate_adapters,
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
from .pissa import pissa_as_lora, pissa_init

__all__ = [
    "AdapterError",
    "allocate_adapters",
    "DoRALinear",
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
    "pissa_as_lora",
    "pissa_init",
    "save_adapter",
    "set_base_dtype",
    "unmerge_lora",
]
