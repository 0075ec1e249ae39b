"""The memory plan: what a LoRA training step will hold, estimated before the first step runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule

from lora.nf4 import nf4_bytes

from .fsdp import local

ADAM_BYTES_PER_TRAINABLE = 16  # fp32 parameter, gradient, and AdamW's two moments


@dataclass
class MemoryPlan:
    frozen_bytes: int  # the base weights this process holds, in their storage dtype (--fsdp: shards + 2 blocks)
    adapter_bytes: int  # A, B (and DoRA's m) with their gradients and AdamW state (exact)
    activation_bytes: int  # what autograd keeps for the backward pass of the largest batch (estimate)

    @property
    def total_bytes(self) -> int:
        return self.frozen_bytes + self.adapter_bytes + self.activation_bytes

    def describe(self) -> str:
        return (
            f"memory plan: {size(self.total_bytes)} = frozen weights {size(self.frozen_bytes)} "
            f"+ LoRA parameters, gradients and AdamW state {size(self.adapter_bytes)} "
            f"+ activations of the largest batch ~{size(self.activation_bytes)} (estimate)"
        )


def size(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def activation_bytes(
    config, batch_size: int, source_len: int, target_len: int, value_bytes: int, checkpointing: bool
) -> int:
    """What a gated T5 with LoRA on q and v keeps for its backward pass, from counting the tensors autograd
    saves in transformers' T5 as train.py builds it (train mode, dropout on, support/fast_modules.py's
    dropout and GELU), per token and layer, in values and in 1-byte dropout masks:

                                            values                                masks
        encoder layer, per source token:   3·ff + 4·d + 3·inner + 3·H·S          ff + 4·d
        decoder layer, per target token:   3·ff + 6·d + 4·inner + 3·H·T + 3·H·S  ff + 6·d
                       per source token:   2·inner (cross-attention's k and v)   d (v's LoRA input)
        LM head and loss, per target token: vocab

    d = d_model, inner = heads·d_kv, ff = d_ff, H = heads, S and T the source and target lengths; 3·ff is
    the gated-GELU's two projections and the GELU's output; the masks are the dropouts' on the block
    outputs, the feed-forward's inside and LoRA's inputs (torch's own dropout keeps them as 4-byte floats
    on the CPU, transformers' six-operation GELU 4·ff more); the H·S and H·T terms are attention scores,
    softmax and dropout. Values take 4 bytes in fp32. With a bf16 or fp16 base (value_bytes 2) only the
    feed-forward's 3·ff values and the block inputs take 2: T5's norms compute in fp32, LoRA's branch
    takes its input in A's fp32, and on the CPU SDPA's math path upcasts attention to fp32 (on CUDA the
    fused attention kernels keep less: an overestimate there). All times batch_size. With activation
    checkpointing only each block's input (d values per token) is kept, plus one block's activations
    while it is recomputed. tests/test_memory.py holds it to the bytes of the tensors autograd saves on
    tiny T5 shapes (within 3% in fp32, 8% with a bf16 base); without dropout it overestimates.
    """
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    heads, vocab, S, T = config.num_heads, config.vocab_size, source_len, target_len
    vb, fp32 = value_bytes, 4  # vb: the feed-forward's values and the block inputs; fp32: the rest
    encoder_layer = S * (vb * 3 * ff + fp32 * (4 * d + 3 * inner + 3 * heads * S) + ff + 4 * d)
    decoder_layer = T * (vb * 3 * ff + fp32 * (6 * d + 4 * inner + 3 * heads * T + 3 * heads * S) + ff + 6 * d)
    decoder_layer += S * (fp32 * 2 * inner + d)
    head = T * vocab * fp32
    if checkpointing:
        block_inputs = (config.num_layers * S * d + config.num_decoder_layers * T * d) * vb
        per_row = block_inputs + max(encoder_layer, decoder_layer) + head
    else:
        per_row = config.num_layers * encoder_layer + config.num_decoder_layers * decoder_layer + head
    return batch_size * per_row


def plan_memory(
    model: torch.nn.Module,
    batch_size: int,
    source_len: int,
    target_len: int,
    compute_dtype: torch.dtype,
    checkpointing: bool,
) -> MemoryPlan:
    params = list(model.parameters())  # a tied tensor once
    held = [(local(p), p.requires_grad) for p in params]  # --fsdp: this rank's shards
    frozen = sum(t.numel() * t.element_size() for t, trainable in held if not trainable) + nf4_bytes(model)
    frozen += fsdp_gathered_bytes(model)
    adapter = sum(t.numel() for t, trainable in held if trainable) * ADAM_BYTES_PER_TRAINABLE
    base_dtype = next(p.dtype for p in params if not p.requires_grad and p.is_floating_point())
    value_bytes = min(torch.finfo(compute_dtype).bits, torch.finfo(base_dtype).bits) // 8  # a bf16 base: bf16
    activations = activation_bytes(model.config, batch_size, source_len, target_len, value_bytes, checkpointing)
    return MemoryPlan(frozen, adapter, activations)


def fsdp_gathered_bytes(model: torch.nn.Module) -> int:
    """Under FSDP, the full weights of the blocks being computed: the largest block's, twice (the one
    computing and the next one, gathered ahead). 0 for a model that is not sharded."""
    blocks = [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]
    sizes = [sum(p.numel() * p.element_size() for p in block.parameters()) for block in blocks]
    return 2 * max(sizes, default=0)


@dataclass(frozen=True)
class RunShape:
    """What of a training run the plan and its refusal depend on (train.py's options of the same names)."""

    batch_size: int
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    base_dtype: str = "auto"
    skip_memory_check: bool = False


def refusal(plan: MemoryPlan, free_bytes: int, run: RunShape) -> str | None:
    """A sentence saying why the plan does not fit in `free_bytes` and what would make it fit, or None."""
    if plan.total_bytes <= free_bytes:
        return None
    options = []
    if not run.gradient_checkpointing:
        options.append("--gradient-checkpointing")
    if run.base_dtype not in ("bf16", "fp16", "nf4"):
        options.append("--base-dtype bf16 (or nf4)")
    elif run.base_dtype != "nf4":
        options.append("--base-dtype nf4")
    options.append(f"a smaller --batch-size with a larger --grad-accum (now {run.batch_size} x {run.grad_accum})")
    return (
        f"this run needs about {plan.total_bytes / 2**30:.1f} GiB of GPU memory but {free_bytes / 2**30:.1f} GiB "
        f"is free; try {', '.join(options)}, or pass --skip-memory-check to start anyway."
    )


class MemoryPlanError(RuntimeError):
    """The run would not fit in the GPU's free memory."""


def check_plan(model, train_set, compute_dtype: torch.dtype, device: torch.device, run: RunShape) -> MemoryPlan:
    """The plan for the run's largest batch (its longest source and target; the buckets put the longest rows
    together); on CUDA, refuse a plan larger than the free memory unless run.skip_memory_check."""
    source_len = max(len(example.input_ids) for example in train_set)
    target_len = max(len(example.labels) for example in train_set)
    largest_batch = min(run.batch_size, len(train_set))  # a --batch-size past the data makes no larger batch
    plan = plan_memory(model, largest_batch, source_len, target_len, compute_dtype, run.gradient_checkpointing)
    if device.type == "cuda" and not run.skip_memory_check:
        problem = refusal(plan, torch.cuda.mem_get_info(device)[0], run)
        if problem:
            raise MemoryPlanError(problem)
    return plan


def enable_activation_checkpointing(model, reentrant: bool = False) -> None:
    """Recompute each T5 block's activations in the backward pass instead of keeping them.

    Non-reentrant by default: with reentrant checkpointing and a frozen embedding, the blocks' inputs do not
    require grad, and the LoRA weights inside the blocks get no gradient at all. transformers renamed the
    switch in 5.x (gradient_ -> activation_checkpointing_enable); both spellings are handled.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
