"""--precision to a dtype, and the autocast context that applies it.

fp32 on the CPU; bf16 on a CUDA GPU that has it; fp16 only on CUDA (T5 overflows in fp16, so train.py
pairs it with a gradient scaler and a warning).
"""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

from . import fast_modules
from .cli import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(precision: str, device: torch.device, option: str = "--precision") -> torch.dtype:
    """'auto' is bf16 on a CUDA GPU that supports it, else fp32; refuses what `device` cannot run."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise UsageError(f"{option} fp16 needs a CUDA GPU; on the CPU use fp32 or bf16.")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"this GPU has no bf16: use {option} fp32 (or fp16, which T5 overflows in).")
    return DTYPES[precision]


def nf4_dtype(device: torch.device) -> torch.dtype:
    """What an NF4 base (--base-dtype nf4) computes in: bf16 where the hardware has it (a CUDA GPU with bf16,
    a CPU with bf16 matrix instructions), else fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if fast_modules.cpu_has_bf16_matmul() else torch.float32


def training_dtype(precision: str, device: torch.device) -> torch.dtype:
    """resolve_dtype for training: warns about fp16, and about bf16 on a CPU without bf16 matrix instructions."""
    dtype = resolve_dtype(precision, device)
    if dtype == torch.float16:
        warnings.warn(
            "fp16: T5 overflows in half precision (inf after the feed-forward, then NaN); the gradient "
            "scaler and NaN guards skip such steps, but prefer --precision bf16.",
            stacklevel=2,
        )
    if dtype == torch.bfloat16 and device.type == "cpu" and not fast_modules.cpu_has_bf16_matmul():
        warnings.warn(
            "--precision bf16: this CPU has no bf16 matrix instructions, so bf16 autocast makes its matmuls "
            "many times slower than fp32; use --precision fp32 (--base-dtype bf16 still halves the weights' memory).",
            stacklevel=2,
        )
    return dtype


def allow_tf32(device: torch.device) -> None:
    """On CUDA, let fp32 matmuls and convolutions (the adapter's, the loss's) run as TF32, for this whole
    process: torch keeps the switch globally, so the training recipe sets it, where a reader sees it."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Mixed precision in `dtype` for the ops autocast covers; plain fp32 when dtype is fp32."""
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
