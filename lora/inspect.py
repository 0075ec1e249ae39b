"""What an adapter learned: the analyses of the LoRA paper (Hu et al. 2021, Section 7) on any adapter
directory in PEFT's layout (ours or PEFT's).

    python -m lora.inspect ADAPTER_DIR                          # per-module table: norms, spectra, ranks
    python -m lora.inspect ADAPTER_DIR --base tiny              # + |dW|/|W0| and the amplification factor
    python -m lora.inspect ADAPTER_DIR --compare OTHER_DIR      # + subspace similarity phi between the two
    python -m lora.inspect ADAPTER_DIR --out figures --json     # PNG figures, and JSON instead of markdown

For each adapted module, with dW = s·B A (s = alpha/r, or alpha/sqrt(r) with rsLoRA), all in float64:
- ‖dW‖_F and the singular values σ_1 >= ... >= σ_r of dW (its rank is at most r);
- energy rank: the fewest singular values holding 90% of Σσ_k² (the update's "real" rank);
- entropy effective rank (Roy & Vetterli 2007): exp(-Σ p_k log p_k), p_k = σ_k / Σσ, between 1 and r;
- with the base weight W0: ‖dW‖_F / ‖W0‖_F, and the amplification factor of Section 7.3,
  ‖dW‖_F / ‖U_rᵀ W0 V_r‖_F, U_r, V_r the top-r singular directions of dW (how much dW amplifies
  directions W0 barely uses), beside the same with r random orthonormal directions;
- with a second adapter: the normalised subspace similarity of Section 7.2,
  φ(A1, A2, i, j) = ‖V_1[:, :i]ᵀ V_2[:, :j]‖_F² / min(i, j), V the right singular vectors of each A.
  1 when one subspace holds the other, 0 when they are orthogonal; for random subspaces of dimension i
  and j in R^d its expected value is max(i, j) / d.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from support.files import atomic_write

from .layer import lora_scaling
from .load import read_adapter
from .save import KEY_PREFIX, AdapterError

ENERGY = 0.9


def adapter_factors(directory: str | Path):
    """(config, {module path: (A, B)}, scaling, {module path: DoRA's magnitude m}) of an adapter directory,
    tensors in float64; the last is empty for plain LoRA."""
    config, state = read_adapter(directory)
    scaling = lora_scaling(config["r"], config["lora_alpha"], config.get("use_rslora", False))
    factors, magnitudes = {}, {}
    for key, tensor in state.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(KEY_PREFIX).removesuffix(".lora_A.weight")
        b_key = key.replace(".lora_A.weight", ".lora_B.weight")
        if b_key not in state:
            raise AdapterError(f"{directory}: '{key}' has no matching lora_B: the adapter is damaged.")
        factors[module] = (tensor.double(), state[b_key].double())
        m_key = key.replace(".lora_A.weight", ".lora_magnitude_vector")
        if m_key in state:
            magnitudes[module] = state[m_key].double()
    if not factors:
        raise AdapterError(f"{directory} holds no lora_A/lora_B pairs to inspect.")
    return config, factors, scaling, magnitudes


def dora_delta(w0: torch.Tensor, low_rank: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's whole update: m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_c − W0 (‖·‖_c: each output row's L2 norm)."""
    directed = w0 + low_rank
    return (magnitude / torch.linalg.vector_norm(directed, dim=1)).unsqueeze(1) * directed - w0


def singular_values(delta: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(delta)


def energy_rank(sigma: torch.Tensor, energy: float = ENERGY) -> int:
    """The fewest leading singular values whose squares hold `energy` of the total (0 for dW = 0)."""
    total = (sigma**2).sum()
    if total == 0:
        return 0
    cumulative = torch.cumsum(sigma**2, 0) / total
    return int((cumulative < energy - 1e-12).sum()) + 1


def entropy_effective_rank(sigma: torch.Tensor) -> float:
    """Roy & Vetterli (2007): exp of the entropy of the normalised singular values (0 for dW = 0)."""
    if sigma.sum() == 0:
        return 0.0
    p = sigma / sigma.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def amplification(delta: torch.Tensor, w0: torch.Tensor, r: int, seed: int = 0) -> tuple[float, float]:
    """‖dW‖_F / ‖U_rᵀ W0 V_r‖_F for dW's top-r singular directions, and for r random orthonormal ones."""
    u, _, vh = torch.linalg.svd(delta, full_matrices=False)
    norm = torch.linalg.matrix_norm(delta)
    own = torch.linalg.matrix_norm(u[:, :r].T @ w0 @ vh[:r].T)
    generator = torch.Generator().manual_seed(seed)
    random_u = torch.linalg.qr(torch.randn(delta.shape[0], r, generator=generator, dtype=delta.dtype))[0]
    random_v = torch.linalg.qr(torch.randn(delta.shape[1], r, generator=generator, dtype=delta.dtype))[0]
    other = torch.linalg.matrix_norm(random_u.T @ w0 @ random_v)
    return float(norm / own), float(norm / other)


def subspace_similarity(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for i = 1..r1, j = 1..r2, as an (r1, r2) matrix (Section 7.2 of the paper)."""
    v1 = torch.linalg.svd(a1, full_matrices=False)[2].T  # (in, r1): right singular vectors, columns
    v2 = torch.linalg.svd(a2, full_matrices=False)[2].T  # (in, r2)
    overlap = (v1.T @ v2) ** 2  # (r1, r2): squared cosines between singular directions
    cumulative = overlap.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖V1[:, :i]ᵀ V2[:, :j]‖_F²
    i = torch.arange(1, overlap.shape[0] + 1, dtype=overlap.dtype)[:, None]
    j = torch.arange(1, overlap.shape[1] + 1, dtype=overlap.dtype)[None, :]
    return cumulative / torch.minimum(i, j)


def inspect_adapter(directory: str | Path, base=None, compare: str | Path | None = None) -> dict:
    """The report: one row per module; `base` is a model (its modules give W0), `compare` an adapter dir."""
    config, factors, scaling, magnitudes = adapter_factors(directory)
    if magnitudes and base is None:  # its update is not s·B A: it rescales W0's rows too
        raise AdapterError(
            f"{directory} is a DoRA adapter, whose update m ⊙ (W0 + s·B A)/‖W0 + s·B A‖_c − W0 depends on the "
            "base weights: pass --base MODEL."
        )
    other = adapter_factors(compare)[1] if compare is not None else None
    if other is not None and set(other) != set(factors):
        only = sorted(set(factors) ^ set(other))[0]
        raise AdapterError(f"{directory} and {compare} adapt different modules (e.g. {only}): nothing to compare.")
    rows = []
    for module, (a, b) in sorted(factors.items()):
        delta = scaling * b @ a  # (out, in)
        w0 = base_weight(base, module, delta.shape) if base is not None else None
        if module in magnitudes:
            delta = dora_delta(w0, delta, magnitudes[module])
        sigma = singular_values(delta)
        row = {
            "module": module,
            "shape": list(delta.shape),
            "r": a.shape[0],
            "delta_norm": float(torch.linalg.matrix_norm(delta)),
            "singular_values": [float(x) for x in sigma[: a.shape[0]]],
            "energy_rank": energy_rank(sigma),
            "entropy_rank": entropy_effective_rank(sigma),
        }
        if w0 is not None:
            row["relative_norm"] = row["delta_norm"] / float(torch.linalg.matrix_norm(w0))
            row["amplification"], row["amplification_random"] = amplification(delta, w0, a.shape[0])
        if other is not None:
            for where, lora_b in ((directory, b), (compare, other[module][1])):
                if not lora_b.any():  # B = 0: nothing learned, and φ would compare arbitrary directions
                    raise AdapterError(
                        f"{where}'s update of {module} is zero (B = 0: untrained?), so the subspace similarity "
                        "means nothing; compare trained adapters."
                    )
            phi = subspace_similarity(a, other[module][0])
            row["phi"] = phi.tolist()
            row["phi_top1"] = float(phi[0, 0])
        rows.append(row)
    return {"adapter": str(directory), "r": config["r"], "scaling": scaling, "modules": rows}


def base_weight(model, module: str, shape) -> torch.Tensor:
    try:
        w0 = model.get_submodule(module).weight.detach().double()
    except AttributeError:
        raise AdapterError(f"the base model has no module {module}: the adapter was made for another model.") from None
    if tuple(w0.shape) != tuple(shape):
        raise AdapterError(
            f"the base model's {module} is {tuple(w0.shape)} but the adapter's update is {tuple(shape)}: "
            "pass the --base the adapter was trained on."
        )
    return w0


def markdown(report: dict) -> str:
    optional = [("relative_norm", "‖dW‖/‖W0‖", ".4f"), ("amplification", "amplification", ".1f")]
    optional += [("amplification_random", "vs random", ".2f"), ("phi_top1", "φ(1,1)", ".3f")]
    present = [column for column in optional if column[0] in report["modules"][0]]
    header = ["module", "‖dW‖_F", "σ_1", "energy rank (90%)", "entropy rank"] + [title for _, title, _ in present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["modules"]:
        cells = [row["module"], f"{row['delta_norm']:.4f}", f"{row['singular_values'][0]:.4f}"]
        cells += [str(row["energy_rank"]), f"{row['entropy_rank']:.2f}"]
        cells += [format(row[key], fmt) for key, _, fmt in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def layer_and_kind(module: str) -> tuple[str, str]:
    """ "encoder.block.3.layer.0.SelfAttention.q" -> ("encoder 3", "SelfAttention.q")."""
    parts = module.split(".")
    if "block" in parts:
        i = parts.index("block")
        kind = [part for part in parts[i + 2 :] if part != "layer" and not part.isdigit()]
        return f"{parts[0]} {parts[i + 1]}", ".".join(kind) or parts[-1]
    return "other", module


def write_figures(report: dict, out: Path, phi_module: str | None = None) -> list[Path]:
    """Heatmap of ‖dW‖_F by layer and module, the singular-value spectra, and φ for one module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = report["modules"]
    layers = sorted({layer_and_kind(r["module"])[0] for r in rows}, key=_layer_order)
    kinds = sorted({layer_and_kind(r["module"])[1] for r in rows})
    grid = torch.full((len(layers), len(kinds)), float("nan"))
    for r in rows:
        layer, kind = layer_and_kind(r["module"])
        grid[layers.index(layer), kinds.index(kind)] = r["delta_norm"]
    written = []
    fig, ax = plt.subplots(figsize=(0.9 * len(kinds) + 3, 0.5 * len(layers) + 2.5))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(kinds)), kinds, rotation=45, ha="right")
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xlabel("module")
    ax.set_ylabel("layer")
    ax.set_title(f"‖ΔW‖_F of each adapted module (r={report['r']})")
    fig.colorbar(image, ax=ax, label="‖ΔW‖_F")
    written.append(save_figure(fig, out / FIGURES[0], plt))

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        ax.plot(range(1, len(r["singular_values"]) + 1), r["singular_values"], alpha=0.5, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("index k")
    ax.set_ylabel("singular value σ_k of ΔW")
    ax.set_title(f"Singular-value spectra of ΔW, one line per module ({len(rows)} modules)")
    ax.grid(alpha=0.3)
    written.append(save_figure(fig, out / FIGURES[1], plt))

    with_phi = [r for r in rows if "phi" in r]
    if with_phi:
        chosen = next((r for r in with_phi if r["module"] == phi_module), with_phi[0])
        phi = torch.tensor(chosen["phi"])
        fig, ax = plt.subplots(figsize=(6, 5))
        image = ax.imshow(phi.numpy(), aspect="auto", origin="lower", vmin=0, vmax=1, cmap="magma",
                          extent=(0.5, phi.shape[1] + 0.5, 0.5, phi.shape[0] + 0.5))  # fmt: skip
        ax.set_xlabel("j (directions of the compared adapter's A)")
        ax.set_ylabel("i (directions of this adapter's A)")
        ax.set_title(f"Subspace similarity φ(i, j)\n{chosen['module']}")
        fig.colorbar(image, ax=ax, label="φ")
        written.append(save_figure(fig, out / FIGURES[2], plt))
    return written


FIGURES = ("delta_norms.png", "spectra.png", "subspace_similarity.png")  # what --out receives


def _layer_order(layer: str):
    side, _, index = layer.partition(" ")
    return (side != "encoder", int(index) if index.isdigit() else 0)


def save_figure(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    try:  # atomically: a full disk leaves the previous figure, not an empty or half-written one
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    finally:
        plt.close(fig)
    return path


def check_figure_place(out: Path, names, tool: str, option: str = "--out") -> None:
    """Refuse, before any work, an `option` directory that is a file, or a figure's place in it that is a
    symbolic link (the directory itself may be one: the user chose it; a figure's own link was not chosen)."""
    from support.cli import UsageError

    if out.exists() and not out.is_dir():
        raise UsageError(f"{option} {out} is a file: pass a directory for the figures.")
    links = [out / name for name in names if (out / name).is_symlink()]
    if links:
        raise UsageError(
            f"{links[0]} is a symbolic link (to {os.readlink(links[0])}); {tool} never writes in a link's place: "
            f"remove it, or pass another {option}."
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m lora.inspect" if sys.argv[0].endswith(".py") else None,  # else lora-t5-inspect
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("adapter", type=Path, help="adapter directory (ours or PEFT's)")
    p.add_argument(
        "--base", help="base model for ‖dW‖/‖W0‖ and the amplification factor: 'tiny', a directory or a hub name"
    )
    p.add_argument("--compare", type=Path, help="a second adapter of the same modules, for the subspace similarity φ")
    p.add_argument("--out", type=Path, help="write delta_norms.png, spectra.png (and subspace_similarity.png) here")
    p.add_argument("--phi-module", help="module for the φ figure (default: the first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a markdown table")
    args = p.parse_args(argv)
    from support.cli import UsageError, run_cli

    def refuse_before_work() -> None:
        """What the command line and the adapter directories say wrong, before a model loads: exit 2."""
        if args.phi_module and not args.compare:
            raise UsageError("--phi-module picks the module of the φ figure, which needs --compare OTHER_DIR.")
        if args.out:
            check_figure_place(args.out, FIGURES, "lora.inspect")
        for directory in filter(None, (args.adapter, args.compare)):
            try:
                read_adapter(directory)
            except AdapterError as err:
                raise UsageError(str(err)) from None

    def work() -> None:
        refuse_before_work()
        run(args)

    return run_cli(work, failures=(AdapterError, FiguresNotWritten))  # ModelLoadError refuses: 2


class FiguresNotWritten(RuntimeError):
    """--out could not take the figures: read-only, full, or under a file."""


def run(args: argparse.Namespace) -> None:
    """Load, analyse, print the report and write the figures (the command's work, after its checks)."""
    from support.models import load_model_and_tokenizer

    base = load_model_and_tokenizer(args.base)[0] if args.base else None
    report = inspect_adapter(args.adapter, base, args.compare)
    modules = [row["module"] for row in report["modules"]]
    if args.phi_module and args.phi_module not in modules:
        raise AdapterError(
            f"--phi-module {args.phi_module} is not a module of the adapter (its first is {modules[0]})."
        )
    if args.out:
        try:
            written = write_figures(report, args.out, args.phi_module)
        except OSError as err:
            raise FiguresNotWritten(
                f"could not write the figures in {args.out} ({err.strerror or err}); pass --out a directory you "
                "can write to."
            ) from None
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(report, indent=2) if args.json else markdown(report))


if __name__ == "__main__":
    raise SystemExit(main())
