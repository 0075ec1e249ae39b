"""Experiments on LoRA whose answer is known without a pretrained model, each a few seconds on a CPU; the
walkthrough (docs/lora-from-scratch.md) runs them, and

    python -m lora.experiments --out docs/figures

draws their figures (intrinsic_rank.png, rank_scaling.png).

- intrinsic_rank: a frozen layer whose target differs from it by an update of known rank k. LoRA at rank r
  recovers the update to rounding once r >= k; below, it finds the best rank-r approximation (Eckart-Young),
  and the subspace its A learned lines up with the update's (the paper's φ, lora.inspect's code).
- first_step_sizes: how far one AdamW step moves ΔW = s·B A from B = 0, for s = alpha, alpha/r and
  alpha/sqrt(r) (rsLoRA) as r grows: ∝ sqrt(r), 1/sqrt(r) and constant.
- step_zero: the output and loss at step 0 with B = 0 against both factors random.
- merge_timing: the forward of a flan-t5-base-sized layer (768 x 768, r=16), unmerged and merged.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .inspect import check_figure_place, save_figure, subspace_similarity
from .layer import LoRALinear

FIGURES = ("intrinsic_rank.png", "rank_scaling.png")
SCALINGS = {"alpha": lambda alpha, r: alpha, "alpha/r": lambda alpha, r: alpha / r,
            "alpha/sqrt(r)": lambda alpha, r: alpha / math.sqrt(r)}  # fmt: skip


def regression(d: int, k: int, rows: int = 512, seed: int = 0):
    """(W0, ΔW of rank k, X, Y = X (W0 + ΔW)ᵀ): a frozen layer and a target that differs from it by rank k."""
    generator = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d, d, generator=generator) / math.sqrt(d)
    delta = torch.randn(d, k, generator=generator) @ torch.randn(k, d, generator=generator) / d
    x = torch.randn(rows, d, generator=generator)
    return w0, delta, x, x @ (w0 + delta).T


def lora_on(w0: torch.Tensor, r: int, alpha: float, seed: int = 1) -> LoRALinear:
    """A LoRALinear over the frozen `w0`, its A drawn from `seed`, B zero."""
    torch.manual_seed(seed)
    base = nn.Linear(w0.shape[1], w0.shape[0], bias=False)
    with torch.no_grad():
        base.weight.copy_(w0)
    return LoRALinear.from_linear(base, r, alpha)


def intrinsic_rank(d: int = 32, k: int = 3, ranks=range(1, 9), seed: int = 0) -> list[dict]:
    """For each r: the relative error ‖s·B A − ΔW‖_F / ‖ΔW‖_F after fitting A and B to the targets
    (L-BFGS, full batch, to convergence), the smallest error any rank-r matrix can reach (the singular
    values ΔW loses when cut to rank r), and φ: how much of ΔW's input subspace A's rows span."""
    w0, delta, x, y = regression(d, k, seed=seed)
    sigma = torch.linalg.svdvals(delta)
    v_true = torch.linalg.svd(delta)[2][:k]  # (k, in): the directions ΔW reads
    rows = []
    for r in ranks:
        layer = lora_on(w0, r, alpha=r)  # s = 1: the fit, not the scale, is the question here
        params = list(layer.adapter_params().values())
        optimizer = torch.optim.LBFGS(params, lr=1, max_iter=400, tolerance_grad=1e-12, tolerance_change=1e-14,
                                      history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

        def closure(layer=layer, optimizer=optimizer):
            optimizer.zero_grad()
            loss = ((layer(x) - y) ** 2).mean()
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            learned = layer.scaling * layer.lora_B @ layer.lora_A
            error = ((learned - delta).norm() / delta.norm()).item()
            best = (sigma[r:].square().sum().sqrt() / sigma.square().sum().sqrt()).item()
            phi = subspace_similarity(layer.lora_A.detach(), v_true)[min(r, k) - 1, k - 1].item()
        rows.append({"r": r, "error": error, "best_possible": best, "phi": phi})
    return rows


def first_step_sizes(ranks=(4, 16, 64, 256), d: int = 256, alpha: float = 16, lr: float = 1e-3) -> dict:
    """{scaling: [‖ΔW‖_F after one AdamW step from B = 0, for each r]} on a rank-8 regression: AdamW moves each
    entry of B by about lr, so ΔW = s·B A grows with s·sqrt(r) (A's r rows add up with random signs)."""
    w0, _, x, y = regression(d, 8)
    sizes = {}
    for name, scale in SCALINGS.items():
        sizes[name] = []
        for r in ranks:
            layer = lora_on(w0, r, alpha)
            layer.scaling = scale(alpha, r)
            optimizer = torch.optim.AdamW(layer.adapter_params().values(), lr=lr, weight_decay=0.0)
            ((layer(x) - y) ** 2).mean().backward()
            optimizer.step()
            sizes[name].append((layer.delta_weight()).norm().item())
    return sizes


def step_zero(d: int = 32, r: int = 4, seed: int = 0) -> dict:
    """The largest change of the output from the base's, and the loss, at step 0: B = 0 (LoRA's init)
    against B drawn like A."""
    w0, _, x, y = regression(d, 3, seed=seed)
    layer = lora_on(w0, r, alpha=2 * r)
    base_out = x @ w0.T
    result = {}
    for init in ("B = 0", "both random"):
        if init == "both random":
            with torch.no_grad():
                nn.init.kaiming_uniform_(layer.lora_B, a=math.sqrt(5))
        with torch.no_grad():
            out = layer(x)
        result[init] = {
            "output_change": (out - base_out).abs().max().item(),
            "loss": ((out - y) ** 2).mean().item(),
        }
    result["base loss"] = ((base_out - y) ** 2).mean().item()
    return result


def merge_timing(d: int = 768, r: int = 16, tokens: int = 1024, repeats: int = 20, warmup: int = 5) -> dict:
    """Median milliseconds of one forward of a d x d LoRA layer on `tokens` rows, unmerged and merged (after
    `warmup` calls each), on this machine's CPU or GPU."""
    layer = lora_on(torch.randn(d, d) / math.sqrt(d), r, alpha=2 * r).eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(tokens, d)
    medians = {}
    with torch.no_grad():
        for state in ("unmerged", "merged"):
            if state == "merged":
                layer.merge()
            for _ in range(warmup):
                layer(x)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                layer(x)
                times.append(time.perf_counter() - start)
            medians[state] = 1e3 * statistics.median(times)
    return medians


def write_figures(out: Path) -> list[Path]:
    """intrinsic_rank.png and rank_scaling.png in `out`, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = intrinsic_rank()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ranks = [row["r"] for row in rows]
    ax.semilogy(ranks, [max(row["error"], 1e-9) for row in rows], "o-", label="LoRA at rank r, fitted")
    ax.semilogy(ranks, [max(row["best_possible"], 1e-9) for row in rows], "x--", label="best rank-r matrix")
    ax.axvline(3, color="grey", lw=0.8, ls=":")
    ax.set(xlabel="r (the update's rank k = 3)", ylabel="‖s·B A − ΔW‖ / ‖ΔW‖", title="Intrinsic rank")
    ax.legend()
    written.append(save_figure(fig, out / FIGURES[0], plt))
    ranks = (4, 16, 64, 256)
    sizes = first_step_sizes(ranks)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, values in sizes.items():
        ax.loglog(ranks, values, "o-", label=f"s = {name}")
    ax.set(xlabel="r", ylabel="‖ΔW‖ after one AdamW step", title="What the scaling does to the step as r grows")
    ax.legend()
    written.append(save_figure(fig, out / FIGURES[1], plt))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora.experiments", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="directory for intrinsic_rank.png and rank_scaling.png")
    args = p.parse_args(argv)
    from support.cli import run_cli

    def work() -> None:
        check_figure_place(args.out, FIGURES, "lora.experiments")
        print(*(f"wrote {path}" for path in write_figures(args.out)), sep="\n", file=sys.stderr)

    return run_cli(work)


if __name__ == "__main__":
    raise SystemExit(main())
