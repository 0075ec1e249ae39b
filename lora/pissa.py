"""PiSSA: start A and B from the principal singular vectors of W0, and train those instead of zeros."""

from __future__ import annotations

import math
import re

import torch

from .layer import LoRALinear

INITS = ("lora", "pissa", "pissa_niter_N")  # what `inject_lora(init=...)` takes; N is a whole number


def pissa_niter(init: str) -> int | None:
    """None for PiSSA's exact SVD ("pissa"), N for the randomised one ("pissa_niter_N"); refuse anything else."""
    if init == "pissa":
        return None
    match = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
    if match is None:
        raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}.")
    return int(match.group(1))


@torch.no_grad()
def pissa_init(layer: LoRALinear, init: str = "pissa") -> None:
    """PiSSA (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"):

        W0 = U S Vᵀ,   A = √(S_r/s) V_rᵀ  (r, in),   B = U_r √(S_r/s)  (out, r),   W0 ← W0 − s·B A

    so s·B A = U_r S_r V_rᵀ, the best rank-r part of W0, trains while the residual stays frozen, and the
    layer computes the original W0 at step 0. Dividing S by the scaling s is PEFT's choice, which makes
    s·B A, not B A, equal the principal part whatever alpha is. "pissa_niter_N" uses torch.svd_lowrank
    with N subspace iterations (fast, randomised: it draws from torch's RNG), as PEFT's init of that name.
    The SVD and the residual are computed in fp32; the residual is rounded once into W0's dtype.
    The initial A and B are kept (`pissa_init_A`, `pissa_init_B`) for `pissa_as_lora`.
    """
    niter = pissa_niter(init)
    weight = layer.weight.float()  # (out, in)
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        U, S, Vh = U[:, : layer.r], S[: layer.r], Vh[: layer.r]  # (out, r), (r,), (r, in)
    else:
        U, S, V = torch.svd_lowrank(weight, q=layer.r, niter=niter)
        Vh = V.T
    root = torch.sqrt(S / layer.scaling)  # (r,)
    lora_A = root.unsqueeze(1) * Vh  # (r, in)
    lora_B = U * root  # (out, r)
    layer.lora_A.copy_(lora_A)
    layer.lora_B.copy_(lora_B)
    layer.weight.copy_((weight - layer.delta_weight()).to(layer.weight.dtype))  # the residual
    layer.register_buffer("pissa_init_A", layer.lora_A.detach().clone(), persistent=False)
    layer.register_buffer("pissa_init_B", layer.lora_B.detach().clone(), persistent=False)
    layer.init = init


def pissa_as_lora(layer: LoRALinear) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """A trained PiSSA layer as a plain LoRA update of the original, unmodified W0:
    (A', B', r', alpha') with A' = [A; A0] (2r, in), B' = [B, -B0] (out, 2r), r' = 2r and alpha' chosen so
    that s' = s, since  W_res + s·B A = W0 + s·(B A − B0 A0) = W0 + s·B' A'.
    PEFT writes the same rank-2r adapter when saving with `path_initial_model_for_weight_conversion`.
    """
    lora_A = torch.cat([layer.lora_A.detach(), layer.pissa_init_A], dim=0)
    lora_B = torch.cat([layer.lora_B.detach(), -layer.pissa_init_B], dim=1)
    alpha = layer.alpha * (math.sqrt(2) if layer.use_rslora else 2)  # s' = alpha'/√(2r) or alpha'/(2r) = s
    return lora_A, lora_B, 2 * layer.r, alpha
