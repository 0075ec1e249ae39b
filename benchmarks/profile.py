"""Where a LoRA step's time goes: torch.profiler's self CPU time, by operator family."""

from __future__ import annotations

import time

import torch

from data import collate

from .harness import build_model, device, prepare_training, train_step

# Operator families of a training step's profile, by the name of the aten operator.
PROFILE_FAMILIES = {
    "matmul": ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm"),
    "dropout masks": ("aten::bernoulli_", "aten::uniform_", "aten::random_"),
    "cross-entropy": (
        "aten::_log_softmax",
        "aten::_log_softmax_backward_data",
        "aten::nll_loss_forward",
        "aten::nll_loss_backward",
    ),
    "elementwise": (
        "aten::mul",
        "aten::mul_",
        "aten::add",
        "aten::add_",
        "aten::pow",
        "aten::tanh",
        "aten::copy_",
        "aten::fill_",
        "aten::div",
        "aten::div_",
        "aten::mean",
        "aten::rsqrt",
        "aten::sub",
        "aten::sub_",
        "aten::masked_fill",
        "aten::where",
        "aten::zero_",
        "aten::sum",
        "aten::index_put_",
        "aten::masked_fill_",
        "aten::lt",
        "aten::ge",
        "aten::gt",
    ),
}


def bench_profile(args, rows, batch_indices) -> list[dict]:
    """8: where the time of one LoRA step goes (train.py's train_step, our LoRA on q, v, T5's dropout on),
    by operator family: self CPU time from torch.profiler over `reps` steps after `warmup`, on one thread."""
    from torch.profiler import ProfilerActivity, profile

    dev = device()
    model, optimizer = prepare_training(build_model(args.model).to(dev).train(), "lora")
    batch = {k: v.to(dev) for k, v in collate([rows[i] for i in batch_indices], 0).items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: each operator's time is its own, not its share of a pool
    try:
        for _ in range(args.warmup):
            train_step(model, optimizer, batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(args.reps):
                train_step(model, optimizer, batch)
            wall_us = (time.perf_counter() - start) * 1e6
    finally:
        torch.set_num_threads(threads)
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = max(wall_us, sum(e.self_cpu_time_total for e in events))
    family_of = {op: family for family, ops in PROFILE_FAMILIES.items() for op in ops}
    share, calls, top = {}, {}, {}
    for e in events:
        family = family_of.get(e.key, "other")
        share[family] = share.get(family, 0) + e.self_cpu_time_total
        calls[family] = calls.get(family, 0) + e.count
        top.setdefault(family, []).append((e.self_cpu_time_total, e.key))
    return [
        {
            "family": family if family != "other" else "other aten operators",
            "share": share.get(family, 0) / total,
            "ms_per_step": share.get(family, 0) / 1000 / args.reps,
            "calls_per_step": calls.get(family, 0) // args.reps,
            "largest": ", ".join(f"{key} {t / total:.1%}" for t, key in sorted(top.get(family, []))[::-1][:3]),
        }
        for family in [*PROFILE_FAMILIES, "other"]
    ] + [
        {
            "family": "outside aten operators (Python, NumPy's dropout masks, the profiler)",
            "share": 1 - sum(share.values()) / total,
            "ms_per_step": (total - sum(share.values())) / 1000 / args.reps,
            "calls_per_step": "",
            "largest": "",
        }
    ]
