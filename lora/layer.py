"""The LoRA layer: a frozen nn.Linear plus a trainable low-rank update, and its merge and unmerge."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _cpu_has_bf16_matmul() -> bool:
    """Whether oneDNN runs bf16 matrix products natively here (AVX-512 or AMX); False on AVX2-only CPUs."""
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the query: the fp32 path below is right anywhere
        return False


CPU_HAS_BF16_MATMUL = _cpu_has_bf16_matmul()


class _Bf16LinearInFp32(torch.autograd.Function):
    """y = x W^T + b for bf16 x and a frozen bf16 W, each product computed in fp32 and rounded once to bf16:
    the values a bf16 GEMM with fp32 accumulation gives. Saves only W (a parameter: nothing new is kept);
    the fp32 copies live for the one product."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        with torch.autocast("cpu", enabled=False):
            return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # grad (..., out) -> (..., in); W and b are frozen: no gradient of theirs
        (weight,) = ctx.saved_tensors
        grad_x = (grad.float() @ weight.float()).to(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a frozen base weight. The one exception: bf16 on a CPU without bf16 matrix instructions
    (AVX2 ones), where PyTorch's bf16 GEMM runs at 19 GFLOP/s forward and 0.3 GFLOP/s for the input's
    gradient against 100 GFLOP/s in fp32 (2 cores, 512 x 2048 -> 5120): there the product is computed in fp32
    of the same bf16 values and rounded once, as above. Memory stays that of a bf16 base."""
    if (
        weight.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and not weight.requires_grad
        and not CPU_HAS_BF16_MATMUL
    ):
        return _Bf16LinearInFp32.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _lora_a_init_params(lora_A: torch.Tensor) -> None:
    """Kaiming-uniform with a=sqrt(5), the default of nn.Linear, as in the LoRA paper's code and PEFT."""
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))


def _lora_b_init_params(lora_B: torch.Tensor) -> None:
    """Zeros, so B·A = 0 and an injected model computes exactly what its base computes at step 0."""
    nn.init.zeros_(lora_B)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update.

        h = W0 x + b + scaling · B A dropout(x),   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

    Shapes: x (..., in_features); W0 `weight` (out_features, in_features), frozen;
    A `lora_A` (r, in_features); B `lora_B` (out_features, r); h (..., out_features).

    `weight` and `bias` keep the names nn.Linear gives them, so a base checkpoint loads into an
    injected model and a merged state dict loads into a plain nn.Linear. Dropout touches the LoRA
    branch's input only, and only in train mode. Merging is explicit (`merge()`/`unmerge()`);
    `.train()` and `.eval()` never merge.

    Mixed precision: the frozen W0 may be stored in bf16 or fp16 (`set_base_dtype`) while A and B stay
    fp32, the dtype the optimizer updates. The low-rank branch casts its input to A's dtype, computes
    B A x there, and casts the update to the base output's dtype before the sum (under autocast, autocast
    picks the matmuls' dtype as usual). On a CPU without bf16 matrix instructions a bf16 W0's product is
    computed in fp32 and rounded to bf16 (`frozen_linear`: PyTorch's bf16 GEMM there is 5-300x slower).
    `merge()` computes scaling·B@A in fp32 and rounds once into W0's dtype.

    Several adapters (lora/adapters.py): the layer's own A and B are the adapter named `name`; more named
    adapters, each with its own A, B and scaling, sit in `extra_adapters`. The forward adds the update of
    the one adapter named `active` (none if this layer is not one of its targets), or, inside
    `mixed_adapters`, each row's own adapter's update. With one adapter nothing of this shows.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_adapter_shape(in_features, out_features, r, alpha, dropout)
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, **factory), requires_grad=False) if bias else None
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False  # True while the update is folded into `weight`
        self.disabled = False  # True inside `lora_disabled`: the layer is its base
        self.init = "lora"  # how A and B were initialised: "lora", or PiSSA's "pissa" / "pissa_niter_N"
        self.name = "default"  # the name of the adapter held in lora_A and lora_B
        self.extra_adapters = nn.ModuleDict()  # more named adapters (LowRank), beside this layer's own
        self.active = self.name  # whose update the forward adds; None: no adapter's
        self.merged_name = None  # whose update is folded into `weight`, while merged
        self.row_groups = None  # inside mixed_adapters: (rows, {adapter name: row indices}, beams allowed)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.reset_lora_parameters()

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        """Wrap an existing nn.Linear, sharing (not copying) its weight and bias, which it freezes."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            r,
            alpha,
            dropout,
            use_rslora,
            bias=linear.bias is not None,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.weight.requires_grad_(False)  # the base is frozen, as in a LoRALinear built from scratch
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        for name, param in layer.adapter_params().items():  # built on "meta": allocate them beside the weight
            setattr(layer, name, nn.Parameter(torch.empty_like(param, device=linear.weight.device)))
        layer.reset_lora_parameters()
        return layer

    def reset_lora_parameters(self) -> None:
        _lora_a_init_params(self.lora_A)
        _lora_b_init_params(self.lora_B)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The parameters this layer adds to its base: the only ones LoRA trains."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def adapters(self) -> dict[str, nn.Module]:
        """Every adapter this layer holds, by name: itself (lora_A, lora_B) and its extra ones."""
        return {self.name: self, **self.extra_adapters}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = frozen_linear(x, self.weight, self.bias)  # (..., out): F.linear, but see frozen_linear
        if self.merged or self.disabled:
            return result
        if self.row_groups is not None:  # a mixed batch
            return result + self.mixed_update(x).to(result.dtype)
        adapter = self.adapters().get(self.active)
        if adapter is None:  # the active adapter does not target this layer
            return result
        low_rank = F.linear(adapter.dropout(x).to(adapter.lora_A.dtype), adapter.lora_A)  # (..., r), A's dtype
        return result + (adapter.scaling * F.linear(low_rank, adapter.lora_B)).to(result.dtype)  # (..., out)

    def mixed_update(self, x: torch.Tensor) -> torch.Tensor:
        """Each row's own adapter's update, (batch, ..., out) in A's dtype: the rows are grouped by adapter,
        one low-rank product per adapter present. generate() repeats each row for beam search; so do we."""
        rows, groups, beams = self.row_groups
        repeats = x.shape[0] // rows if beams else 1  # in generate(), the beams per row
        if x.shape[0] != rows * repeats or repeats == 0:
            raise ValueError(
                f"a mixed batch names an adapter for each of {rows} rows, but this batch has {x.shape[0]} rows: "
                "give one name per row."
            )
        update = x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.lora_A.dtype)
        adapters = self.adapters()
        for name, index in groups.items():
            adapter = adapters.get(name)
            if adapter is None:  # this adapter does not target this layer: its rows get no update here
                continue
            if repeats > 1:
                index = (index.unsqueeze(1) * repeats + torch.arange(repeats, device=index.device)).flatten()
            rows_x = adapter.dropout(x.index_select(0, index)).to(adapter.lora_A.dtype)
            low_rank = F.linear(F.linear(rows_x, adapter.lora_A), adapter.lora_B)  # (rows, ..., out)
            update.index_add_(0, index, adapter.scaling * low_rank)
        return update

    def delta_weight(self) -> torch.Tensor:
        """scaling · B @ A, (out, in), computed in fp32 whatever the parameters' dtype."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def merged_weight(self) -> torch.Tensor:
        """The one weight that computes this layer's output: W0 + scaling·B@A (of the active adapter), (out, in),
        in fp32."""
        return self.weight.float() + self.adapters()[self.active].delta_weight()

    def unmerged_weight(self) -> torch.Tensor:
        """W0 again from a merged `weight`, in fp32: the inverse of `merged_weight`."""
        return self.weight.float() - self.adapters()[self.merged_name].delta_weight()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` (idempotent), rounding once into its dtype. Afterwards the forward
        is the base matmul alone."""
        if self.row_groups is not None:
            raise ValueError("cannot merge while a mixed batch runs: merge one active adapter outside mixed_adapters.")
        if self.merged or self.active not in self.adapters():  # already merged, or nothing here to fold in
            return
        merged = self.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging this LoRA layer ({self.out_features}x{self.in_features}) gives non-finite weights; "
                "the adapter is damaged (NaN or inf in its parameters) or overflows the weight dtype "
                f"{self.weight.dtype}: merge in float32 or retrain."
            )
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged, self.merged_name = True, self.active

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update out of `weight` again (idempotent): the inverse of `merge`."""
        if not self.merged:
            return
        self.weight.copy_(self.unmerged_weight().to(self.weight.dtype))
        self.merged, self.merged_name = False, None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:g}, init={self.init}, merged={self.merged}"
        )


MAX_RANK = 65536  # beyond any layer of any T5: a larger r is a typo, and would try to allocate r x in
MAX_ALPHA = 1e6  # alpha / r scales the update; past this, merged weights overflow fp16 and bf16


def check_lora_hyperparameters(r: int, alpha: float, dropout: float = 0.0) -> None:
    """The one check of LoRA's hyperparameters, for the layer, the command line and adapter files alike."""
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= MAX_RANK:
        raise ValueError(f"LoRA rank r must be a positive integer up to {MAX_RANK}, got {r!r}.")
    if not _is_number(alpha) or not 0 < alpha <= MAX_ALPHA:
        raise ValueError(f"LoRA alpha must be a positive number up to {MAX_ALPHA:g}, got {alpha!r}.")
    if not _is_number(dropout) or not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}.")


def lora_scaling(r: int, alpha: float, use_rslora: bool = False) -> float:
    """alpha / r, or rsLoRA's alpha / sqrt(r)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_adapter_shape(in_features: int, out_features: int, r: int, alpha: float, dropout: float) -> None:
    """The hyperparameters, and a rank that stays below the layer's smallest dimension."""
    check_lora_hyperparameters(r, alpha, dropout)
    if r > min(in_features, out_features):
        raise ValueError(
            f"LoRA rank r={r} exceeds this layer's smallest dimension ({out_features}x{in_features}): "
            "the update would not be low-rank; choose a smaller r."
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class LowRank(nn.Module):
    """One more named adapter of a LoRALinear (lora/adapters.py): its own A (r, in), B (out, r), scaling
    and dropout. Initialised as LoRA: A kaiming-uniform, B zero."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float, use_rslora: bool,
                 device=None) -> None:  # fmt: skip
        super().__init__()
        check_adapter_shape(in_features, out_features, r, alpha, dropout)
        self.r, self.alpha, self.use_rslora, self.init = r, alpha, use_rslora, "lora"
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        _lora_a_init_params(self.lora_A)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    delta_weight = LoRALinear.delta_weight  # scaling · B @ A of this adapter, in fp32
