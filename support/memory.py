"""The memory plan: what a LoRA training step will hold, estimated before the first step runs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADAM_BYTES_PER_TRAINABLE = 16  # fp32 parameter, gradient, and AdamW's two moments


@dataclass
class MemoryPlan:
    frozen_bytes: int  # the base weights, in their storage dtype (exact)
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
    saves in transformers' T5 (train mode, dropout on), per token and layer:

        encoder layer, per source token:   7·ff + 8·d + 3·inner + 3·H·S
        decoder layer, per target token:   7·ff + 12·d + 4·inner + 3·H·T + 3·H·S
                       per source token:   2·inner + d     (cross-attention's k and v, v's LoRA input)
        LM head and loss, per target token: vocab

    d = d_model, inner = heads·d_kv, ff = d_ff, H = heads, S and T the source and target lengths; 7·ff is
    the gated-GELU's two projections, its tanh-GELU and their product with dropout; the H·S and H·T
    terms are attention scores, softmax and dropout. Times batch_size and value_bytes (4 in fp32, 2
    under bf16/fp16 autocast, which leaves norms and the loss in fp32: an underestimate there).
    With activation checkpointing only each block's input (d per token) is kept, plus one block's
    activations while it is recomputed. Measured against the bytes of the tensors autograd saves, on
    four tiny T5 shapes, it is within 1.3% without checkpointing (tests/test_memory.py checks 3%);
    without dropout it overestimates (by about 25% on the tiny model).
    """
    d, inner, ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
    heads, vocab, S, T = config.num_heads, config.vocab_size, source_len, target_len
    encoder_layer = S * (7 * ff + 8 * d + 3 * inner + 3 * heads * S)
    decoder_layer = T * (7 * ff + 12 * d + 4 * inner + 3 * heads * T + 3 * heads * S) + S * (2 * inner + d)
    head = T * vocab
    if checkpointing:
        block_inputs = config.num_layers * S * d + config.num_decoder_layers * T * d
        per_row = block_inputs + max(encoder_layer, decoder_layer) + head
    else:
        per_row = config.num_layers * encoder_layer + config.num_decoder_layers * decoder_layer + head
    return batch_size * value_bytes * per_row


def plan_memory(
    model: torch.nn.Module,
    batch_size: int,
    source_len: int,
    target_len: int,
    compute_dtype: torch.dtype,
    checkpointing: bool,
) -> MemoryPlan:
    params = list(model.parameters())  # a tied tensor once
    frozen = sum(p.numel() * p.element_size() for p in params if not p.requires_grad)
    adapter = sum(p.numel() for p in params if p.requires_grad) * ADAM_BYTES_PER_TRAINABLE
    base_dtype = next(p.dtype for p in params if not p.requires_grad and p.is_floating_point())
    value_bytes = min(torch.finfo(compute_dtype).bits, torch.finfo(base_dtype).bits) // 8  # a bf16 base: bf16
    activations = activation_bytes(model.config, batch_size, source_len, target_len, value_bytes, checkpointing)
    return MemoryPlan(frozen, adapter, activations)


def refusal(plan: MemoryPlan, free_bytes: int, args) -> str | None:
    """A sentence saying why the plan does not fit in `free_bytes` and what would make it fit, or None."""
    if plan.total_bytes <= free_bytes:
        return None
    options = []
    if not args.gradient_checkpointing:
        options.append("--gradient-checkpointing")
    if args.base_dtype not in ("bf16", "fp16"):
        options.append("--base-dtype bf16")
    options.append(f"a smaller --batch-size with a larger --grad-accum (now {args.batch_size} x {args.grad_accum})")
    return (
        f"this run needs about {plan.total_bytes / 2**30:.1f} GiB of GPU memory but {free_bytes / 2**30:.1f} GiB "
        f"is free; try {', '.join(options)}, or pass --skip-memory-check to start anyway."
    )


class MemoryPlanError(RuntimeError):
    """The run would not fit in the GPU's free memory."""


def check_plan(model, train_set, compute_dtype: torch.dtype, device: torch.device, args) -> MemoryPlan:
    """The plan for the run's largest batch (its longest source and target; the buckets put the longest rows
    together); on CUDA, refuse a plan larger than the free memory unless --skip-memory-check."""
    source_len = max(len(example.input_ids) for example in train_set)
    target_len = max(len(example.labels) for example in train_set)
    plan = plan_memory(model, args.batch_size, source_len, target_len, compute_dtype, args.gradient_checkpointing)
    if device.type == "cuda" and not args.skip_memory_check:
        problem = refusal(plan, torch.cuda.mem_get_info(device)[0], args)
        if problem:
            raise MemoryPlanError(problem)
    return plan
