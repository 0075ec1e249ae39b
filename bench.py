"""Benchmarks: LoRA against full fine-tuning, bucketed batches against padding to 128, our layer against
PEFT's, merged inference against the base model, and training throughput with model FLOPs utilisation
(bf16 against fp32, with and without torch.compile, on CUDA), LoRA's variants (DoRA, PiSSA), and the
memory of bigger bases (bf16 base, activation checkpointing, on flan-t5-xl). Prints markdown tables.

    python bench.py                 # flan-t5-base's architecture with random weights (timings don't depend on values)
    python bench.py --quick         # the tiny model, a few repetitions, no fresh processes: checks the script works
    python bench.py --only serving --figures docs/figures   # serve.py under 1 to 64 concurrent clients (tiny model)

Every timing is the median of several repetitions after warm-up runs. Training-step memory is measured
in a fresh process per configuration (CUDA: max allocated; CPU: the process's resident set sampled every
millisecond while the steps run, so that building the model does not count); --quick measures in its own
process, its figures being no measurements. Sequence
lengths come from the bundled training split tokenised with --tokenizer (default: the tiny model's
tokenizer, since flan-t5's needs the hub; pass a local flan-t5 directory to use its lengths).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.distributed import bench_distributed
from benchmarks.epoch import (
    bench_epoch,
    forward_matmul_flops,  # noqa: F401  (the tests' FLOP counter check)
)
from benchmarks.harness import encoded_rows, hardware, peft_installed, worker
from benchmarks.inference import bench_inference
from benchmarks.memory import bench_memory
from benchmarks.profile import bench_profile
from benchmarks.serving import bench_serving, plot_serving
from benchmarks.training import bench_ours_vs_peft, bench_throughput, bench_train_step
from benchmarks.variants import bench_variants
from data import LengthBucketSampler, bucket_key
from support.cli import EXIT_USAGE
from support.files import atomic_write_text
from support.tiny_model import TINY


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = ["| " + " | ".join(title for title, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append(
            "| "
            + " | ".join(
                ("n/a" if row[key] is None else format(row[key], fmt)) if fmt else str(row[key])
                for _, key, fmt in columns
            )
            + " |"
        )
    return "\n".join(lines)


@dataclass(frozen=True)
class Section:
    """One table of the report: its JSON key, its heading, what measures it, and its columns (title, key,
    format)."""

    key: str
    heading: str  # may name {new_tokens}
    measure: Callable[[argparse.Namespace, list, list], list[dict]]  # (args, rows, one batch's indices)
    columns: list[tuple[str, str, str]]


SECTIONS = {
    "train": Section(
        "train_step",
        "Training step: LoRA (r=16 on q, v) vs full fine-tuning, AdamW, one batch",
        bench_train_step,
        [("mode", "mode", ""), ("trainable params", "trainable", ","), ("median step (s)", "median_step_s", ".3f"),
         ("peak memory (MiB)", "peak_mib", ",.0f")],
    ),
    "peft": Section(
        "ours_vs_peft",
        "Training step: ours vs PEFT's LoRA with T5's own loss, alternated in one process",
        bench_ours_vs_peft,
        [("implementation", "implementation", ""), ("median step (s)", "median_step_s", ".3f"),
         ("ours / PEFT (median of pairs)", "ours_over_peft", ".3f")],
    ),
    "variants": Section(
        "variants",
        "LoRA's variants: training step (interleaved in one process), peak memory (fresh process each), "
        "PiSSA's SVD at injection",
        bench_variants,
        [("variant", "variant", ""), ("trainable params", "trainable", ","),
         ("median step (s)", "median_step_s", ".3f"), ("vs LoRA", "vs_lora", "+.1%"),
         ("peak memory (MiB)", "peak_mib", ",.0f"), ("injection (s)", "init_s", ".2f")],
    ),
    "memory": Section(
        "memory",
        "Bigger bases: peak memory of a LoRA step with a bf16 or NF4 base and activation checkpointing",
        bench_memory,
        [("model", "model", ""), ("batch x source/target tokens", "tokens", ""), ("configuration", "config", ""),
         ("peak memory while training (MiB)", "step_peak_mib", ",.0f"),
         ("of which runtime (MiB)", "runtime_mib", ",.0f"),
         ("peak while building (MiB)", "load_peak_mib", ",.0f"), ("memory plan (MiB)", "plan_mib", ",.0f"),
         ("vs (a)", "vs_a", ".2f"), ("median step (s)", "median_step_s", ".2f"), ("timed steps", "steps", "")],
    ),
    "distributed": Section(
        "distributed",
        "Two processes: each rank's frozen weights and peak memory, DDP against FSDP2 (train.py --fsdp)",
        bench_distributed,
        [("parallel", "parallel", ""), ("rank", "rank", ""), ("frozen weights held (MiB)", "frozen_held_mib", ",.1f"),
         ("peak while building (MiB)", "load_peak_mib", ",.0f"), ("peak while training (MiB)", "step_peak_mib", ",.0f"),
         ("median step (s)", "median_step_s", ".2f")],
    ),
    "epoch": Section(
        "epoch",
        "One epoch of LoRA training: bucketed dynamic padding vs padding to 128",
        lambda args, rows, batch_indices: bench_epoch(args, rows),
        [("batches", "plan", ""), ("steps", "batches", ""), ("timed steps", "measured_batches", ""),
         ("epoch (s)", "epoch_s", ".1f"), ("real tokens/s", "real_tokens_per_s", ",.0f"),
         ("matmul TFLOP", "matmul_tflop", ".4g")],
    ),
    "inference": Section(
        "inference",
        "Inference: greedy, exactly {new_tokens} new tokens",
        lambda args, rows, batch_indices: bench_inference(args, rows),
        [("batch", "batch", ""), ("model", "model", ""), ("median (s)", "median_s", ".4f"),
         ("per query (s)", "per_query_s", ".4f"), ("vs base", "vs_base", "+.1%"), ("x unmerged", "vs_unmerged", ".2f")],
    ),
    "throughput": Section(
        "throughput",
        "Training throughput and model FLOPs utilisation (LoRA 2x, full 3x the forward matmul FLOPs of the "
        "real tokens; fp32 matmuls as TF32 on CUDA)",
        bench_throughput,
        [("mode", "mode", ""), ("precision", "precision", ""), ("compile", "compile", ""),
         ("median step (s)", "median_step_s", ".4f"), ("real tokens/s", "tokens_per_s", ",.0f"),
         ("model TFLOP/s", "tflops", ".3g"), ("MFU", "mfu", ".1%"), ("peak FLOP/s", "peak_flops", ".3g")],
    ),
    "profile": Section(
        "profile",
        "Where a LoRA step's time goes (torch.profiler, self CPU time, one thread)",
        bench_profile,
        [("operators", "family", ""), ("share", "share", ".1%"), ("ms per step", "ms_per_step", ",.0f"),
         ("calls per step", "calls_per_step", ""), ("largest", "largest", "")],
    ),
    "serving": Section(  # only with --only serving: always the tiny model, in server processes of its own
        "serving",
        "Serving: serve.py on the tiny model, 3 adapters, answers of up to {new_tokens} tokens",
        bench_serving,
        [("server", "server", ""), ("clients", "clients", ""), ("requests", "requests", ""),
         ("not answered once", "failed", ""), ("answers/s", "answers_per_s", ".1f"), ("p50 (s)", "p50_s", ".3f"),
         ("p99 (s)", "p99_s", ".3f")],
    ),
}  # fmt: skip
OPT_IN = {"serving"}  # run only when --only names them


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bench.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="tiny model and few repetitions: a smoke check, not figures")
    p.add_argument("--model", default="flan-t5-base", choices=["flan-t5-base", TINY], help="architecture to time")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory for sequence lengths (default: tiny's)")
    p.add_argument("--batch-size", type=int, default=8, help="training batch size (default: 8)")
    p.add_argument("--reps", type=int, default=10, help="timed repetitions per measurement (default: 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default: 3)")
    p.add_argument("--epoch-sample", type=int, default=20, help="batches timed per epoch plan (default: 20)")
    p.add_argument("--full-epoch", action="store_true", help="time every batch of both epochs instead of a sample")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per query (default: 64)")
    p.add_argument("--only", nargs="+", choices=list(SECTIONS), help="run only these sections")
    p.add_argument("--output", type=Path, help="also write the results as JSON here")
    p.add_argument("--figures", type=Path, help="write the serving section's plot (serving.png) in this directory")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def count_problem(args: argparse.Namespace) -> str | None:
    """The sentence that refuses a count no benchmark can use, if one is given."""
    for name in ("batch_size", "reps", "epoch_sample", "new_tokens"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}."
    if args.warmup < 0:
        return f"--warmup must be 0 or more, got {args.warmup}."
    if args.output is not None and (args.output.is_dir() or not args.output.parent.is_dir()):
        what = "is a directory" if args.output.is_dir() else "is in a directory that does not exist"
        return f"--output {args.output} {what}: name a JSON file in an existing directory."
    if args.output is not None and not os.access(args.output.parent, os.W_OK):
        return f"--output {args.output}: its directory is not writable; name a file you can write."
    if args.figures is not None:
        from lora.inspect import check_figure_place
        from support.cli import UsageError

        if "serving" not in (args.only or []):
            return "--figures draws the serving section's plot only: pass it with --only serving."
        if not args.figures.is_dir():
            return f"--figures {args.figures} is no directory: name an existing one."
        try:
            check_figure_place(args.figures, ["serving.png"], "bench.py", "--figures")
        except UsageError as err:
            return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = count_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.worker:
        sys.stdout.write(json.dumps(worker(json.loads(args.worker))) + "\n")  # one write: 2 ranks share stdout
        sys.stdout.flush()
        return 0
    if args.quick:
        args.model, args.reps, args.warmup, args.epoch_sample, args.new_tokens = TINY, 2, 1, 2, 8
    rows = encoded_rows(args.tokenizer)
    batch_indices = LengthBucketSampler([bucket_key(r) for r in rows], args.batch_size, seed=0).all_batches(0)[0]
    results = {"hardware": hardware(), "model": args.model, "batch_size": args.batch_size, "reps": args.reps,
               "warmup": args.warmup}  # fmt: skip
    print(
        f"# Benchmarks\n\n{hardware()}; model {args.model} (random weights), batch {args.batch_size}, "
        f"median of {args.reps} after {args.warmup} warm-up runs.\n",
        flush=True,
    )
    for name, section in SECTIONS.items():
        if (args.only and name not in args.only) or (name == "peft" and not peft_installed()):
            continue
        if name in OPT_IN and not args.only:
            continue
        results[section.key] = section.measure(args, rows, batch_indices)
        heading = section.heading.format(new_tokens=args.new_tokens)
        print(f"## {heading}\n\n{table(results[section.key], section.columns)}\n", flush=True)
        if name == "serving" and args.figures:
            plot_serving(results["serving"], args.figures / "serving.png")
    if args.output:
        try:
            atomic_write_text(args.output, json.dumps(results, indent=2) + "\n")
        except OSError as err:  # the tables above are printed: say what was not written
            print(
                f"error: could not write {args.output} ({err.strerror or err}); the results are above.", file=sys.stderr
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
