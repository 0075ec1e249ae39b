"""Two processes: what each rank holds and peaks at in a LoRA step, DDP against FSDP2 (train.py --fsdp)."""

from __future__ import annotations

import statistics

from support.tiny_model import TINY

from .harness import run_worker


def bench_distributed(args, rows, batch_indices) -> list[dict]:
    """8: LoRA (r=16 on q, v; AdamW) on 2 gloo processes of 1 thread, a fresh torchrun per configuration:
    per rank, the frozen weights it holds (its shards under FSDP), its peak RSS while building the model
    and while stepping, and the median step. flan-t5-base's architecture at the bundled data's lengths."""
    results = []
    for parallel in ("ddp", "fsdp"):
        spec = {
            "model": TINY if args.quick else "flan-t5-base",
            "mode": "lora",
            "tokenizer": args.tokenizer,
            "warmup": args.warmup,
            "reps": args.reps,
            "parallel": parallel,
            "return_freed_memory": True,
        }  # fmt: skip  (the loaded model's freed pages go back to the OS)
        spec.update({"shape": [2, 8, 16]} if args.quick else {"batches": [batch_indices] * args.reps})
        for out in sorted(run_worker(spec)["ranks"], key=lambda r: r["rank"]):
            results.append(
                {
                    "parallel": "DDP" if parallel == "ddp" else "FSDP2 (--fsdp)",
                    "rank": out["rank"],
                    "frozen_held_mib": out["frozen_held_mib"],
                    "load_peak_mib": out["load_peak_mib"],
                    "step_peak_mib": out["step_peak_mib"],
                    "median_step_s": statistics.median(out["times"]),
                }
            )
    return results
