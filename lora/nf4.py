"""NF4, QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs"),
written out: the 16 levels, blockwise quantisation, double quantisation of the scales, and a frozen 4-bit
weight whose product the LoRA layer's base computes.

A weight W (out, in) is flattened row-major and cut into blocks of 64 values. A block keeps its absmax
c = max |w| and each value the index j of the level q_j nearest to w / c, two indices to a byte (the first
in the high nibble). Dequantised, w ≈ q_j · c, computed in fp32 and cast once to the compute dtype.
Double quantisation stores the blocks' absmax values, less their mean, in 8 bits (the signed dynamic
map, one fp32 scale per 256 of them). Bits per weight: 4 + 32/64 = 4.5 without it, 4 + 8/64 + 32/(64·256)
≈ 4.127 with it.

Layout and rounding are bitsandbytes' (`quantize_4bit(W, quant_type="nf4", compress_statistics=...)` and
`dequantize_4bit`), bit for bit, so that an adapter trained here on an NF4 base is the adapter PEFT trains
on a bitsandbytes 4-bit base. bitsandbytes itself is never imported here.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .model import lora_layers

BLOCK_SIZE = 64  # weights per absmax
STATS_BLOCK_SIZE = 256  # absmax values per fp32 scale, with double quantisation
NF4_OFFSET = 0.9677083  # QLoRA's outermost quantile: the largest level is Φ⁻¹(0.9677083) ≈ 1.848 before scaling


def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, ascending, in [-1, 1], fp32: quantiles of N(0, 1) divided by the largest.

    Eight positive levels are Φ⁻¹ at 8 of 9 evenly spaced probabilities from NF4_OFFSET down to 0.5, seven
    negative ones Φ⁻¹ at 7 of 8; with an exact zero that makes 16. Each level then stands for an equal
    share of a normal distribution's mass, and zero (padding, pruned weights) is represented exactly."""
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].double())  # (8,)
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].double())  # (7,)
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).float().sort().values
    return levels / levels.max()


def dynamic_levels() -> torch.Tensor:
    """The signed 8-bit dynamic map (Dettmers 2016), 256 ascending levels in [-1, 1], fp32: for each of 7
    decades 10⁻⁶ ... 10⁰, 2^k values (k = 0 ... 6) spread over [0.1, 1) times the decade, both signs, plus 0
    and 1. Small values keep relative precision; it is what double quantisation stores the absmax in."""
    values = []
    for k in range(7):
        edges = torch.linspace(0.1, 1, 2**k + 1)  # fp32, as every step here
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
        values += [means, -means]
    return torch.cat([*values, torch.tensor([0.0, 1.0])]).sort().values


@functools.cache
def levels_on(kind: str, device: torch.device) -> torch.Tensor:
    """On `device`, computed once (every product looks them up): "nf4" the 16 levels, "dynamic" the 256,
    "nf4_pairs" (256, 2) the two levels a packed byte holds (high nibble first)."""
    if kind == "nf4_pairs":
        levels = nf4_levels()
        return torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).to(device)
    return (nf4_levels() if kind == "nf4" else dynamic_levels()).to(device)


def nearest_level(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """The index of the level nearest to each value of `scaled` (in [-1, 1]), uint8; a value exactly halfway
    between two levels takes the lower one."""
    midpoints = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, midpoints, out_int32=True).to(torch.uint8)


GRID_POINTS = 65536  # the 8-bit quantiser's grid over [-1, 1]


def nearest_level_on_grid(scaled: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """nearest_level as bitsandbytes' 8-bit CPU quantiser computes it: each value is first rounded to the
    nearest of 65,536 evenly spaced points of [-1, 1], then takes the level nearest to that point (ties to
    the lower). The two roundings differ from one only within half a grid step (1.5e-5) of a midpoint."""
    grid = torch.arange(GRID_POINTS, device=scaled.device) / (GRID_POINTS - 1) * 2 - 1
    above = torch.searchsorted(levels, grid).clamp(1, len(levels) - 1)  # the first level >= the point
    closer_above = (levels[above] - grid).abs() < (grid - levels[above - 1]).abs()
    nearest = torch.where(closer_above, above, above - 1)
    points = (((scaled.clamp(-1, 1) + 1) * 0.5) * (GRID_POINTS - 1) + 0.5).long()  # truncated: rounds half up
    return nearest[points].to(torch.uint8)


def blockwise_absmax_scale(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block's absmax (fp32) and the values divided by it, clamped to [-1, 1].

    Computed as bitsandbytes computes it, so that the indices are bit-equal to its: full blocks multiply by
    the reciprocal of their absmax, a shorter last block divides by it; an all-zero block keeps absmax 0."""
    full = flat.numel() - flat.numel() % block_size
    blocks = flat[:full].view(-1, block_size)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if full < flat.numel():
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return absmax, scaled


def blockwise_expand(values: torch.Tensor, scales: torch.Tensor, block_size: int) -> torch.Tensor:
    """values (n,) times their block's scale (n / block_size rounded up,), in fp32; in place (values are
    the caller's to overwrite) when n is a multiple of block_size."""
    n = values.numel()
    if n % block_size == 0:
        return values.view(-1, block_size).mul_(scales.unsqueeze(1)).view(-1)
    padded = F.pad(values, (0, -n % block_size)).view(-1, block_size)
    return (padded * scales.unsqueeze(1)).reshape(-1)[:n]


def nf4_nbytes(shape: tuple[int, ...], double_quant: bool = True) -> int:
    """What an NF4Weight of `shape` holds: half a byte per value, and per block of 64 an fp32 absmax, or with
    double quantisation a uint8 code, an fp32 scale per 256 blocks and one fp32 offset."""
    values = math.prod(shape)
    blocks = -(-values // BLOCK_SIZE)
    scales = blocks + 4 * -(-blocks // STATS_BLOCK_SIZE) + 4 if double_quant else 4 * blocks
    return (values + 1) // 2 + scales


class NF4Weight(nn.Module):
    """A frozen weight (out, in) in NF4: `packed` uint8 ((out·in + 1) // 2,), two level indices per byte;
    the absmax of each 64-value block, either `absmax` fp32 or, with double quantisation, `absmax_codes`
    uint8 (indices into the dynamic map), `absmax_scales` fp32 (one per 256 blocks) and `absmax_offset`.

    `dequantize()` gives the weight in `dtype`, the compute dtype; nothing else is stored. The fp32 scales
    are kept as the int32 bits of their values, so that casting a model (`model.to(torch.bfloat16)`) moves
    them with it but never rounds them."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype | None = None, double_quant: bool = True) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"NF4 quantises a linear layer's (out, in) weight, got shape {tuple(weight.shape)}.")
        self.shape = tuple(weight.shape)
        self.dtype = dtype or weight.dtype
        self.double_quant = double_quant
        if weight.is_meta:  # a model built without weights (a memory plan): buffers of the shapes quantising gives
            self._register_meta_buffers()
            return
        flat = weight.detach().reshape(-1).float()
        absmax, scaled = blockwise_absmax_scale(flat, BLOCK_SIZE)
        indices = nearest_level(F.pad(scaled, (0, scaled.numel() % 2)), levels_on("nf4", flat.device))
        self.register_buffer("packed", (indices[0::2] << 4) | indices[1::2])
        if double_quant:  # absmax - mean, in 8 bits: 32 -> 8 bits per block of 64 weights
            offset = absmax.mean()
            centered = absmax - offset
            blocks = F.pad(centered, (0, -centered.numel() % STATS_BLOCK_SIZE))
            scales = blocks.view(-1, STATS_BLOCK_SIZE).abs().amax(dim=1)  # the padding's zeros change no max
            scaled_absmax = centered / scales.repeat_interleave(STATS_BLOCK_SIZE)[: centered.numel()]
            scaled_absmax = scaled_absmax.nan_to_num(nan=-1.0)  # a group of equal absmax is 0/0: index 0, as theirs
            codes = nearest_level_on_grid(scaled_absmax, levels_on("dynamic", flat.device))
            self.register_buffer("absmax_codes", codes)
            self.register_buffer("absmax_scales_bits", scales.view(torch.int32))
            self.register_buffer("absmax_offset_bits", offset.view(torch.int32))
        else:
            self.register_buffer("absmax_bits", absmax.view(torch.int32))

    def _register_meta_buffers(self) -> None:
        values = math.prod(self.shape)
        blocks = -(-values // BLOCK_SIZE)
        meta = {"device": "meta"}
        self.register_buffer("packed", torch.empty((values + 1) // 2, dtype=torch.uint8, **meta))
        if self.double_quant:
            self.register_buffer("absmax_codes", torch.empty(blocks, dtype=torch.uint8, **meta))
            stats_blocks = -(-blocks // STATS_BLOCK_SIZE)
            self.register_buffer("absmax_scales_bits", torch.empty(stats_blocks, dtype=torch.int32, **meta))
            self.register_buffer("absmax_offset_bits", torch.empty((), dtype=torch.int32, **meta))
        else:
            self.register_buffer("absmax_bits", torch.empty(blocks, dtype=torch.int32, **meta))

    @property
    def device(self) -> torch.device:
        """Where the packed weight is: a weight's `device`, as code that places an adapter beside it reads."""
        return self.packed.device

    @property
    def absmax(self) -> torch.Tensor:
        return self.absmax_bits.view(torch.float32)

    @property
    def absmax_scales(self) -> torch.Tensor:
        return self.absmax_scales_bits.view(torch.float32)

    @property
    def absmax_offset(self) -> torch.Tensor:
        return self.absmax_offset_bits.view(torch.float32)

    def block_absmax(self) -> torch.Tensor:
        """Each 64-value block's absmax, fp32 (from its 8-bit form with double quantisation)."""
        if not self.double_quant:
            return self.absmax
        levels = levels_on("dynamic", self.absmax_codes.device)
        return blockwise_expand(levels[self.absmax_codes.long()], self.absmax_scales, STATS_BLOCK_SIZE) + (
            self.absmax_offset
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W ≈ level · absmax, (out, in): looked up and multiplied in fp32, cast once to `dtype` (default:
        the compute dtype)."""
        pairs = levels_on("nf4_pairs", self.packed.device)  # a byte's two levels: one lookup per byte
        levels = F.embedding(self.packed.int(), pairs).view(-1)[: math.prod(self.shape)]
        weight = blockwise_expand(levels, self.block_absmax(), BLOCK_SIZE)
        return weight.view(self.shape).to(dtype or self.dtype)

    def nbytes(self) -> int:
        """The bytes it holds: the packed indices and the scales (= nf4_nbytes(shape, double_quant))."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.shape[0]}x{self.shape[1]}, compute {self.dtype}, double_quant={self.double_quant}"


class _NF4Product(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantised for this product only. The backward dequantises W again for
    dL/dx = dL/dy W, so nothing is kept between them but the packed weight itself; W and b are frozen."""

    @staticmethod
    def forward(ctx, x, weight: NF4Weight, bias):
        ctx.weight = weight
        dense = weight.dequantize()  # (out, in), the compute dtype
        return F.linear(x.to(dense.dtype), dense, None if bias is None else bias.to(dense.dtype))

    @staticmethod
    def backward(ctx, grad):  # (..., out) -> (..., in)
        grad_x = grad @ ctx.weight.dequantize(grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None


def nf4_linear(x: torch.Tensor, weight: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """W x + b for an NF4 weight: what a LoRA layer's `base_product` is over a 4-bit base."""
    return _NF4Product.apply(x, weight, bias)


class LinearNF4(nn.Module):
    """A frozen nn.Linear stored in NF4 (QLoRA's base layers that LoRA does not adapt: k, o, the
    feed-forward's). Its output is in the compute dtype, as a bf16 nn.Linear's is."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, double_quant: bool = True):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = NF4Weight(weight, dtype, double_quant)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)

    @classmethod
    def holding(cls, weight: NF4Weight, bias: nn.Parameter | None) -> LinearNF4:
        """A LinearNF4 around a weight already in NF4: a LoRA layer's W0 once its last adapter is deleted."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.out_features, layer.in_features = weight.shape
        layer.weight, layer.bias = weight, bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)


def quantize_lora_layer(path: str, layer: nn.Module, weight: torch.Tensor, dtype: torch.dtype, double_quant: bool):
    """A LoRA layer's W0 to NF4 (quantised from `weight`) and its base product to the one that dequantises
    it; refused for DoRA and PiSSA, which read or rewrite W0, and for a merged layer."""
    if getattr(layer, "init", "lora") != "lora" or hasattr(layer, "lora_magnitude"):
        raise ValueError(f"{path}: an NF4 base takes plain LoRA (not DoRA or PiSSA, which change or read W0).")
    if layer.merged:
        raise ValueError(f"{path} is merged: unmerge_lora(model) before quantising its base.")
    quantized = NF4Weight(weight, dtype, double_quant)
    del layer.weight  # a Parameter's place takes no module
    layer.weight = quantized
    layer.base_product = nf4_linear


def quantize_base(model: nn.Module, dtype: torch.dtype, double_quant: bool = True, skip=("lm_head",)) -> int:
    """QLoRA's base: every frozen linear layer's weight to NF4, computing in `dtype` (the LoRA layers' W0
    included; their A and B are untouched), except the modules named in `skip` (bitsandbytes leaves
    lm_head out by default). Call it after inject_lora and before set_base_dtype, so that the 4-bit
    weights come from the weights as loaded. Returns how many layers it quantised."""
    count = 0
    for path, layer in lora_layers(model).items():
        quantize_lora_layer(path, layer, layer.weight, dtype, double_quant)
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)
        count += 1
    for path, module in list(model.named_modules()):
        parent_path, _, name = path.rpartition(".")
        if isinstance(module, nn.Linear) and name not in skip and not module.weight.requires_grad:
            setattr(model.get_submodule(parent_path), name, LinearNF4(module.weight, module.bias, dtype, double_quant))
            count += 1
    return count


@torch.no_grad()
def dequantize_base(model: nn.Module, dtype: torch.dtype) -> None:
    """The inverse of quantize_base up to NF4's rounding: every NF4 weight back to a dense frozen weight in
    `dtype` (bf16 or fp32), before a merge (an adapter is never merged into 4 bits) or an export."""
    for layer in lora_layers(model).values():
        if isinstance(layer.weight, NF4Weight):
            dense = layer.weight.dequantize(dtype)
            del layer.weight
            layer.weight = nn.Parameter(dense, requires_grad=False)
            del layer.base_product  # back to the class's F.linear
    for path, module in list(model.named_modules()):
        if isinstance(module, LinearNF4):
            parent_path, _, name = path.rpartition(".")
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            linear.weight = nn.Parameter(module.weight.dequantize(dtype), requires_grad=False)
            if module.bias is not None:
                linear.bias = nn.Parameter(module.bias.to(dtype), requires_grad=False)
            setattr(model.get_submodule(parent_path), name, linear)


def nf4_bytes(model: nn.Module) -> int:
    """The bytes of every NF4 weight in `model`: packed indices and scales."""
    return sum(module.nbytes() for module in model.modules() if isinstance(module, NF4Weight))
