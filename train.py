"""Fine-tune a T5 with LoRA on the banking data and write a PEFT-layout adapter.

    python train.py                                  # google/flan-t5-base, the original project's settings
    python train.py --model tiny                     # offline smoke run on the tiny model, ~1 minute on a CPU
    torchrun --nproc_per_node 2 train.py ...         # data-parallel (NCCL on CUDA, gloo on the CPU)

A plain PyTorch loop: no PEFT, no HF Trainer, no accelerate. Read it from `main()` down.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from data import (
    IGNORE_INDEX,
    TINY,
    TRAIN_FILE,
    VALIDATION_FILE,
    DataError,
    LengthBucketSampler,
    ModelLoadError,
    bucket_key,
    collate,
    encode_examples,
    load_examples,
    load_model_and_tokenizer,
)
from lora import AdapterError, count_parameters, inject_lora, load_adapter, lora_layers, save_adapter
from lora.adapter_io import CONFIG_NAME, WEIGHTS_NAME, atomic_write, atomic_write_text

T5_LINEAR_NAMES = ("q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo", "lm_head")
# The tiny model is randomly initialised: at flan-t5's learning rate a 1-minute smoke run learns nothing.
# Its frozen random feed-forward layers also need adapting, at a higher rank: r=16 on q and v alone
# leaves the validation loss near 2.2 and no held-out answer right.
TINY_DEFAULTS = {
    "lr": 3e-3,
    "epochs": 4,
    "batch_size": 16,
    "warmup_ratio": 0.03,
    "r": 64,
    "alpha": 128,
    "target_modules": ["q", "k", "v", "o", "wi_0", "wi_1", "wo"],
}
FLAN_DEFAULTS = {
    "lr": 3e-4,
    "epochs": 5,
    "batch_size": 8,
    "warmup_ratio": 0.0,
    "r": 16,
    "alpha": 32,
    "target_modules": ["q", "v"],
}
RUN_CONFIG = "training_config.json"
CHECKPOINTS = "checkpoints"
# What must match for --resume to continue a run exactly.
RESUME_KEYS = (
    "model",
    "data",
    "r",
    "alpha",
    "dropout",
    "target_modules",
    "use_rslora",
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "precision",
    "seed",
    "max_source_len",
    "max_target_len",
    "world_size",
)


class UsageError(ValueError):
    """A command line or output directory we refuse before doing any work."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="With --model tiny, options left unset take the tiny model's own defaults (marked 'tiny:' above): "
        "its weights are random, and flan-t5's settings would make a smoke run pointless.",
    )
    p.add_argument(
        "--model",
        default="google/flan-t5-base",
        help="'tiny' (offline test model), a local directory saved with save_pretrained, or a hub name "
        "(default: google/flan-t5-base)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=TRAIN_FILE,
        help="training rows, JSONL or a JSON array (default: bundled train split)",
    )
    p.add_argument(
        "--val-data",
        default=str(VALIDATION_FILE),
        help="validation rows for val_loss and the best adapter; 'none' to skip (default: bundled validation split)",
    )
    p.add_argument(
        "--output-dir",
        type=Path,
        default=Path("banking_assistant_lora"),
        help="where the adapter, tokenizer, metrics, plot and checkpoints go (default: banking_assistant_lora)",
    )
    lora = p.add_argument_group("LoRA")
    lora.add_argument("--r", type=int, default=None, help="rank of the update B·A (default: 16; tiny: 64)")
    lora.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="scaling numerator: the update is scaled by alpha/r (default: 32; tiny: 128)",
    )
    lora.add_argument("--dropout", type=float, default=0.05, help="dropout on the LoRA branch's input (default: 0.05)")
    lora.add_argument(
        "--target-modules",
        nargs="+",
        default=None,
        metavar="NAME",
        help=f"linear layers to adapt, by last name component, from {', '.join(T5_LINEAR_NAMES)} "
        "(default: q v; tiny: q k v o wi_0 wi_1 wo)",
    )
    lora.add_argument("--use-rslora", action="store_true", help="scale by alpha/sqrt(r) instead of alpha/r")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default: 3e-4; tiny: 3e-3)")
    opt.add_argument("--epochs", type=int, default=None, help="passes over the training data (default: 5; tiny: 4)")
    opt.add_argument("--max-steps", type=int, default=None, help="optimizer steps to run; overrides --epochs")
    opt.add_argument(
        "--batch-size", type=int, default=None, help="rows per micro-batch per process (default: 8; tiny: 16)"
    )
    opt.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default: 1)")
    opt.add_argument(
        "--warmup-ratio", type=float, default=None, help="share of steps for linear warm-up (default: 0.0; tiny: 0.03)"
    )
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on A and B (default: 0)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (default: 1.0)")
    opt.add_argument(
        "--max-source-len", type=int, default=128, help="truncate prompts to this many tokens (default: 128)"
    )
    opt.add_argument(
        "--max-target-len", type=int, default=128, help="truncate responses to this many tokens (default: 128)"
    )
    opt.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="auto: bf16 autocast on a CUDA GPU that supports it, else fp32. fp16 needs CUDA and uses a "
        "gradient scaler; T5 overflows in fp16, so prefer bf16",
    )
    opt.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the model: for CUDA; the first steps of each new batch shape compile (minutes), "
        "and on the CPU it is slower than without",
    )
    opt.add_argument("--seed", type=int, default=42, help="seed for LoRA init, dropout and batch order (default: 42)")
    run = p.add_argument_group("logging and checkpoints")
    run.add_argument("--log-every", type=int, default=10, help="optimizer steps between metrics lines (default: 10)")
    run.add_argument("--eval-every", type=int, default=None, help="steps between validations (default: once per epoch)")
    run.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: once per epoch)")
    run.add_argument("--keep-checkpoints", type=int, default=2, help="how many recent checkpoints to keep (default: 2)")
    run.add_argument(
        "--max-skipped-steps",
        type=int,
        default=10,
        help="stop after this many consecutive steps with a non-finite loss or gradient (default: 10)",
    )
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --output-dir")
    args = p.parse_args(argv)
    defaults = TINY_DEFAULTS if args.model == TINY else FLAN_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Refuse bad values before any data or model loads."""
    checks = [
        (args.r > 0, f"--r must be a positive integer, got {args.r}"),
        (args.alpha > 0, f"--alpha must be positive, got {args.alpha}"),
        (0 <= args.dropout < 1, f"--dropout must be in [0, 1), got {args.dropout}"),
        (args.lr > 0 and math.isfinite(args.lr), f"--lr must be positive, got {args.lr}"),
        (args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.max_steps is None or args.max_steps > 0, f"--max-steps must be positive, got {args.max_steps}"),
        (args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}"),
        (args.grad_accum > 0, f"--grad-accum must be positive, got {args.grad_accum}"),
        (0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}"),
        (args.weight_decay >= 0, f"--weight-decay must be non-negative, got {args.weight_decay}"),
        (args.max_grad_norm > 0, f"--max-grad-norm must be positive, got {args.max_grad_norm}"),
        (
            args.max_source_len > 1 and args.max_target_len > 1,
            "--max-source-len and --max-target-len must be at least 2",
        ),
        (
            args.log_every > 0 and args.keep_checkpoints > 0 and args.max_skipped_steps > 0,
            "--log-every, --keep-checkpoints and --max-skipped-steps must be positive",
        ),
        ((args.eval_every or 1) > 0 and (args.save_every or 1) > 0, "--eval-every and --save-every must be positive"),
        (not (args.resume and args.overwrite), "--resume and --overwrite contradict each other: pick one"),
        (
            not (args.precision == "fp16" and not torch.cuda.is_available()),
            "--precision fp16 needs a CUDA GPU; on the CPU use fp32 or bf16",
        ),
        (
            not (args.precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported()),
            "this GPU has no bf16: use --precision fp32 (or fp16, which T5 overflows in)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message + ".")
    unknown = sorted(set(args.target_modules) - set(T5_LINEAR_NAMES))
    if unknown:
        raise UsageError(f"unknown target module(s) {unknown}: T5's linear layers are {', '.join(T5_LINEAR_NAMES)}.")


def run_config(args: argparse.Namespace, world_size: int) -> dict:
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["world_size"] = world_size
    return config


def prepare_output_dir(args: argparse.Namespace, config: dict) -> Path | None:
    """Refuse to overwrite another run; return the checkpoint to resume from, if any."""
    out = args.output_dir
    previous = out / RUN_CONFIG
    if args.resume:
        if not previous.is_file():
            raise UsageError(
                f"--resume: {out} holds no run to resume ({RUN_CONFIG} is missing); drop --resume to start one."
            )
        saved = json.loads(previous.read_text())
        differing = [k for k in RESUME_KEYS if saved.get(k) != config.get(k)]
        if differing:
            k = differing[0]
            raise UsageError(
                f"--resume: the run in {out} used {k}={saved.get(k)!r}, this command asks {k}={config.get(k)!r}; "
                "resume with the same settings, or pass --overwrite to start afresh."
            )
        return latest_checkpoint(out)
    if out.exists() and any(out.iterdir()):
        if not args.overwrite:
            raise UsageError(
                f"{out} already holds files (a previous run?); pass --resume to continue it, --overwrite "
                "to replace it, or choose another --output-dir."
            )
        for stale in (CHECKPOINTS, "best", "eval"):  # nothing of the old run may pass for the new one's
            shutil.rmtree(out / stale, ignore_errors=True)
        for name in (
            "metrics.jsonl",
            RUN_CONFIG,
            "training_loss.png",
            CONFIG_NAME,
            WEIGHTS_NAME,
        ):
            (out / name).unlink(missing_ok=True)
    return None


# ---------------------------------------------------------------------------------------------------------
# Distributed helpers: with one process they reduce to plain arithmetic.


def setup_distributed() -> tuple[int, int, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        return rank, world_size, device
    return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to 1, then linear decay towards 0 at total_steps; no step runs at a factor of 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / (total_steps - warmup_steps + 1))


def sequence_loss_sum(model, batch: dict) -> torch.Tensor:
    """Sum of the per-token cross-entropy over supervised tokens (labels != -100), in fp32."""
    logits = model(
        input_ids=batch["input_ids"],  # (B, S)
        attention_mask=batch["attention_mask"],  # (B, S)
        decoder_input_ids=batch["decoder_input_ids"],  # (B, T); no labels, so the model computes no loss
    ).logits  # (B, T, V)
    labels = batch["labels"]  # (B, T)
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


@torch.no_grad()
def evaluate(model, batches: list[dict], device: torch.device, autocast) -> float:
    """Per-token validation loss over this process's batches, summed over all processes."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            loss_sum += sequence_loss_sum(model, batch).item()
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train(was_training)
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: the adapter as safetensors, the rest as tensors and plain values for torch.load(weights_only=True).


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of this epoch already consumed
    skipped_steps: int = 0
    consecutive_skips: int = 0
    best_val_loss: float = math.inf
    first_train_loss: float | None = None
    history: list = field(default_factory=list)


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = sorted((output_dir / CHECKPOINTS).glob("step-*"))
    return steps[-1] if steps else None


def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(
    output_dir: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    progress: Progress,
    rng_states: list,
    base_model: str,
    keep: int,
) -> Path:
    """Write checkpoints/step-N atomically: build it in a temporary directory, then rename."""
    root = output_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{progress.step:08d}"
    staging = root / f".tmp-step-{progress.step:08d}"
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(model, staging, base_model)
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_states,
        "progress": {**progress.__dict__, "history": json.dumps(progress.history)},
    }
    torch.save(state, staging / "training_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, scaler, device: torch.device, rank: int) -> Progress:
    load_adapter(model, path)
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank], device)
    progress = Progress(**{**state["progress"], "history": json.loads(state["progress"]["history"])})
    return progress


# ---------------------------------------------------------------------------------------------------------


def write_metrics_and_plot(output_dir: Path, history: list[dict]) -> None:
    atomic_write_text(output_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
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
    ax.legend()
    fig.tight_layout()
    atomic_write(output_dir / "training_loss.png", lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def train(args: argparse.Namespace, prepare_model=None) -> dict:
    """Run one training job; return its summary. `prepare_model(model)` lets tests install hooks."""
    validate_args(args)
    rank, world_size, device = setup_distributed()
    is_main = rank == 0
    log = print if is_main else (lambda *a, **k: None)
    try:
        config = run_config(args, world_size)
        verdict = [None, None]  # (checkpoint to resume from, refusal)
        if is_main:
            try:
                verdict[0] = prepare_output_dir(args, config)
            except UsageError as err:
                verdict[1] = str(err)
        if dist.is_initialized():  # every rank needs rank 0's verdict on the output directory
            dist.broadcast_object_list(verdict, src=0)
        resume_from, refusal = verdict
        if refusal:
            raise UsageError(refusal)

        # Data first: a bad file is refused before a model loads.
        train_rows = load_examples(args.data)
        val_rows = [] if args.val_data.lower() == "none" else load_examples(args.val_data)

        # Model, tokenizer and adapter.
        torch.manual_seed(args.seed)
        random.seed(args.seed)
        model, tokenizer, base_path = load_model_and_tokenizer(args.model)
        inject_lora(
            model, args.target_modules, r=args.r, alpha=args.alpha, dropout=args.dropout, use_rslora=args.use_rslora
        )
        model.to(device).train()
        torch.manual_seed(args.seed + rank)  # dropout differs by rank; LoRA init came from the shared seed
        if prepare_model is not None:
            prepare_model(model)
        trainable, total = count_parameters(model)

        train_encoded, train_truncated = encode_examples(
            train_rows, tokenizer, args.max_source_len, args.max_target_len
        )
        val_encoded, val_truncated = encode_examples(val_rows, tokenizer, args.max_source_len, args.max_target_len)
        if train_truncated or val_truncated:
            log(
                f"note: {train_truncated} training and {val_truncated} validation rows were truncated to "
                f"{args.max_source_len}/{args.max_target_len} tokens"
            )
        pad_id, pad_multiple = tokenizer.pad_token_id, (8 if device.type == "cuda" else None)
        sampler = LengthBucketSampler(
            [bucket_key(e) for e in train_encoded], args.batch_size, seed=args.seed, rank=rank, world_size=world_size
        )
        val_batches = [
            collate(val_encoded[i : i + args.batch_size], pad_id, pad_multiple)
            for i in range(rank * args.batch_size, len(val_encoded), world_size * args.batch_size)
        ]

        # Optimizer and schedule.
        batches_per_epoch = len(sampler)
        steps_per_epoch = math.ceil(batches_per_epoch / args.grad_accum)
        total_steps = args.max_steps or args.epochs * steps_per_epoch
        warmup_steps = int(args.warmup_ratio * total_steps)
        lora_params = [p for layer in lora_layers(model).values() for p in layer.adapter_params().values()]
        optimizer = torch.optim.AdamW(
            lora_params, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda"
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup_steps, total_steps))
        autocast_dtype = resolve_precision(args.precision, device)
        if autocast_dtype == torch.float16:
            warnings.warn(
                "fp16: T5 overflows in half precision (inf after the feed-forward, then NaN); the gradient "
                "scaler and NaN guards skip such steps, but prefer --precision bf16.",
                stacklevel=1,
            )
        scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        def autocast():
            if autocast_dtype is None:
                return nullcontext()
            return torch.autocast(device.type, dtype=autocast_dtype)

        progress = Progress()
        if resume_from is not None:
            progress = load_checkpoint(resume_from, model, optimizer, scheduler, scaler, device, rank)
            log(f"resumed from {resume_from} at step {progress.step}")
        train_model = DistributedDataParallel(model) if world_size > 1 else model
        if args.compile:
            train_model = torch.compile(train_model)
        if is_main:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.output_dir / RUN_CONFIG, json.dumps(config, indent=2) + "\n")
            tokenizer.save_pretrained(args.output_dir)
        log(
            f"model {args.model}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%), "
            f"{len(train_encoded)} training rows, {total_steps} steps on {world_size} x {device.type}, "
            f"precision {autocast_dtype or torch.float32}"
        )

        def save_final(directory: Path) -> None:
            if is_main:
                save_adapter(model, directory, base_path)

        # The loop.
        start_time, interval_start = time.perf_counter(), time.perf_counter()
        interval = {"loss_sum": 0.0, "tokens": 0, "seen_tokens": 0}
        bar = tqdm(
            total=total_steps,
            initial=progress.step,
            disable=not is_main,
            desc="training",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )
        aborted = None
        while progress.step < total_steps and aborted is None:
            sampler.set_epoch(progress.epoch, progress.batch_in_epoch)
            epoch_batches = iter(list(sampler))
            while progress.step < total_steps:
                group = [
                    collate([train_encoded[i] for i in indices], pad_id, pad_multiple)
                    for indices in _take(epoch_batches, args.grad_accum)
                ]
                if not group:  # resumed exactly at an epoch's end
                    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                    break
                progress.batch_in_epoch += len(group)
                local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in group)
                (global_tokens,) = all_reduce_sum([float(local_tokens)], device)
                if global_tokens == 0:  # cross-entropy would be 0/0: nothing to learn from this group
                    progress.skipped_steps += 1
                    grad_norm = float("nan")
                    log(f"step {progress.step + 1}: skipped, the batch has no supervised token")
                else:
                    step_loss_sum = torch.zeros((), device=device)
                    for i, batch in enumerate(group):
                        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                        sync = i == len(group) - 1 or world_size == 1
                        with nullcontext() if sync else train_model.no_sync(), autocast():
                            loss_sum = sequence_loss_sum(train_model, batch)
                        # DDP averages gradients over ranks: scaling by world_size gives the global per-token mean.
                        scaler.scale(loss_sum * world_size / global_tokens).backward()
                        step_loss_sum += loss_sum.detach()
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm).item()
                    (step_loss_sum,) = all_reduce_sum([step_loss_sum.item()], device)
                    step_loss = step_loss_sum / global_tokens
                    if math.isfinite(step_loss) and math.isfinite(grad_norm):
                        scaler.step(optimizer)
                        progress.consecutive_skips = 0
                        interval["loss_sum"] += step_loss_sum
                        interval["tokens"] += global_tokens
                    else:  # no update: the adapter stays as it was after the last good step
                        progress.skipped_steps += 1
                        progress.consecutive_skips += 1
                        log(f"step {progress.step + 1}: skipped, non-finite loss {step_loss} or grad norm {grad_norm}")
                    scaler.update()  # in fp16, backs the scale off after an inf
                    optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                progress.step += 1
                source_tokens = sum(int(b["attention_mask"].sum()) for b in group)
                interval["seen_tokens"] += (source_tokens + local_tokens) * world_size
                bar.update(1)

                if progress.consecutive_skips >= args.max_skipped_steps:
                    aborted = (
                        f"stopped: {progress.consecutive_skips} consecutive steps had a non-finite loss or "
                        "gradient; the last good adapter is kept. Lower --lr, or use --precision bf16 or fp32."
                    )
                    break
                if progress.step % args.log_every == 0 or progress.step == total_steps:
                    elapsed = time.perf_counter() - interval_start
                    train_loss = interval["loss_sum"] / interval["tokens"] if interval["tokens"] else None
                    row = {
                        "step": progress.step,
                        "epoch": round(progress.epoch + progress.batch_in_epoch / batches_per_epoch, 3),
                        "train_loss": train_loss,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad_norm,
                        "skipped_steps": progress.skipped_steps,
                        "tokens_per_s": interval["seen_tokens"] / elapsed,
                    }
                    if train_loss is not None:
                        progress.history.append(row)
                        progress.first_train_loss = progress.first_train_loss or train_loss
                        bar.set_postfix(
                            loss=f"{train_loss:.3f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}"
                        )
                    interval, interval_start = {"loss_sum": 0.0, "tokens": 0, "seen_tokens": 0}, time.perf_counter()
                end_of_epoch = progress.batch_in_epoch >= batches_per_epoch
                last_step = progress.step == total_steps
                if args.eval_every:
                    eval_now = progress.step % args.eval_every == 0
                else:
                    eval_now = end_of_epoch or last_step
                if val_rows and eval_now:
                    val_loss = evaluate(model, val_batches, device, autocast)
                    progress.history.append(
                        {
                            "step": progress.step,
                            "epoch": progress.epoch + 1 if end_of_epoch else progress.epoch,
                            "val_loss": val_loss,
                        }
                    )
                    if is_main:
                        bar.write(f"step {progress.step}: val_loss {val_loss:.4f}")
                    if val_loss < progress.best_val_loss:
                        progress.best_val_loss = val_loss
                        save_final(args.output_dir / "best")
                if end_of_epoch:
                    progress.epoch, progress.batch_in_epoch = progress.epoch + 1, 0
                save_now = progress.step % args.save_every == 0 if args.save_every else end_of_epoch
                if save_now:
                    states = [rng_state(device)]
                    if dist.is_initialized():
                        states = [None] * world_size
                        dist.all_gather_object(states, rng_state(device))
                    if is_main:
                        save_checkpoint(
                            args.output_dir,
                            model,
                            optimizer,
                            scheduler,
                            scaler,
                            progress,
                            states,
                            base_path,
                            args.keep_checkpoints,
                        )
                        write_metrics_and_plot(args.output_dir, progress.history)
                if end_of_epoch:
                    break
        bar.close()

        save_final(args.output_dir)
        if is_main:
            write_metrics_and_plot(args.output_dir, progress.history)
        last_train = next((r["train_loss"] for r in reversed(progress.history) if "train_loss" in r), None)
        peak = peak_memory_mib(device)
        summary = {
            "trainable_parameters": trainable,
            "total_parameters": total,
            "trainable_share": trainable / total,
            "steps": progress.step,
            "skipped_steps": progress.skipped_steps,
            "time_s": time.perf_counter() - start_time,
            "first_train_loss": progress.first_train_loss,
            "final_train_loss": last_train,
            "best_val_loss": progress.best_val_loss if val_rows else None,
            "peak_memory_mib": peak,
            "output_dir": str(args.output_dir),
            "aborted": aborted,
        }
        log(
            f"\ntrainable parameters {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
            f"{progress.step} steps ({progress.skipped_steps} skipped) in {summary['time_s']:.1f} s; "
            f"train loss {_fmt(progress.first_train_loss)} -> {_fmt(last_train)}; best val loss "
            f"{_fmt(summary['best_val_loss'])}; peak memory {peak:.0f} MiB "
            f"({'max allocated' if device.type == 'cuda' else 'peak RSS'}); adapter in {args.output_dir}"
        )
        if aborted:
            raise TrainingAborted(aborted)
        return summary
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class TrainingAborted(RuntimeError):
    """Training stopped on repeated non-finite steps."""


def _take(iterator, n: int) -> list:
    return [item for _, item in zip(range(n), iterator)]


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isinf(value)) else f"{value:.4f}"


def peak_memory_mib(device: torch.device) -> float:
    """CUDA: the most memory tensors ever held on `device`; CPU: this process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        train(args)
    except (UsageError, DataError, ModelLoadError, AdapterError, TrainingAborted) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    except KeyboardInterrupt:
        print(
            "\ninterrupted: the latest checkpoint (if any) is in the output directory; continue with --resume.",
            file=sys.stderr,
        )
        return 130
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
