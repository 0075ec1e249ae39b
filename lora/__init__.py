"""Hand-written LoRA for T5, the core: the layer (`layer.py`) and its variants DoRA (`dora.py`) and PiSSA
(`pissa.py`), putting them into a model and merging them (`model.py`), adapter files in PEFT's layout
(`save.py`, `load.py`, written atomically by `files.py`). It imports nothing else of the project.

Beside it, importing it and imported by name only: several adapters on one base and PEFT's `adapter_names=`
(`lora.adapters`, `lora.named_adapter_io`, `lora.multi_layer`), QLoRA's 4-bit base (`lora.nf4`), the LoRA
paper's analyses of what an adapter learned (`lora.inspect`), checks of anyone's LoRA layer against the
formula (`lora.testing`), and experiments with known answers (`lora.experiments`)."""

from .dora import DoRALinear
from .layer import LoRALinear, check_lora_hyperparameters
from .load import load_adapter
from .model import (
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
from .save import AdapterError, save_adapter

__all__ = [
    "AdapterError",
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
