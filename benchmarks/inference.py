"""Inference: the base model against an unmerged and a merged adapter, and a mixed batch of two adapters."""

from __future__ import annotations

import statistics
import time
from contextlib import nullcontext

import torch

from data import collate
from lora import inject_lora, lora_layers, merge_lora
from lora.adapters import add_adapter, mixed_adapters

from .harness import build_model, device, sync


@torch.no_grad()
def bench_inference(args, rows) -> list[dict]:
    """4: greedy generation of exactly `max_new_tokens` tokens: base, unmerged adapter, merged adapter and,
    at batch 16, two adapters in one mixed batch (8 rows each, lora/adapters.py), all interleaved. The models
    are built outside inference mode, as infer.py and serve.py load them, and generate inside it."""
    import copy

    dev = device()
    base = build_model(args.model).to(dev).eval()
    unmerged = copy.deepcopy(base)
    inject_lora(unmerged)
    for layer in lora_layers(unmerged).values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)  # a trained-looking adapter, so merging changes the weights
    merged = copy.deepcopy(unmerged)
    merge_lora(merged)
    two = copy.deepcopy(unmerged)
    add_adapter(two, "second")
    for layer in lora_layers(two).values():
        torch.nn.init.normal_(layer.adapters["second"].lora_B, std=0.01)
    results = []
    for batch_size in (1, 16):
        half = ["default"] * (batch_size // 2) + ["second"] * (batch_size - batch_size // 2)
        runs = {  # name: (model, the context it generates in)
            "base": (base, nullcontext),
            "unmerged adapter": (unmerged, nullcontext),
            "merged adapter": (merged, nullcontext),
            **(
                {"2 adapters, mixed batch": (two, lambda names=half: mixed_adapters(two, names))}
                if batch_size > 1
                else {}
            ),
        }
        batch = collate(rows[:batch_size], 0)
        inputs = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev)}
        gen = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False, "num_beams": 1}
        for model, context in runs.values():
            for _ in range(args.warmup):
                with torch.inference_mode(), context():
                    model.generate(**inputs, **gen)
        times = {name: [] for name in runs}
        for _ in range(args.reps):  # interleaved, so drift in machine speed hits every model alike
            for name, (model, context) in runs.items():
                with torch.inference_mode(), context():
                    sync()
                    start = time.perf_counter()
                    model.generate(**inputs, **gen)
                    sync()
                times[name].append(time.perf_counter() - start)
        base_median = statistics.median(times["base"])
        unmerged_median = statistics.median(times["unmerged adapter"])
        for name in runs:
            median = statistics.median(times[name])
            results.append(
                {
                    "batch": batch_size,
                    "model": name,
                    "median_s": median,
                    "per_query_s": median / batch_size,
                    "vs_base": median / base_median - 1,
                    "vs_unmerged": median / unmerged_median,
                }
            )
    return results
