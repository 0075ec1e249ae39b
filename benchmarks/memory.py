"""Bigger bases: the peak memory of a LoRA step with a bf16 base and activation checkpointing, beside the plan."""

from __future__ import annotations

import statistics

import torch

from lora import set_base_dtype
from lora.nf4 import nf4_nbytes
from support.precision import nf4_dtype
from support.tiny_model import TINY

from .harness import device, model_shapes, peft_installed, run_worker

MEMORY_CONFIGS = (  # label, mode, base dtype, activation checkpointing
    ("(a) PEFT LoRA, fp32 base", "peft", "fp32", False),
    ("(b) ours, fp32 base", "lora", "fp32", False),
    ("(c) ours, bf16 base", "lora", "bf16", False),
    ("(d) ours, bf16 base + checkpointing", "lora", "bf16", True),
    ("(e) ours, NF4 base + checkpointing (QLoRA)", "lora", "nf4", True),
)


def bench_memory(args, rows, batch_indices) -> list[dict]:
    """7: what a bigger base needs. One LoRA step (r=16 on q, v; AdamW) per configuration, each in a fresh
    process: peak memory while the step ran (CPU: resident set sampled every ms; CUDA: max allocated),
    beside train.py's memory plan for the same configuration, and the step time. flan-t5-xl's architecture
    (that of bigscience/T0_3B) at batch 8, 32 source / 64 target tokens, then flan-t5-base's at the bundled
    data's lengths (CUDA: flan-t5-large and xl, both 8 x 32/64). On a CPU, xl gets one timed step (after
    the first): a step takes minutes there, and memory is the point."""
    on_cuda = torch.cuda.is_available()
    fixed = (args.batch_size, 32, 64)
    if args.quick:
        plans = [(TINY, (2, 8, 16))]
    elif on_cuda:
        plans = [("flan-t5-large", fixed), ("flan-t5-xl", fixed)]
    else:
        plans = [("flan-t5-xl", fixed), ("flan-t5-base", None)]
    real = [rows[i] for i in batch_indices]
    results = []
    for model_name, shape in plans:
        baseline = None
        xl_on_cpu = not on_cuda and model_name == "flan-t5-xl"
        batch, source_len, target_len = shape or (
            len(real),
            max(len(r.input_ids) for r in real),
            max(len(r.labels) for r in real),
        )
        for label, mode, base_dtype, checkpointing in MEMORY_CONFIGS:
            if (mode == "peft" and not peft_installed()) or (args.quick and label[:3] in ("(a)", "(c)")):
                continue  # --quick checks the code paths: (b), (d) and (e) between them take every one
            plan = memory_plan(model_name, base_dtype, checkpointing, batch, source_len, target_len)
            spec = {
                "model": model_name,
                "mode": mode,
                "tokenizer": args.tokenizer,
                "warmup": 0 if xl_on_cpu else args.warmup,
                "reps": 1 if xl_on_cpu else args.reps,
                "base_dtype": base_dtype,
                "checkpointing": checkpointing,
                "return_freed_memory": True,
            }
            spec.update({"shape": list(shape)} if shape else {"batches": [batch_indices] * spec["reps"]})
            out = run_worker(spec, in_process=args.quick)
            baseline = baseline or out["step_peak_mib"]
            results.append(
                {
                    "model": model_name,
                    "tokens": f"{batch} x {source_len}/{target_len}",
                    "config": label,
                    "step_peak_mib": out["step_peak_mib"],
                    "runtime_mib": out["runtime_mib"],
                    "load_peak_mib": out["load_peak_mib"],
                    "plan_mib": plan / 2**20,
                    "vs_a": out["step_peak_mib"] / baseline,
                    "median_step_s": statistics.median(out["times"]),
                    "steps": len(out["times"]),
                }
            )
    return results


def memory_plan(model_name: str, base_dtype: str, checkpointing: bool, batch: int, source: int, target: int) -> int:
    """train.py's memory plan (support/memory.py) for a configuration, in bytes, from the model's shapes."""
    from support.memory import plan_memory

    model = model_shapes(model_name)
    if base_dtype in ("bf16", "nf4"):  # nf4: what is not quantised is stored in the dtype it computes in
        set_base_dtype(model, torch.bfloat16 if base_dtype == "bf16" else nf4_dtype(device()))
    plan = plan_memory(model, batch, source, target, torch.float32, checkpointing)
    if base_dtype == "nf4":  # every linear layer but lm_head in 4 bits: its exact bytes for its dense ones
        weights = [m.weight for name, m in model.named_modules() if hasattr(m, "in_features") and "lm_head" not in name]
        plan.frozen_bytes += sum(nf4_nbytes(tuple(w.shape)) - w.numel() * w.element_size() for w in weights)
    return plan.total_bytes
