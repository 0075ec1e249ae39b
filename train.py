"""Fine-tune a T5 with LoRA on the banking data and write a PEFT-layout adapter.

    python train.py                                  # google/flan-t5-base, the original project's settings
    python train.py --model tiny --output-dir runs/tiny_lora   # offline smoke run on the tiny model
    torchrun --nproc_per_node 2 train.py ...         # data-parallel (NCCL on CUDA, gloo on the CPU)
    torchrun --nproc_per_node 2 train.py --fsdp ...  # the base sharded across the processes (FSDP2)

A plain PyTorch loop: no PEFT, no HF Trainer, no accelerate. Read it top to bottom: `train()` is the
recipe, `fit()` the loop; one optimizer step is `support/step.py`'s `train_step()`. The machinery (options,
checkpoints, the output directory, distributed helpers, metrics) is in `support/`, one job per file.
"""

from __future__ import annotations

import argparse
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from banking.grounding import grounding_for
from data import (
    IGNORE_INDEX,
    DataError,
    TrainingData,
    training_data,
    training_splits,
    warn_if_leaking,
    warn_if_unreadable,
)
from lora import AdapterError, inject_lora, lora_param_groups, save_adapter
from support import distributed as dist
from support import fsdp
from support.checkpoints import (
    CHECKPOINTS,
    CheckpointError,
    Progress,
    latest_checkpoint,
    load_checkpoint,
    load_checkpoint_adapter,
    rng_state,
    save_checkpoint,
)
from support.cli import UsageError, run_cli, stop_requests
from support.fast_modules import use_fast_modules
from support.lost_rank import LostRankError, naming_a_lost_rank, sigterm_ignored
from support.lr_schedule import step_schedule, warmup_then_linear_decay
from support.memory import MemoryPlanError, RunShape, check_plan, enable_activation_checkpointing
from support.metrics import (
    IntervalMeter,
    few_steps_note,
    run_summary,
    start_line,
    summary_line,
    write_metrics_and_plot,
)
from support.models import load_base_shards, load_with_lora
from support.precision import allow_tf32, autocast, training_dtype
from support.run_dir import BEST, OutputDirLock, prepare_output_dir, start_run
from support.step import sequence_loss_sum, train_step
from support.train_args import parse_args, run_config, validate_args


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: train, and turn the errors a user can meet into one line and an exit status."""
    args = parse_args(argv, description=__doc__)
    return run_cli(
        lambda: train(args),
        failures=(
            AdapterError,
            CheckpointError,
            MemoryPlanError,
            TrainingAborted,
            LostRankError,
        ),
        interrupted="the latest checkpoint (if any) is in the output directory; continue with --resume.",
        after_write_failure=" with --resume, which continues from the last checkpoint",
        refusals=(DataError,),  # ModelLoadError is a UsageError: both refuse before any work
    )


def train(args: argparse.Namespace, prepare_model=None) -> dict:
    """The recipe: arguments -> data -> model with LoRA -> optimizer -> loop -> save; returns a summary.
    `prepare_model(model)`, called once the model is built, lets tests install hooks."""
    validate_args(args)
    env = dist.setup_distributed(args.dist_timeout)
    lock = OutputDirLock(args.output_dir)  # rank 0 holds the directory until the run ends
    run, finished = None, False
    try:
        config = run_config(args, env.world_size)
        if env.world_size > 1:  # each node reads its own command line, data and code: they must agree
            dist.check_started_alike({**config, "code_version": dist.code_version()})
        resume_from = dist.on_main(
            lambda: lock.acquire() or prepare_output_dir(args.output_dir, args.resume, args.overwrite, config),
            env.is_main,
        )

        splits = training_splits(args.data, args.val_data, args.seed, env.world_size)  # refused before a model loads
        train_rows, val_rows, val_note = splits
        env.log(val_note)
        config["grounding"] = grounding_for(row["response"] for row in train_rows)  # what infer.py grounds

        model, tokenizer, base_path = build_lora_model(args, env)
        if prepare_model is not None:
            prepare_model(model)
        if resume_from is not None:
            load_checkpoint_adapter(resume_from, model)
        if args.fsdp:  # after LoRA and before the optimizer, which must see the sharded A and B
            fsdp.shard_model(model, env.device, env.world_size)
            if reads_base_in_shards(args):
                load_base_shards(model, base_path, env.device)
        run = setup_run(args, env, model, tokenizer, base_path, train_rows, val_rows)

        progress = Progress()
        if resume_from is not None:
            shard_state = (lambda state: fsdp.shard_optimizer_state(run.optimizer, state)) if args.fsdp else None
            progress, note = load_checkpoint(resume_from, run.optimizer, run.scheduler, run.scaler, env.device,
                                             env.rank, env.world_size, run.data.plan, shard_state)  # fmt: skip
            env.log(f"resumed from {resume_from} at step {progress.step}" + (f" ({note})" if note else ""))
        run.train_model = model if args.fsdp else dist.data_parallel(model)
        if args.compile:
            # transformers wraps each T5 layer type's forward in one shared function, which dynamo compiles once
            # per type and batch shape: past dynamo's default of 8 it would fall back to eager without a word.
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)  # process-wide
            run.train_model = torch.compile(run.train_model)
        if env.is_main:  # infer.py's default answer length covers the longest answer trained on
            config["longest_target_tokens"] = max(len(example.labels) for example in run.data.train_set)
            start_run(args.output_dir, config, tokenizer, replace=args.overwrite)

        start_time, first_step = time.perf_counter(), progress.step
        with naming_a_lost_rank(lambda: latest_checkpoint(args.output_dir), args.dist_timeout):
            with fsdp.view_warnings_silenced() if args.fsdp else nullcontext():
                aborted = fit(run, progress)

        # From here every rank must reach the meeting below: one that fails makes torchrun end the others, and
        # the survivors are to say which rank was lost, not die in silence (sigterm_ignored).
        with naming_a_lost_rank(lambda: latest_checkpoint(args.output_dir), args.dist_timeout), sigterm_ignored():
            with fsdp.full_adapter(model):  # under --fsdp every rank gathers; rank 0 writes
                if env.is_main:
                    save_adapter(model, args.output_dir, base_path, pissa_as_lora=True)  # PiSSA: for the original base
                    write_metrics_and_plot(args.output_dir, progress.history)
            steps_run, time_s = progress.step - first_step, time.perf_counter() - start_time
            summary = run_summary(model, progress, steps_run, time_s, run.validating, env.device)
            dist.every_rank(True, env.device)  # every rank got here: only then does the run say it succeeded
        env.log("\n" + summary_line(summary, args.output_dir))
        summary.update(output_dir=str(args.output_dir), aborted=aborted)
        if aborted:
            raise TrainingAborted(aborted)
        finished = True
        return summary
    finally:
        lock.release()
        if run is not None:
            run.train_model = None  # the DDP wrapper goes before the process group (see teardown_distributed)
        dist.teardown_distributed(env, finished)


class TrainingAborted(RuntimeError):
    """Training stopped on repeated non-finite steps."""


def build_lora_model(args: argparse.Namespace, env: dist.Distributed):
    """The base with LoRA injected, on its device, in train mode; the init (PiSSA's SVD too) from --seed."""
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    def inject(model):
        try:
            inject_lora(model, args.target_modules, args.r, args.alpha, args.dropout, args.use_rslora,
                        args.use_dora, args.init)  # fmt: skip
        except ValueError as err:  # e.g. --target-modules wi on a gated T5, whose layers are wi_0 and wi_1
            raise UsageError(f"--target-modules: {err}") from None

    on_meta = reads_base_in_shards(args)
    model, tokenizer, base_path = load_with_lora(args.model, args.base_dtype, env.device, inject, on_meta)
    use_fast_modules(model)  # the same dropout and GELU, computed faster (support/fast_modules.py)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)  # non-reentrant, or the LoRA weights would get no gradient
    if not args.fsdp:  # fully_shard moves each block's shards to the device, never the whole model at once
        model.to(env.device)
    model.train()
    torch.manual_seed(args.seed + env.rank)  # dropout differs by rank; LoRA's init came from the shared seed
    return model, tokenizer, base_path


def reads_base_in_shards(args: argparse.Namespace) -> bool:
    """Under --fsdp the base is built on the meta device, sharded, and each rank reads its shards of the
    checkpoint, so no rank ever holds the whole base; DoRA and PiSSA initialise from W0, so theirs is
    loaded whole, then sharded."""
    return args.fsdp and not args.use_dora and args.init == "lora"


@dataclass
class Run:
    """Everything the loop works with, built once by setup_run."""

    args: argparse.Namespace
    env: dist.Distributed
    model: torch.nn.Module  # the LoRA model, as saved
    train_model: torch.nn.Module  # what the step calls: the model, in DDP and compiled as asked
    base_path: str
    data: TrainingData  # this process's training and validation batches
    validating: bool  # whether any process has validation rows
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    dtype: torch.dtype
    total_steps: int


def setup_run(args, env, model, tokenizer, base_path, train_rows, val_rows) -> Run:
    """Tokenise, batch, and make the optimizer, schedule and gradient scaler."""
    # Lengths padded up to a multiple: 8 suits tensor cores; 16 bounds the shapes a compiled model meets.
    pad_multiple = 16 if args.compile else 8 if env.device.type == "cuda" else None
    lengths, share = (args.max_source_len, args.max_target_len), (args.grad_accum, env.rank, env.world_size)
    data = training_data(train_rows, val_rows, tokenizer, lengths, args.batch_size, pad_multiple, args.seed, *share)
    if any(data.truncated):
        env.log("note: {} training and {} validation rows were cut to the max lengths".format(*data.truncated))
    if env.is_main:  # warnings, once: rows in a script the tokenizer cannot read; validation rows trained on
        warn_if_unreadable(train_rows, data.train_set, tokenizer.unk_token_id, args.data)
        warn_if_leaking(args.data, args.val_data, train_rows, val_rows)
    total_steps = args.max_steps or args.epochs * data.plan.steps_per_epoch
    if note := few_steps_note(len(data.train_set), data.plan.steps_per_epoch, total_steps):  # too short to learn
        env.log(note)
    warmup_steps = int(args.warmup_ratio * total_steps)
    groups = lora_param_groups(model, args.lr, args.loraplus_lr_ratio)  # A and B, or LoRA+'s faster B
    optimizer = torch.optim.AdamW(groups, args.lr, weight_decay=args.weight_decay, fused=env.device.type == "cuda")
    scheduler = warmup_then_linear_decay(optimizer, warmup_steps, total_steps)
    dtype = training_dtype(args.precision, env.device)
    allow_tf32(env.device)  # on CUDA fp32 matmuls as TF32, for the whole process
    where = f"{env.world_size} x {env.device.type}"
    env.log(start_line(args.model, model, len(data.train_set), total_steps, where, dtype))
    run = RunShape(
        args.batch_size, args.grad_accum, args.gradient_checkpointing, args.base_dtype, args.skip_memory_check
    )
    env.log(check_plan(model, data.train_set, dtype, env.device, run).describe())  # on CUDA: refuses what won't fit
    scaler = torch.amp.GradScaler(env.device.type, enabled=dtype == torch.float16)
    return Run(args, env, model, model, base_path, data, bool(val_rows),
               optimizer, scheduler, scaler, dtype, total_steps)  # fmt: skip


def fit(run: Run, progress: Progress) -> str | None:
    """The loop: a train_step per step of the plan; logs, validation, checkpoints; why it stopped early.
    Which batches a step trains on, and whether it ends an epoch, come from its number alone (data.StepPlan),
    so a resumed run goes on exactly as the run that was never stopped."""
    args, env, plan = run.args, run.env, run.data.plan
    meter = IntervalMeter()
    compiling = args.compile
    bar = tqdm(
        total=run.total_steps, initial=progress.step, disable=not env.is_main, desc="training", unit="step",
        dynamic_ncols=True, mininterval=1.0,
    )  # fmt: skip
    with stop_requests() as stop, bar:
        while progress.step < run.total_steps:
            group = [run.data.batch(indices) for indices in plan.micro_batches(progress.step)]
            step_start = time.perf_counter()
            result = train_step(
                run.train_model, run.optimizer, run.scaler, group,
                device=env.device, dtype=run.dtype, max_grad_norm=args.max_grad_norm,
            )  # fmt: skip
            if compiling:  # its first step compiles the model: timed apart from the others
                env.log(f"--compile: the first step took {time.perf_counter() - step_start:.1f} s (compilation)")
                compiling = False
            step_schedule(run.scheduler)
            progress.step += 1
            bar.update(1)
            progress.count_step(result.loss_sum, result.supervised_tokens, skipped=result.skipped is not None)
            meter.add_step(group, env.world_size)
            if result.skipped:
                env.log(f"step {progress.step}: skipped, {result.skipped}")
            if progress.consecutive_skips >= args.max_skipped_steps:
                return (
                    f"stopped: {progress.consecutive_skips} consecutive steps had a non-finite loss or "
                    "gradient; the last good adapter is kept. Lower --lr, or use --precision bf16 or fp32."
                )
            if progress.step % args.log_every == 0 or progress.step == run.total_steps:
                epoch = round(plan.epochs_done(progress.step), 3)
                row = meter.row(progress.step, epoch, run.scheduler.get_last_lr()[0], result, progress)
                if row is not None:  # None when every step of the interval was skipped
                    bar.set_postfix(loss=f"{row['train_loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                meter = IntervalMeter()
            end_of_step(run, progress, bar, stop)
        return None


def end_of_step(run: Run, progress: Progress, bar, stop: list[str]) -> None:
    """Validation and a checkpoint, each when due after a step, and a stop request."""
    args, total = run.args, run.total_steps
    end_of_epoch = run.data.plan.ends_epoch(progress.step)
    eval_now = progress.step % args.eval_every == 0 if args.eval_every else end_of_epoch or progress.step == total
    if run.validating and eval_now:
        validate(run, progress, bar)
    save_now = progress.step % args.save_every == 0 if args.save_every else end_of_epoch
    stopping = dist.any_rank(bool(stop), run.env.device)  # Ctrl-C or SIGTERM: finish the step, save, stop
    if save_now or stopping:
        checkpoint(run, progress)
    if stopping:
        raise KeyboardInterrupt(
            f"{(stop or ['a signal'])[0]} at step {progress.step}: checkpoint saved in "
            f"{args.output_dir / CHECKPOINTS}; continue with --resume."
        )


@torch.no_grad()
def validation_loss(model, batches: list[dict], device: torch.device, dtype: torch.dtype) -> float:
    """Per-token loss over this process's batches, summed over all processes."""
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device, dtype):
            loss_sum += sequence_loss_sum(model, batch).item()
        tokens += int((batch["labels"] != IGNORE_INDEX).sum())
    model.train(was_training)
    loss_sum, tokens = dist.all_reduce_sum([loss_sum, tokens], device)
    return loss_sum / max(tokens, 1)


def validate(run: Run, progress: Progress, bar) -> None:
    """Validation loss; a new best is saved to best/."""
    val_loss = validation_loss(run.model, run.data.val_batches, run.env.device, run.dtype)
    epoch = round(run.data.plan.epochs_done(progress.step), 3)
    progress.history.append({"step": progress.step, "epoch": epoch, "val_loss": val_loss})
    if run.env.is_main:
        bar.write(f"step {progress.step}: val_loss {val_loss:.4f}")
    if val_loss < progress.best_val_loss:  # the same on every rank
        progress.best_val_loss = val_loss
        with fsdp.full_adapter(run.model):
            if run.env.is_main:
                save_adapter(run.model, run.args.output_dir / BEST, run.base_path, pissa_as_lora=True)


def checkpoint(run: Run, progress: Progress) -> None:
    states = dist.gather_to_main(rng_state(run.env.device))  # every rank's RNG, for an exact resume
    optimizer_state = fsdp.full_optimizer_state(run.optimizer)  # full tensors: any world size resumes it
    with fsdp.full_adapter(run.model):
        if run.env.is_main:
            save_checkpoint(
                run.args.output_dir, run.model, optimizer_state, run.scheduler, run.scaler,
                progress, states, run.base_path, run.args.keep_checkpoints,
            )  # fmt: skip
            write_metrics_and_plot(run.args.output_dir, progress.history)


if __name__ == "__main__":
    raise SystemExit(main())
