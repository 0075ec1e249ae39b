"""train.py's command line: the options, their two default sets (flan-t5-base and tiny) and their checks.

Every check here runs before any data or model loads, so a bad value costs nothing.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from data import MAX_SOURCE_LEN, MAX_TARGET_LEN, TRAIN_FILE
from lora import check_lora_hyperparameters
from lora.pissa import pissa_niter

from .cli import UsageError
from .files import file_sha256
from .precision import default_device, resolve_dtype
from .tiny_model import TINY

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


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """train.py's options; the ones left unset take the defaults of --model (tiny or flan-t5)."""
    p = argparse.ArgumentParser(  # prog: train.py, or lora-t5-train as installed
        description=description,
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
        default="auto",
        help="validation rows for val_loss and the best adapter: a file, 'none' to skip, or 'auto' (default): the "
        "bundled validation split for the bundled training data, else a seeded tenth of --data held out",
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
    lora.add_argument(
        "--use-dora",
        action="store_true",
        help="DoRA: also train each weight row's magnitude (Liu et al. 2024); see lora/dora.py",
    )
    lora.add_argument(
        "--init",
        default="lora",
        metavar="{lora,pissa,pissa_niter_N}",
        help="how A and B start: lora (B = 0; default), or PiSSA from W0's top-r singular vectors, by an exact "
        "SVD (pissa) or a randomised one with N iterations (pissa_niter_4: fast on big layers); the saved "
        "adapter is then a rank-2r plain LoRA of the original base. See lora/pissa.py",
    )
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
    opt.add_argument(
        "--loraplus-lr-ratio",
        type=float,
        default=None,
        help="LoRA+: B learns this many times faster than A (the paper suggests 16; default: off)",
    )
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay on A and B (default: 0)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm to this (default: 1.0)")
    opt.add_argument(
        "--max-source-len",
        type=int,
        default=MAX_SOURCE_LEN,
        help=f"truncate prompts to this many tokens (default: {MAX_SOURCE_LEN})",
    )
    opt.add_argument(
        "--max-target-len",
        type=int,
        default=MAX_TARGET_LEN,
        help=f"truncate responses to this many tokens (default: {MAX_TARGET_LEN})",
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
        help="torch.compile the model, for CUDA: lengths are padded to multiples of 16 so it meets few shapes, "
        "a new shape compiles again (about 3 times a run) and the first step's time is logged apart; on a CPU "
        "it does not pay (see docs/training.md)",
    )
    opt.add_argument(
        "--base-dtype",
        choices=["auto", "fp32", "bf16", "fp16", "nf4"],
        default="auto",
        help="dtype the frozen base weights are stored in; A and B stay fp32. auto: bf16 on a CUDA GPU that has it "
        "(half the memory of fp32), else fp32. fp16 needs CUDA. nf4: QLoRA, every frozen linear layer but lm_head "
        "in 4-bit NormalFloat (lora/nf4.py), computing in bf16 where the hardware has it, else fp32; plain LoRA only",
    )
    opt.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="on CUDA, start even when the printed memory plan exceeds the GPU's free memory (it is an estimate)",
    )
    opt.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each T5 block's activations in the backward pass instead of keeping them: less memory, "
        "about one more forward pass of time; the gradients are the same",
    )
    multi = p.add_argument_group("several processes (under torchrun)")
    multi.add_argument(
        "--fsdp",
        action="store_true",
        help="shard the frozen base, A and B across the processes (FSDP2, fully_shard per T5 block) instead of "
        "copying the whole model to each (DDP, the default): for a base too big for one GPU. Each process reads "
        "only its shards of the checkpoint (with DoRA or PiSSA, which start from W0, it loads the base whole first)",
    )
    multi.add_argument(
        "--dist-timeout",
        type=float,
        default=300,
        help="seconds a process waits for the others in a collective before it stops, naming the process that "
        "stopped answering (default: 300)",
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
    """Refuse bad values, each with one sentence naming the option, before any data or model loads."""
    try:
        check_lora_hyperparameters(args.r, args.alpha, args.dropout)
    except ValueError as err:
        raise UsageError(f"{err} (--r, --alpha, --dropout)") from None
    if args.init != "lora":
        try:
            pissa_niter(args.init)
        except ValueError as err:
            raise UsageError(f"--init: {err}") from None
    checks = [
        (0 < args.lr <= 1, f"--lr must be positive and at most 1, got {args.lr}"),
        (args.epochs > 0, f"--epochs must be positive, got {args.epochs}"),
        (args.max_steps is None or args.max_steps > 0, f"--max-steps must be positive, got {args.max_steps}"),
        (args.batch_size > 0, f"--batch-size must be positive, got {args.batch_size}"),
        (args.grad_accum > 0, f"--grad-accum must be positive, got {args.grad_accum}"),
        (0 <= args.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}"),
        (0 <= args.weight_decay <= 10, f"--weight-decay must be in [0, 10], got {args.weight_decay}"),
        (
            args.loraplus_lr_ratio is None or 0 < args.loraplus_lr_ratio <= 1000,
            f"--loraplus-lr-ratio must be in (0, 1000], got {args.loraplus_lr_ratio}",
        ),
        (
            0 < args.max_grad_norm and math.isfinite(args.max_grad_norm),
            f"--max-grad-norm must be positive and finite, got {args.max_grad_norm}",
        ),
        (0 <= args.seed < 2**31, f"--seed must be in [0, 2**31), got {args.seed}"),
        (
            args.max_source_len > 1 and args.max_target_len > 1,
            "--max-source-len and --max-target-len must be at least 2",
        ),
        (
            args.log_every > 0 and args.keep_checkpoints > 0 and args.max_skipped_steps > 0,
            "--log-every, --keep-checkpoints and --max-skipped-steps must be positive",
        ),
        (  # None: once per epoch; 0 is not that, and not "never"
            all(every is None or every > 0 for every in (args.eval_every, args.save_every)),
            "--eval-every and --save-every must be positive (leave them out for once per epoch)",
        ),
        (not (args.resume and args.overwrite), "--resume and --overwrite contradict each other: pick one"),
        (args.dist_timeout > 0, "--dist-timeout must be a positive number of seconds"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message + ".")
    resolve_dtype(args.precision, default_device())  # refuses fp16 on the CPU, bf16 on a GPU without it
    if args.base_dtype == "nf4" and (args.use_dora or args.init != "lora"):
        raise UsageError(
            "--base-dtype nf4 takes plain LoRA: DoRA and PiSSA read or rewrite W0, which is stored in 4 bits; "
            "drop --use-dora / --init, or use --base-dtype bf16."
        )
    if args.fsdp:
        check_fsdp(args)
    if args.base_dtype != "nf4":
        resolve_dtype(args.base_dtype, default_device(), "--base-dtype")
    unknown = sorted(set(args.target_modules) - set(T5_LINEAR_NAMES))
    if unknown:
        raise UsageError(f"unknown target module(s) {unknown}: T5's linear layers are {', '.join(T5_LINEAR_NAMES)}.")


def check_fsdp(args: argparse.Namespace) -> None:
    """--fsdp needs several processes, and shards parameters only."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise UsageError(
            "--fsdp shards the model across processes, and this is one: start it with torchrun, e.g. "
            "torchrun --nproc_per_node 2 train.py --fsdp ..."
        )
    if args.base_dtype == "nf4":
        raise UsageError(
            "--fsdp shards parameters, and an NF4 base keeps its 4-bit weights as buffers that every process would "
            "hold whole: use --base-dtype bf16 with --fsdp, or nf4 without it."
        )
    if args.compile:
        raise UsageError("--fsdp and --compile cannot be combined yet: drop one of them.")


def run_config(args: argparse.Namespace, world_size: int) -> dict:
    """The run's settings as JSON values, as training_config.json records them, with a fingerprint of the
    training data so that --resume can tell when its contents changed."""
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["world_size"] = world_size
    config["batches_per_step"] = world_size * args.grad_accum  # with --batch-size, the global batch
    config["data_sha256"] = file_sha256(args.data) if Path(args.data).is_file() else None
    return config
