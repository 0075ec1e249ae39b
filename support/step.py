"""One optimizer step: the loss over a step's micro-batches, accumulation, clipping, the finite check, and the
undo of an update that overflowed."""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import IGNORE_INDEX

from . import distributed as dist
from .fast_modules import lm_head_on
from .fsdp import local
from .precision import autocast


@dataclass
class StepResult:
    loss_sum: float  # summed token cross-entropy over all processes' micro-batches
    supervised_tokens: float  # labels != -100, over all processes' micro-batches
    grad_norm: float  # before clipping; nan when the step had nothing to learn from
    skipped: str | None = None  # why no update was made, if none was


def train_step(model, optimizer, scaler, micro_batches: list[dict], *, device, dtype, max_grad_norm) -> StepResult:
    """One optimizer step over `micro_batches` (this process's share of the global batch).

    The loss is the global per-token mean: each micro-batch's summed cross-entropy divided by the
    supervised tokens of the whole step on every process, so accumulation and data parallelism give
    the gradient of one big batch. Order: scale -> backward (per micro-batch) -> unscale -> clip ->
    finite check -> step or skip -> scaler update -> zero_grad.
    """
    world_size = dist.world_size()
    local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    (global_tokens,) = dist.all_reduce_sum([float(local_tokens)], device)
    if global_tokens == 0:  # cross-entropy would be 0/0: nothing to learn from this step
        return StepResult(0.0, 0.0, math.nan, skipped="the batch has no supervised token")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    step_loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # sums as all_reduce_sum does
    for i, batch in enumerate(micro_batches):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        last = i == len(micro_batches) - 1
        no_sync = getattr(model, "no_sync", None)  # DDP all-reduces gradients on the last micro-batch only
        if hasattr(model, "set_requires_gradient_sync"):  # and FSDP reduce-scatters them then
            model.set_requires_gradient_sync(last)
        with nullcontext() if last or no_sync is None else no_sync(), autocast(device, dtype):
            loss_sum = sequence_loss_sum(model, batch)
        # DDP averages gradients over ranks: scaling by world_size gives the global per-token mean.
        scaler.scale(loss_sum * world_size / global_tokens).backward()
        step_loss_sum += loss_sum.detach().double()
    scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
    grad_norm = dist.clip_grad_norm(params, max_grad_norm)  # the same on any number of processes
    (step_loss_sum,) = dist.all_reduce_sum([step_loss_sum.item()], device)
    skipped = None
    if math.isfinite(step_loss_sum / global_tokens) and math.isfinite(grad_norm):
        before = snapshot(optimizer)
        scaler.step(optimizer)
        finite = dist.every_rank(all_finite(params), device)  # each rank checks its own shards
        if not finite:  # finite gradients, yet the update overflowed: undo it
            restore(optimizer, before)
            skipped = "the update made the adapter non-finite"
    else:  # no update: the adapter and the optimizer state stay as the last good step left them
        skipped = f"non-finite loss {step_loss_sum / global_tokens} or grad norm {grad_norm}"
    scaler.update()  # in fp16, backs the scale off after an inf
    optimizer.zero_grad(set_to_none=True)
    return StepResult(step_loss_sum, global_tokens, grad_norm, skipped)


def sequence_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the per-token cross-entropy over supervised tokens (labels != -100), in fp32.

    The LM head and the softmax run on the supervised positions only: a padded position would cost a
    projection onto the whole vocabulary (32,128 words) and its softmax, to be ignored by the loss.
    """
    labels = batch["labels"]  # (B, T)
    supervised = labels != IGNORE_INDEX  # (B, T)
    with lm_head_on(model, supervised):
        logits = model(
            input_ids=batch["input_ids"],  # (B, S)
            attention_mask=batch["attention_mask"],  # (B, S)
            decoder_input_ids=batch["decoder_input_ids"],  # (B, T); no labels, so the model computes no loss
            use_cache=False,  # training reuses no key/value cache
        ).logits  # (N, V): the N supervised positions, in the order of labels[supervised]
    return F.cross_entropy(logits.float(), labels[supervised], reduction="sum")


def snapshot(optimizer: torch.optim.Optimizer) -> list:
    """An in-memory copy of the parameters an optimizer updates and of its state, for `restore`."""
    return [
        (p, p.detach().clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()})
        for group in optimizer.param_groups
        for p in group["params"]
    ]


@torch.no_grad()
def restore(optimizer: torch.optim.Optimizer, saved: list) -> None:
    for param, value, state in saved:
        param.copy_(value)
        optimizer.state[param] = state


def all_finite(params) -> bool:
    """Whether this rank's values of `params` (its shards, under FSDP) are all finite."""
    return bool(torch.stack([torch.isfinite(local(p)).all() for p in params]).all())
