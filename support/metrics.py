"""What a run reports: metrics.jsonl, the loss plot, the loss and throughput of a log interval, peak memory."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from data import IGNORE_INDEX

from .files import atomic_write, atomic_write_text

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training_loss.png"


class IntervalMeter:
    """The tokens per second since the last log line (the interval's loss is kept in Progress, which a
    checkpoint saves, so that a resumed run logs the whole interval's)."""

    def __init__(self) -> None:
        self.seen_tokens = 0
        self.start = time.perf_counter()

    def add_step(self, micro_batches: list[dict], world_size: int) -> None:
        """The tokens a step read on every process."""
        seen = sum(int(b["attention_mask"].sum()) + int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
        self.seen_tokens += seen * world_size

    def tokens_per_s(self) -> float:
        return self.seen_tokens / (time.perf_counter() - self.start)

    def row(self, step: int, epoch: float, lr: float, last, progress) -> dict | None:
        """The interval's line of metrics.jsonl, added to progress.history; None if it taught nothing."""
        train_loss = progress.interval_train_loss()
        if train_loss is None:
            return None
        row = {
            "step": step,
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": lr,
            "grad_norm": last.grad_norm,  # the interval's last step's, before clipping
            "skipped_steps": progress.skipped_steps,
            "tokens_per_s": self.tokens_per_s(),
        }
        if last.skipped:
            row["last_step_skipped"] = last.skipped
        progress.history.append(row)
        progress.first_train_loss = progress.first_train_loss or train_loss
        return row


def write_metrics_and_plot(output_dir: Path, history: list[dict]) -> None:
    """metrics.jsonl (one JSON object per log line or validation) and training_loss.png, both atomically."""
    atomic_write_text(output_dir / METRICS_FILE, "".join(json.dumps(_finite_or_null(row)) + "\n" for row in history))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("per-token cross-entropy")
    ax.set_title("LoRA fine-tuning")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    atomic_write(output_dir / PLOT_FILE, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def _finite_or_null(row: dict) -> dict:
    """NaN and infinity are not JSON: write null (the row's skipped_steps and last_step_skipped say why)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory tensors ever held on `device`; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def fmt(value) -> str:
    """A loss for a log line: 4 decimals, or n/a when there is none."""
    return "n/a" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.4f}"


def run_summary(model, progress, steps_run: int, time_s: float, validated: bool, device: torch.device) -> dict:
    """What train() returns: parameter counts, steps (all, and the `steps_run` of this process, which took
    `time_s`), losses, time and memory."""
    from lora import count_parameters

    trainable, total = count_parameters(model)
    return {
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_share": trainable / total,
        "steps": progress.step,
        "steps_run": steps_run,  # fewer than steps after a --resume
        "skipped_steps": progress.skipped_steps,
        "time_s": time_s,
        "first_train_loss": progress.first_train_loss,
        "final_train_loss": next((r["train_loss"] for r in reversed(progress.history) if "train_loss" in r), None),
        "train_loss_rows": sum("train_loss" in r for r in progress.history),
        "best_val_loss": progress.best_val_loss if validated else None,
        "peak_memory_mib": peak_memory_mib(device),
        "peak_memory_kind": "max allocated" if device.type == "cuda" else "peak RSS",
    }


FEW_STEPS = 100  # fewer optimizer steps rarely teach a model even the form of an answer


def few_steps_note(rows: int, steps_per_epoch: int, total_steps: int) -> str | None:
    """A note for a run too short to learn much (a few dozen rows at the default epochs), else None."""
    if total_steps >= FEW_STEPS:
        return None
    epochs = math.ceil(2 * FEW_STEPS / steps_per_epoch)
    return (
        f"note: {rows} training rows make {steps_per_epoch} step(s) an epoch, {total_steps} in all: too few to "
        f"learn much (a few hundred steps is usual); pass --epochs {epochs} ({epochs * steps_per_epoch} steps) or "
        "--max-steps, and watch the validation loss."
    )


def start_line(model_name: str, model, rows: int, steps: int, where: str, dtype: torch.dtype) -> str:
    from lora import count_parameters

    trainable, total = count_parameters(model)
    return (
        f"model {model_name}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
        f"{rows} training rows, {steps} steps on {where}, precision {dtype}"
    )


def summary_line(summary: dict, output_dir: Path) -> str:
    s = summary
    resumed = f", the last {s['steps_run']} resumed here," if s["steps_run"] != s["steps"] else ""
    if s.get("train_loss_rows", 2) > 1:
        train_loss = f"train loss {fmt(s['first_train_loss'])} -> {fmt(s['final_train_loss'])}"
    else:  # a run shorter than --log-every logs one interval: one mean, not a first and a last
        train_loss = f"train loss {fmt(s['final_train_loss'])} (the mean of its one logged interval)"
    return (
        f"trainable parameters {s['trainable_parameters']:,} of {s['total_parameters']:,} "
        f"({100 * s['trainable_share']:.3f}%); {s['steps']} steps ({s['skipped_steps']} skipped){resumed} in "
        f"{s['time_s']:.1f} s; {train_loss}; "
        f"best val loss {fmt(s['best_val_loss'])}; peak memory {s['peak_memory_mib']:.0f} MiB "
        f"({s['peak_memory_kind']}); adapter in {output_dir}"
    )
