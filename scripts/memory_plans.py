"""The memory plan train.py prints, for every flan-t5 size, as a markdown table: which size fits a GPU of
16, 24, 40 or 80 GB, and with which options.

    python scripts/memory_plans.py                 # batch 8 (flan-t5's default), LoRA r=16 on q and v
    python scripts/memory_plans.py --batch-size 4

Each architecture is built from its config on the meta device (no weights, no memory), LoRA injected and
the base stored as each option stores it, then support.memory.plan_memory counts it, exactly as train.py
does before its first step: the frozen weights and the adapter's state exactly, the activations of the
largest batch estimated. The sequence lengths are the bundled training split's longest source and target
under the tiny model's tokenizer (flan-t5's needs the hub). The compute dtype is bf16, a GPU's.
A plan fits a GPU when it leaves 1 GiB of it for the CUDA context and the allocator's slack.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data import TRAIN_FILE, encode_examples, load_examples  # noqa: E402
from lora import inject_lora, set_base_dtype  # noqa: E402
from lora.nf4 import quantize_base  # noqa: E402
from support.architectures import FLAN_T5_SIZES, flan_t5_architecture  # noqa: E402
from support.memory import plan_memory  # noqa: E402
from support.models import load_model_and_tokenizer  # noqa: E402

OPTIONS = {  # train.py's options: (--base-dtype, --gradient-checkpointing)
    "fp32": ("fp32", False),
    "bf16 + ckpt": ("bf16", True),
    "nf4 + ckpt": ("nf4", True),
}
GPUS_GB = (16, 24, 40, 80)
HEADROOM = 2**30  # the CUDA context and the allocator's slack


def plans(size: str, batch: int, source: int, target: int) -> dict[str, int]:
    """The plan's total for each of OPTIONS, from one model: fp32, then cast to bf16, then quantised."""
    model = flan_t5_architecture(size, device="meta")
    inject_lora(model, ("q", "v"), r=16, alpha=32)
    totals = {}
    for name, (base_dtype, checkpointing) in OPTIONS.items():  # in the order fp32, bf16, nf4
        if base_dtype == "nf4":
            quantize_base(model, torch.bfloat16)
        set_base_dtype(model, torch.float32 if base_dtype == "fp32" else torch.bfloat16)
        totals[name] = plan_memory(model, batch, source, target, torch.bfloat16, checkpointing).total_bytes
    return totals


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=8, help="rows per step (default: 8)")
    args = parser.parse_args(argv)
    tokenizer = load_model_and_tokenizer("tiny")[1]  # the tiny model's, built once and cached
    rows, _ = encode_examples(load_examples(TRAIN_FILE), tokenizer)
    source, target = max(len(r.input_ids) for r in rows), max(len(r.labels) for r in rows)
    print(f"batch {args.batch_size} x {source}/{target} tokens, LoRA r=16 on q and v, bf16 compute\n")
    header = ["size", *(f"plan, {name}" for name in OPTIONS), *(f"{gb} GB" for gb in GPUS_GB)]
    print("| " + " | ".join(header) + " |")
    print("| --- " * (1 + len(OPTIONS) + len(GPUS_GB)) + "|")
    for size in FLAN_T5_SIZES:
        totals = plans(size, args.batch_size, source, target)
        fits = []
        for gb in GPUS_GB:  # the first option that fits: the one that gives up least
            fitting = [name for name, total in totals.items() if total + HEADROOM <= gb * 10**9]
            fits.append(fitting[0] if fitting else "no")
        cells = [f"{total / 2**30:.1f} GiB" for total in totals.values()]
        print(f"| flan-t5-{size} | " + " | ".join(cells) + " | " + " | ".join(fits) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
