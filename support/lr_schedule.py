"""The learning-rate schedule: linear warm-up, then linear decay."""

from __future__ import annotations

import warnings

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then linear decay towards 0 at total_steps; no step runs at a factor of 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps + 1))


def warmup_then_linear_decay(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def step_schedule(scheduler: torch.optim.lr_scheduler.LRScheduler) -> None:
    """Advance the schedule by one step. It counts every step, skipped ones too: a first step skipped for a
    non-finite loss is no mistake, so torch's warning about a schedule stepped before its optimizer is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
        scheduler.step()
