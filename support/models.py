"""The one place that turns `--model` into a model and tokenizer: `tiny` (support/tiny_model.py), a local
directory or a hub name; in the dtype the run stores its base in, with LoRA injected, and for QLoRA or
FSDP read tensor by tensor (support/checkpoint_streaming.py) so that the full model is never in memory.

`random:flan-t5-base` (any flan-t5 size) is that architecture with random weights and no tokenizer, built
through the same paths with its frozen tensors drawn one at a time where a checkpoint's would be read: what
the benchmarks time and measure offline, where weight values do not matter."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .architectures import FLAN_T5_SIZES, flan_t5_architecture
from .checkpoint_streaming import (
    allocate_adapters,
    build_on_meta,
    checkpoint_files,
    checkpoint_tensors,
    missing_tensors_error,
    quantize_while_loading,
)
from .cli import UsageError
from .tiny_model import TINY, ModelLoadError, tiny_model_dir

RANDOM = "random:"  # "random:flan-t5-base": the architecture with random weights

__all__ = ["TINY", "ModelLoadError", "load_model_and_tokenizer", "load_with_lora", "same_base_model"]


def resolve_model_path(name: str) -> str:
    """`tiny` becomes the tiny model's cache directory; anything else is returned as it is."""
    return str(tiny_model_dir()) if name == TINY else name


def same_base_model(name: str, recorded: str) -> bool:
    """Whether --model `name` and an adapter's recorded base are the same model (as paths, when both are)."""
    if name == recorded:
        return True
    resolved = Path(resolve_model_path(name)).expanduser()
    return resolved.is_dir() and Path(recorded).expanduser().is_dir() and resolved.resolve() == Path(recorded).resolve()


def load_model_and_tokenizer(name: str, dtype: torch.dtype | None = None, qlora_inject=None, on_meta: bool = False):
    """Load a T5 model and its tokenizer from `tiny`, a local directory or a hub name.

    Returns (model, tokenizer, path) where path is what an adapter should record as its base model.
    A hub name is read from the local cache when it is there; otherwise the hub must be reachable,
    which is checked once, quickly, instead of waiting through the hub client's retries.

    With `qlora_inject` (QLoRA): the model is built on the meta device, `qlora_inject(model)` injects LoRA
    there, and the checkpoint's safetensors files are read tensor by tensor, each frozen linear layer's
    weight quantised to NF4 as it comes and the rest stored in `dtype` (support/checkpoint_streaming.py,
    quantize_while_loading): neither the fp32 nor a bf16 copy of the model is ever in memory.
    With `on_meta`: the model is built on the meta device and its weights are not read (train.py --fsdp
    then reads each rank's shards of them: load_base_shards).
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name.startswith(RANDOM):
        return _random_model(name, dtype, qlora_inject, on_meta), None, name
    path = resolve_model_path(name)
    local_only = Path(path).expanduser().is_dir() or _in_hub_cache(path)
    if not local_only:
        if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not an "org/name" hub id
            raise ModelLoadError(
                f"model directory {name!r} does not exist; pass a directory saved with "
                "save_pretrained, a hub name, or --model tiny for the offline test model."
            )
        if not _hub_reachable():
            raise ModelLoadError(
                f"could not load model {name!r}: it is not in the local cache and the Hugging Face "
                "hub cannot be reached; pass a local directory saved with save_pretrained, or "
                "--model tiny for the offline test model."
            )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # one clear message below instead of transformers' warnings
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        _refuse_a_quantized_checkpoint(name, AutoConfig.from_pretrained(path, local_files_only=local_only))
        # safetensors only: a pytorch_model.bin is a pickle, and nothing is unpickled from a file a user hands us
        if qlora_inject is not None:
            model = _load_quantized(path, local_only, dtype, qlora_inject)
        elif on_meta:
            checkpoint_files(path, local_only)  # there (or downloaded) before any rank reads its shards
            model = build_on_meta(path)
        else:
            model, loading = AutoModelForSeq2SeqLM.from_pretrained(
                path, dtype=dtype, local_files_only=local_only, use_safetensors=True, output_loading_info=True
            )
            if loading["missing_keys"]:  # transformers would fill them with random values, and only warn
                raise missing_tensors_error(sorted(loading["missing_keys"]))
    except UsageError:  # from qlora_inject: the LoRA settings, not the model
        raise
    except (OSError, ValueError, ImportError) as err:
        if Path(path).expanduser().is_dir() and not list(Path(path).expanduser().glob("*.safetensors")):
            raise ModelLoadError(
                f"model directory {name!r} holds no .safetensors weights (a pytorch_model.bin is a pickle, which "
                "this project never loads); save the model with save_pretrained (safetensors by default)."
            ) from None
        raise _could_not_load(name, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer, path


def _refuse_a_quantized_checkpoint(name: str, config) -> None:
    """A checkpoint saved quantised (bitsandbytes' 4 or 8 bits, GPTQ, AWQ...) holds no full-precision weights
    to train on or merge into, and loading it would need the quantiser's own library at run time."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "a quantiser") if isinstance(quantization, dict) else "a quantiser"
        raise ModelLoadError(
            f"model {name!r} was saved quantised by {method} (its config.json has a quantization_config); pass "
            "the full-precision checkpoint instead: --base-dtype nf4 quantises it to NF4 as it loads, bit-equal "
            "to bitsandbytes."
        )


def load_with_lora(name: str, base_dtype: str, device: torch.device, inject, on_meta: bool = False):
    """(model, tokenizer, path) of load_model_and_tokenizer with LoRA injected by `inject(model)` (A and B in
    fp32) and the frozen weights stored as --base-dtype asks: fp32, bf16 or fp16, each tensor cast as it
    loads, or NF4 (QLoRA) quantised as it loads, computing in support.precision.nf4_dtype's dtype.
    With `on_meta` (plain LoRA only): the frozen weights stay on the meta device, in that dtype, unread;
    A and B are real, initialised as on a loaded model."""
    from lora import set_base_dtype

    from .precision import nf4_dtype, resolve_dtype

    if base_dtype == "nf4":
        return load_model_and_tokenizer(name, nf4_dtype(device), qlora_inject=inject)
    dtype = resolve_dtype(base_dtype, device, "--base-dtype")
    model, tokenizer, path = load_model_and_tokenizer(name, dtype, on_meta=on_meta)  # in that dtype: no fp32 copy
    inject(model)
    set_base_dtype(model, dtype)  # what the load kept in fp32 too (transformers keeps T5's wo there)
    if on_meta:
        allocate_adapters(model)
    return model, tokenizer, path


def load_base_shards(model, name: str, device: torch.device) -> None:
    """After support.fsdp.shard_model on a model load_with_lora built on the meta device: this rank's shards
    of the frozen weights, read tensor by tensor from the checkpoint of `name` (each full tensor only while
    its shard is cut from it), and A and B as they were."""
    from .fsdp import materialize

    if name.startswith(RANDOM):
        materialize(model, random_tensors(model), device)
        return
    try:
        materialize(model, checkpoint_tensors(checkpoint_files(resolve_model_path(name), local_only=True)), device)
    except (OSError, ValueError) as err:
        raise _could_not_load(name, err) from None


def _random_model(name: str, dtype: torch.dtype | None, qlora_inject, on_meta: bool):
    """load_model_and_tokenizer's model for `random:flan-t5-SIZE`: built from a seed, or on the meta device and
    filled from random_tensors where a checkpoint's tensors would be read (QLoRA)."""
    size = name.removeprefix(RANDOM).removeprefix("flan-t5-")
    if size not in FLAN_T5_SIZES:
        sizes = ", ".join(f"{RANDOM}flan-t5-{size}" for size in FLAN_T5_SIZES)
        raise ModelLoadError(f"no architecture called {name!r}; the random-weight ones are {sizes}.")
    if qlora_inject is None and not on_meta:
        torch.manual_seed(0)
        model = flan_t5_architecture(size)
        return model if dtype is None else model.to(dtype)
    model = flan_t5_architecture(size, device="meta")
    if qlora_inject is not None:
        qlora_inject(model)
        quantize_while_loading(model, random_tensors(model), dtype)
    return model


def random_tensors(model, seed: int = 0, std: float = 0.05):
    """(name, tensor) for every frozen parameter of `model`, drawn N(0, std²) from `seed` one at a time, in the
    order a checkpoint's would be read: a checkpoint's stand-in for timings and memory."""
    generator = torch.Generator().manual_seed(seed)
    frozen = [(key, param.shape) for key, param in model.named_parameters() if not param.requires_grad]
    for key, shape in frozen:
        yield key, torch.randn(shape, generator=generator) * std


def _could_not_load(name: str, err: Exception) -> ModelLoadError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"could not load model {name!r} ({reason[:200]}); pass a local directory saved with save_pretrained, "
        "or --model tiny for the offline test model."
    )


def _load_quantized(path: str, local_only: bool, dtype: torch.dtype, inject):
    from transformers import GenerationConfig

    files = checkpoint_files(path, local_only)
    model = build_on_meta(path)
    inject(model)
    quantize_while_loading(model, checkpoint_tensors(files), dtype)
    if (files[0].parent / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(files[0].parent)
    return model.eval()


def _in_hub_cache(name: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
