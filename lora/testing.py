"""Check anyone's LoRA layer against the formula and against this project's `LoRALinear`.

    python -m lora.testing my_lora.py:make_layer      # or a module name: my_package.layers:make_layer

`make_layer(base: nn.Linear, r: int, alpha: float)` returns the layer under test wrapping `base`, with its
low-rank factors as `lora_A` (r, in) and `lora_B` (out, r): parameters, or modules holding a `.weight`.
The checks set A and B to known values and compare the layer with

    h = W0 x + b + s · B A x,    s = alpha / r   (alpha / sqrt(r) for rsLoRA)

or, for a DoRA layer (`dora=True`, `--dora`; its magnitude m (out,) as `lora_magnitude`),

    h = m ⊙ (W0 + s·B A) x / ‖W0 + s·B A‖_c + b,    ‖·‖_c the L2 norm of each output row, a constant
                                                      for autograd (DoRA, Section 4.3)

its gradients with the hand-derived ones, and (when it has them) its `merge()`/`unmerge()` with their
definitions. `check_lora_layer` returns a `Report`; `assert_lora_layer` raises AssertionError with it.
A failed check comes with one sentence naming the likely mistake.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import importlib
import importlib.util
import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

# fp32 rounding of these small products stays far below this; a wrong formula is off by O(1)
FP32_TOLERANCE = 1e-5


@dataclass
class Check:
    name: str
    passed: bool | None  # None: not applicable to this layer
    error: float | None = None
    bound: float | None = None
    mistake: str = ""  # for a failure, the likely mistake; for a skip, why
    convention: bool = False  # a layout or dtype a project may or may not want, not LoRA's math


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)  # check_adapter_dir: ‖s·B A‖_F per module

    @property
    def passed(self) -> bool:
        """Every check of LoRA's math passed (the forward, the gradients, the frozen base, dropout, merge)."""
        return all(check.passed is not False for check in self.checks if not check.convention)

    @property
    def conventions_kept(self) -> bool:
        """Every convention check passed: a merged state dict in nn.Linear's layout, a bf16 base."""
        return all(check.passed is not False for check in self.checks if check.convention)

    def add(self, name: str, error: float | None, bound: float | None, mistake: str, convention=False) -> bool:
        passed = error is not None and bound is not None and error <= bound
        self.checks.append(Check(name, passed, error, bound, "" if passed else mistake, convention))
        return passed

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, None, mistake=why))

    def __str__(self) -> str:
        lines = ["| check | result | error | bound | likely mistake |", "|---|---|---|---|---|"]
        for c in self.checks:
            result = {True: "passed", False: "not kept" if c.convention else "FAILED", None: "n/a"}[c.passed]
            error = "" if c.error is None else f"{c.error:.3g}"
            bound = "" if c.bound is None else f"{c.bound:.3g}"
            name = f"{c.name} (convention)" if c.convention else c.name
            lines.append(f"| {name} | {result} | {error} | {bound} | {c.mistake} |")
        return "\n".join(lines)


def base_weight(layer: nn.Module, shape: torch.Size) -> torch.Tensor:
    """The layer's frozen W0: its parameter of W0's shape that is not a LoRA factor."""
    for name, param in layer.named_parameters():
        if param.shape == shape and "lora" not in name:
            return param
    raise TypeError(f"the layer holds no parameter of W0's shape {tuple(shape)}.")


def factor(layer: nn.Module, name: str) -> torch.Tensor:
    """The layer's lora_A or lora_B as a tensor: a Parameter, or the .weight of a module."""
    value = getattr(layer, name, None)
    if isinstance(value, nn.Module):
        value = getattr(value, "weight", None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"the layer has no '{name}' parameter (nor a module with a .weight under that name).")
    return value


def reference_output(x, w0, b0, A, B, scaling, magnitude=None) -> torch.Tensor:
    """The formula, in fp32: W0 x + b + s·B A x, or DoRA's m ⊙ (W0 + s·B A) x / ‖W0 + s·B A‖_c + b."""
    weight = reference_weight(w0, A, B, scaling, magnitude)
    return x.float() @ weight.T + b0.float()


def reference_weight(w0, A, B, scaling, magnitude=None) -> torch.Tensor:
    """The one weight the layer computes with (what a merge writes), in fp32; the DoRA norm is detached."""
    weight = w0.float() + scaling * B.float() @ A.float()
    if magnitude is None:
        return weight
    return (magnitude.float() / weight.norm(dim=1).detach()).unsqueeze(1) * weight


def check_lora_layer(
    make_layer: Callable[[nn.Linear, int, float], nn.Module],
    *,
    in_features: int = 24,
    out_features: int = 16,
    r: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    zero_init: bool = True,
    dora: bool = False,
    seed: int = 0,
) -> Report:
    """Run every check on the layer `make_layer` builds; see the module's docstring."""
    report = Report()
    generator = torch.Generator().manual_seed(seed)
    base = nn.Linear(in_features, out_features, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features))
        base.bias.copy_(torch.randn(out_features, generator=generator) * 0.1)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(5, in_features, generator=generator)
    layer = make_layer(copy.deepcopy(base), r, alpha)
    A, B = factor(layer, "lora_A"), factor(layer, "lora_B")
    shapes_ok = tuple(A.shape) == (r, in_features) and tuple(B.shape) == (out_features, r)
    report.add(
        "shapes: A (r, in), B (out, r)", 0.0 if shapes_ok else 1.0, 0.0,
        f"A is {tuple(A.shape)} and B {tuple(B.shape)}, expected A {(r, in_features)} and B {(out_features, r)}: "
        "A and B are swapped or transposed (PEFT's A is an nn.Linear(in, r), whose weight is (r, in)).",
    )  # fmt: skip
    if not shapes_ok:
        return report
    M = None
    if dora:
        try:
            M = factor(layer, "lora_magnitude")
        except TypeError as err:
            report.add("DoRA magnitude m (out,)", 1.0, 0.0, f"{err} A DoRA layer trains m, one value per output row.")
            return report
        magnitude_ok = tuple(M.shape) == (out_features,)
        shape_sentence = f"m is {tuple(M.shape)}, expected ({out_features},): one magnitude per output row of W0."
        report.add("DoRA magnitude m (out,)", 0.0 if magnitude_ok else 1.0, 0.0, shape_sentence)
        if not magnitude_ok:
            return report
    expected_base = x @ w0.T + b0
    layer.eval()
    with torch.no_grad():
        at_init = layer(x)
    if not _returns_one_tensor(report, at_init, (x.shape[0], out_features)):
        return report
    if zero_init:
        report.add(
            "at initialisation the layer is its base", _err(at_init, expected_base), FP32_TOLERANCE,
            "the layer does not compute its base at step 0: B must start at zero (A random, B zero).",
        )  # fmt: skip
    else:
        report.skip("at initialisation the layer is its base", "the caller says its init differs")
    scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
    A_value = torch.randn(r, in_features, generator=generator) * 0.3
    B_value = torch.randn(out_features, r, generator=generator) * 0.3
    # DoRA's m: the norm of the adapted rows, scaled by random factors, so that m, the norm and the
    # direction each show in the output
    m_value = None
    if M is not None:
        row_scale = 1 + 0.5 * torch.rand(out_features, generator=generator)
        m_value = reference_weight(w0, A_value, B_value, scaling).norm(dim=1) * row_scale
    factors = Factors(A, B, M, A_value, B_value, m_value, scaling)
    factors.set()
    groups = [
        ("forward", _check_forward, (layer, x, w0, b0, factors, alpha, r, use_rslora, at_init)),
        ("gradients", _check_gradients, (layer, x, w0, b0, factors, generator, _scale_mistakes(alpha, r, use_rslora))),
        ("dropout", _check_dropout, (layer, x, expected_base, factors, w0)),
        ("merge and unmerge", _check_merge, (layer, x, w0, b0, factors)),
        ("bf16 base, fp32 A and B", _check_bf16_base, (make_layer, base, x, r, alpha, factors)),
    ]
    for name, check, arguments in groups:
        factors.set()  # the known values, whatever the group before did to them
        try:
            check(report, *arguments)
        except Exception as err:  # noqa: BLE001  (the layer's code may raise anything: it is this group's failure)
            report.add(name, None, None, _raised(err), convention=name.startswith("bf16"))
    return report


def _returns_one_tensor(report: Report, output, shape: tuple[int, int]) -> bool:
    """The forward returns one tensor of the base's output shape, as nn.Linear does (T5 calls q(x))."""
    if isinstance(output, torch.Tensor) and tuple(output.shape) == shape:
        return report.add("the forward returns one tensor (batch, out)", 0.0, 0.0, "")
    what = f"a tensor of shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
    return report.add(
        "the forward returns one tensor (batch, out)", 1.0, 0.0,
        f"the forward returns {what}, not one tensor of shape {shape}: return h alone, as nn.Linear does "
        "(T5 calls q(x) and uses what it returns as a tensor).",
    )  # fmt: skip


def _raised(err: Exception) -> str:
    """A check group the layer's code broke: what it raised, and the likely mistake where the error says."""
    sentence = f"the layer raised {type(err).__name__} ({str(err).strip()[:300]})"
    if isinstance(err, RuntimeError) and "does not require grad" in str(err):
        return (
            f"{sentence}: no gradient reaches A or B, so the forward computes the update from something "
            "other than A and B (a cached or detached copy); compute s·B A x from them in every forward."
        )
    return sentence + "."


@dataclass
class Factors:
    """The layer's trainable tensors (A, B and DoRA's m, None for LoRA), the known values the checks give
    them, and the scaling s."""

    A: torch.Tensor
    B: torch.Tensor
    M: torch.Tensor | None
    A_value: torch.Tensor
    B_value: torch.Tensor
    m_value: torch.Tensor | None
    scaling: float

    def set(self, layer: nn.Module | None = None) -> None:
        """Give the known values to this layer's factors (or to `layer`'s, another layer of the same kind)."""
        A, B = (self.A, self.B) if layer is None else (factor(layer, "lora_A"), factor(layer, "lora_B"))
        M = self.M if layer is None or self.M is None else factor(layer, "lora_magnitude")
        with torch.no_grad():
            A.copy_(self.A_value)
            B.copy_(self.B_value)
            if M is not None:
                M.copy_(self.m_value)

    def expected(self, x, w0, b0, scaling=None) -> torch.Tensor:
        scaling = self.scaling if scaling is None else scaling
        return reference_output(x, w0, b0, self.A_value, self.B_value, scaling, self.m_value)

    def expected_weight(self, w0, scaling=None) -> torch.Tensor:
        scaling = self.scaling if scaling is None else scaling
        return reference_weight(w0, self.A_value, self.B_value, scaling, self.m_value)


def assert_lora_layer(make_layer, strict: bool = False, **options) -> Report:
    """check_lora_layer, raising AssertionError with the report when a check of LoRA's math fails (with
    `strict`, a convention too) (for a user's pytest)."""
    report = check_lora_layer(make_layer, **options)
    if not report.passed or (strict and not report.conventions_kept):
        raise AssertionError("the LoRA layer failed checks:\n" + str(report))
    return report


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the larger magnitude (1 at least): an error rounding cannot reach."""
    scale = max(b.detach().abs().max().item(), 1.0)
    return (a.detach().float() - b.detach().float()).abs().max().item() / scale


def _check_forward(report, layer, x, w0, b0, factors, alpha, r, use_rslora, at_init) -> None:
    with torch.no_grad():
        got = layer(x)
    scaling, dora = factors.scaling, factors.M is not None
    error = _err(got, factors.expected(x, w0, b0))
    formula = "m ⊙ (W0 + s·B A) x / ‖W0 + s·B A‖_c + b" if dora else "W0 x + b + s·B A x"
    mistake = f"the forward does not compute {formula}."
    scale_mistakes = _scale_mistakes(alpha, r, use_rslora)
    wrong_outputs = [(factors.expected(x, w0, b0, scale), sentence) for scale, sentence in scale_mistakes]
    if dora:
        A, B, m = factors.A_value, factors.B_value, factors.m_value
        adapted = w0 + scaling * B @ A
        wrong_outputs += [
            (reference_output(x, w0, b0, A, B, scaling), "the magnitude m is not applied: this is plain LoRA."),
            (x @ ((m / w0.norm(dim=1)).unsqueeze(1) * adapted).T + b0,
             "the norm is taken of W0 alone; DoRA divides by the norm of the adapted weight ‖W0 + s·B A‖_c."),
        ]  # fmt: skip
    for wrong, sentence in wrong_outputs:
        if wrong is not None and _err(got, wrong) <= FP32_TOLERANCE and error > FP32_TOLERANCE:
            mistake = sentence
    if error > FP32_TOLERANCE and _err(got, at_init) <= FP32_TOLERANCE:
        mistake = ("the output did not change when A and B were given new values: the layer computes its update "
                   "once and keeps it (or keeps copies of A and B); compute s·B A x from lora_A and lora_B in every "
                   "forward.")  # fmt: skip
    report.add(f"forward: {formula} (eval mode)", error, FP32_TOLERANCE, mistake)


def _scale_mistakes(alpha: float, r: int, use_rslora: bool) -> list[tuple[float, str]]:
    """The scales a LoRA layer is often written with instead of s, each with the sentence naming the mistake."""
    other_scale = alpha / r if use_rslora else alpha / math.sqrt(r)
    return [
        (alpha, "the update is scaled by alpha, not alpha / r."),
        (other_scale, "rsLoRA's alpha / sqrt(r) and LoRA's alpha / r are confused."),
        (1.0, "the update is not scaled at all (s = 1): multiply by alpha / r."),
    ]


def _scaling_mistake(name: str, got: torch.Tensor, expected: torch.Tensor, scaling: float, scale_mistakes):
    """When a gradient is a constant multiple of the formula's, the update's scale is wrong, not the factor's
    use: the sentence that says so (naming the usual mistake when the multiple matches one), else None."""
    norm = (expected.float() ** 2).sum()
    if norm == 0:
        return None
    multiple = ((got.float() * expected.float()).sum() / norm).item()
    if abs(multiple - 1) < 1e-3 or _err(got, multiple * expected) > FP32_TOLERANCE:
        return None
    for scale, sentence in scale_mistakes:
        if math.isclose(multiple * scaling, scale, rel_tol=1e-3):
            return sentence
    return f"{name}'s gradient is {multiple:.4g} times the formula's: the update's scale s is wrong."


def _check_gradients(report, layer, x, w0, b0, factors, generator, scale_mistakes) -> None:
    layer.eval()  # dropout off: the gradients are then exactly the formula's
    A, B, M, scaling = factors.A, factors.B, factors.M, factors.scaling
    for param in layer.parameters():
        param.grad = None
    g = torch.randn(x.shape[0], B.shape[0], generator=generator)  # dL/dh
    (layer(x) * g).sum().backward()
    if M is None:  # LoRA's, by hand
        expected = {"A": scaling * (g @ factors.B_value).T @ x, "B": scaling * g.T @ (x @ factors.A_value.T)}
        formulas, attached = {"A": "s·Bᵀ G xᵀ", "B": "s·G (A x)ᵀ"}, {}
    else:  # DoRA's, by autograd through the reference formula: with the norm detached, and (wrongly) not
        expected, attached = _dora_gradients(x, w0, b0, factors, g, True), _dora_gradients(x, w0, b0, factors, g, False)
        formulas = {"A": "DoRA's", "B": "DoRA's", "m": "DoRA's"}
    for name, tensor in (("A", A), ("B", B), ("m", M)):
        if name not in expected:
            continue
        got = tensor.grad if tensor.grad is not None else torch.zeros_like(expected[name])
        mistake = (
            f"{name}'s gradient is not the formula's: {name} is detached, not trainable, or misused in the forward."
        )
        scaled = _scaling_mistake(name, got, expected[name], scaling, scale_mistakes) if M is None else None
        if scaled:
            mistake = scaled
        elif name in attached and _err(got, attached[name]) <= FP32_TOLERANCE:
            mistake = ("the gradient flows through the norm ‖W0 + s·B A‖_c: DoRA (Section 4.3) treats it as a "
                       "constant; compute it under torch.no_grad() or .detach() it.")  # fmt: skip
        report.add(f"gradient of {name} is {formulas[name]}", _err(got, expected[name]), FP32_TOLERANCE, mistake)
    frozen = [n for n, p in layer.named_parameters() if p.grad is not None and all(p is not t for t in (A, B, M))]
    frozen = [n for n in frozen if n.split(".")[-1] in ("weight", "bias") and "lora" not in n]
    report.add(
        "W0 and b get no gradient", float(len(frozen)), 0.0,
        f"{', '.join(frozen)} get a gradient: the base is left trainable (requires_grad_(False) on W0 and b).",
    )  # fmt: skip
    trainable = [p for p in layer.parameters() if p.requires_grad]
    torch.optim.AdamW(trainable, lr=0.1).step()
    weights = [p for n, p in layer.named_parameters() if "lora" not in n and p.shape in (w0.shape, b0.shape)]
    moved = max([(p.detach() - (w0 if p.shape == w0.shape else b0)).abs().max().item() for p in weights], default=0)
    report.add(
        "W0 and b are bit-equal after an optimizer step", moved, 0.0,
        "the base weights moved in an optimizer step: W0 or b is trainable.",
    )  # fmt: skip
    for param in layer.parameters():
        param.grad = None


def _dora_gradients(x, w0, b0, factors, g, detach_norm: bool) -> dict[str, torch.Tensor]:
    A, B, m = (t.detach().clone().requires_grad_(True) for t in (factors.A_value, factors.B_value, factors.m_value))
    weight = w0 + factors.scaling * B @ A
    norm = weight.norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    ((x @ ((m / norm).unsqueeze(1) * weight).T + b0) * g).sum().backward()
    return {"A": A.grad, "B": B.grad, "m": m.grad}


def _check_dropout(report, layer, x, expected_base, factors, w0) -> None:
    layer.train()
    with torch.no_grad():
        first, second = layer(x), layer(x)
    layer.eval()
    with torch.no_grad():
        eval_first, eval_second = layer(x), layer(x)
    report.add(
        "no dropout in eval mode", _err(eval_first, eval_second), 0.0,
        "two eval-mode calls differ: dropout is still active in eval mode (use nn.Dropout, which .eval() turns off).",
    )  # fmt: skip
    if torch.equal(first, second):
        report.skip("dropout touches only the low-rank branch", "the layer has no dropout in train mode")
        return
    B, M = factors.B, factors.M
    saved = [t.detach().clone() for t in (B, M) if t is not None]
    with torch.no_grad():
        B.zero_()
        if M is not None:  # DoRA with B = 0 and m = ‖W0‖_c is its base
            M.copy_(w0.norm(dim=1))
        layer.train()
        base_only = layer(x)
        for tensor, value in zip((B, M), saved):
            tensor.copy_(value)
    layer.eval()
    report.add(
        "dropout touches only the low-rank branch", _err(base_only, expected_base), FP32_TOLERANCE,
        "with B = 0 the train-mode output is not the base: dropout is applied to the base path, not only to x "
        "before A.",
    )  # fmt: skip


def _check_merge(report, layer, x, w0, b0, factors) -> None:
    if not (callable(getattr(layer, "merge", None)) and callable(getattr(layer, "unmerge", None))):
        report.skip("merge and unmerge", "the layer has no merge()/unmerge()")
        return
    layer.eval()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged = layer(x)
        weight = base_weight(layer, w0.shape)
        weight_once = weight.detach().clone()
        layer.merge()
        weight_twice = weight.detach().clone()
    expected_weight = factors.expected_weight(w0)
    mistake = "the merged layer computes something else than the unmerged one."
    if _err(weight_once, factors.expected_weight(w0, scaling=1.0)) <= FP32_TOLERANCE:
        mistake = "the merge adds B A to W0 without the scaling s = alpha / r."
    elif _err(weight_once, expected_weight) > FP32_TOLERANCE:
        mistake = "the merged weight is not " + ("m ⊙ W' / ‖W'‖_c, W' = W0 + s·B A." if factors.M is not None
                                                 else "W0 + s·B A.")  # fmt: skip
    report.add("merged output equals unmerged", _err(merged, unmerged), FP32_TOLERANCE, mistake)
    report.add(
        "merging twice equals merging once", _err(weight_twice, weight_once), 0.0,
        "a second merge() changed the weight again: guard merge with a `merged` flag.",
    )  # fmt: skip
    plain = nn.Linear(w0.shape[1], w0.shape[0])
    missing, _ = plain.load_state_dict(layer.state_dict(), strict=False)
    loads = not missing and _err(plain(x), merged) <= FP32_TOLERANCE
    report.add(
        "a merged state dict loads into nn.Linear", 0.0 if loads else 1.0, 0.0,
        f"nn.Linear cannot take the merged layer's state dict (missing {missing or 'nothing'}, or other outputs): "
        "the base weight is not under the key 'weight' (and 'bias'), as a base checkpoint has it.",
        convention=True,
    )  # fmt: skip
    with torch.no_grad():
        layer.unmerge()
    bound = 4 * torch.finfo(w0.dtype).eps * max(expected_weight.abs().max().item(), 1.0)
    report.add(
        "unmerge gives W0 back within rounding", (weight.detach() - w0).abs().max().item(), bound,
        "after unmerge() the weight is not W0: unmerge must subtract exactly what merge added.",
    )  # fmt: skip


def _check_bf16_base(report, make_layer, base, x, r, alpha, factors) -> None:
    """A bf16 W0 and b with fp32 A and B, as set_base_dtype leaves them: the output is the base product in bf16
    plus the fp32 update, rounded once; anything within two bf16 units of that passes."""
    layer = make_layer(copy.deepcopy(base), r, alpha).eval()
    try:
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if "lora" not in name:
                    param.data = param.data.to(torch.bfloat16)
            factors.set(layer)
            x16 = x.to(torch.bfloat16)
            got = layer(x16)
    except RuntimeError as err:
        report.add("bf16 base, fp32 A and B", None, None, f"the layer does not run on a bf16 base ({str(err)[:120]}): "
                   "fine for a layer used in fp32 only; set_base_dtype(model, torch.bfloat16) needs it.",
                   convention=True)  # fmt: skip
        return
    with torch.no_grad():
        w16, b16 = base.weight.to(torch.bfloat16), base.bias.to(torch.bfloat16)
        expected = factors.expected(x16.float(), w16.float(), b16.float())
    bound = 2 * 2.0**-8  # two bf16 units, relative to the output's magnitude
    mistake = (
        "on a bf16 base the output is off by more than bf16's rounding: the update is lost or computed in too low "
        "a precision (compute s·B A x in A's dtype, cast once before the sum)."
    )
    if any(check.name.startswith("forward") and check.passed is False for check in report.checks):
        mistake = "the forward is wrong in fp32 already (its row above says how): this follows from it."
    report.add("bf16 base, fp32 A and B", _err(got, expected), bound, mistake)  # it runs: its values are math


def check_adapter_dir(directory, base: nn.Module | str) -> Report:
    """Check an adapter directory from any tool (ours, PEFT's) against a base model (a module, or what
    --model takes): its config, every key's module and shape, finite values, the update's norm per module
    (an all-zero B is flagged), that it loads here, and, where peft is installed, PEFT's logits against ours."""
    from safetensors.torch import load_file

    from .files import loads_json
    from .load import load_adapter, read_adapter_config
    from .save import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, AdapterError

    report, directory = Report(), Path(directory)
    if isinstance(base, str):
        from support.models import load_model_and_tokenizer

        base = load_model_and_tokenizer(base)[0]
    try:
        config = read_adapter_config(directory)
        report.add("config", 0.0, 0.0, "")
    except AdapterError as err:
        report.add("config", 1.0, 0.0, str(err))
        try:
            config = loads_json((directory / CONFIG_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return report
    try:
        tensors = load_file(str(directory / WEIGHTS_NAME))
    except Exception as err:  # a missing or damaged file: say so, check nothing more
        report.add("weights file", 1.0, 0.0, f"{directory / WEIGHTS_NAME} cannot be read ({str(err)[:100]}).")
        return report
    r = config.get("r")
    modules = {name: module for name, module in base.named_modules() if isinstance(module, nn.Linear)}
    problems, layers = [], {}
    for key, tensor in tensors.items():
        path, _, kind = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
        if not key.startswith(KEY_PREFIX) or path not in modules:
            problems.append(f"'{key}' names no linear layer of the base")
            continue
        linear = modules[path]
        expected = {"A.weight": (r, linear.in_features), "B.weight": (linear.out_features, r),
                    "magnitude_vector": (linear.out_features,)}.get(kind)  # fmt: skip
        if expected is None or tuple(tensor.shape) != expected:
            problems.append(f"'{key}' has shape {tuple(tensor.shape)}, not {expected} (r={r})")
        layers.setdefault(path, {})[kind] = tensor
    report.add("every key names a linear layer, in the shape r implies", float(len(problems)), 0.0,
               "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""))  # fmt: skip
    bad = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    report.add("no NaN or inf", float(len(bad)), 0.0, f"non-finite values in {', '.join(bad[:3])}")
    alpha, rslora = config.get("lora_alpha", r), config.get("use_rslora", False)
    scaling = alpha / math.sqrt(r) if rslora else alpha / r if isinstance(r, int) and r > 0 else 1.0
    norms, zero = {}, []
    for path, parts in sorted(layers.items()):
        if "A.weight" in parts and "B.weight" in parts and parts["B.weight"].shape[-1] == parts["A.weight"].shape[0]:
            norms[path] = (scaling * parts["B.weight"].float() @ parts["A.weight"].float()).norm().item()
            if not parts["B.weight"].any():
                zero.append(path)
    report.norms = norms
    report.add(
        "B is not all zero (a trained adapter)", float(len(zero)), 0.0,
        f"B is all zero in {len(zero)} module(s), e.g. {zero[:1]}: the update is nothing; was it trained?",
    )  # fmt: skip
    ours = copy.deepcopy(base).eval()
    try:
        load_adapter(ours, directory)
        report.add("loads here", 0.0, 0.0, "")
    except (AdapterError, ValueError) as err:
        report.add("loads here", 1.0, 0.0, str(err))
        return report
    with quiet_oracle():
        try:
            from peft import PeftModel
        except ImportError:
            report.skip("PEFT's logits equal ours", "peft is not installed")
            return report
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(directory)).eval()
    generator = torch.Generator().manual_seed(0)
    vocab = base.config.vocab_size
    inputs = {"input_ids": torch.randint(2, vocab, (2, 7), generator=generator),
              "decoder_input_ids": torch.randint(2, vocab, (2, 5), generator=generator)}  # fmt: skip
    with torch.no_grad():
        error = _err(ours(**inputs).logits, theirs(**inputs).logits)
    report.add("PEFT's logits equal ours", error, FP32_TOLERANCE * 10, "PEFT computes other logits from these files.")
    return report


@contextmanager
def quiet_oracle() -> Iterator[None]:
    """Inside the block, peft's import and load print nothing of their own: bitsandbytes, which peft imports,
    logs a warning when an optional CPU kernel is missing, and transformers warns of its own deprecations
    when peft calls them; neither is about the adapter. Both settings are restored on exit."""
    import logging
    import warnings

    bitsandbytes = logging.getLogger("bitsandbytes")
    level = bitsandbytes.level
    bitsandbytes.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        bitsandbytes.setLevel(level)


def load_factory(spec: str) -> Callable:
    """'path/to/file.py:NAME' or 'package.module:NAME' -> the callable."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"{spec!r} is not MODULE:FACTORY (e.g. my_lora.py:make_layer).")
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ValueError(f"{path} does not exist.")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(where)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ValueError(f"{where} has no callable named {name!r}.")
    return factory


def _config_base(directory: Path) -> str:
    from .files import loads_json
    from .save import CONFIG_NAME

    try:
        name = loads_json((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    if not name:
        raise ValueError(f"{directory} does not name its base model: pass --model.")
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora.testing", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("factory", nargs="?", help="MODULE:FACTORY, e.g. my_lora.py:make_layer; make_layer(base, r, alpha)")
    p.add_argument("--adapter", type=Path, help="check this adapter directory instead (ours, PEFT's, any tool's)")
    p.add_argument("--model", default=None, help="its base model, as train.py's --model (default: the config's)")
    p.add_argument("--r", type=int, default=4, help="rank to build the layer with (default: 4)")
    p.add_argument("--alpha", type=float, default=8.0, help="alpha to build the layer with (default: 8)")
    p.add_argument("--rslora", action="store_true", help="the layer scales by alpha / sqrt(r)")
    p.add_argument("--nonzero-init", action="store_true", help="the layer's init is not B = 0 (PiSSA, OLoRA...)")
    p.add_argument("--dora", action="store_true", help="the layer is DoRA's, its magnitude m as lora_magnitude")
    p.add_argument("--timeout", type=float, default=600, help="seconds the checks may take (default: 600)")
    p.add_argument("--strict", action="store_true", help="a convention not kept (nn.Linear's state-dict layout, "
                   "a bf16 base) fails the run too; by default only LoRA's math does")  # fmt: skip
    args = p.parse_args(argv)
    if (args.factory is None) == (args.adapter is None):
        p.error("give a MODULE:FACTORY or --adapter DIR (one of them)")
    if not args.timeout > 0:
        p.error(f"--timeout must be positive, got {args.timeout}")
    try:
        with time_limit(args.timeout):
            report = run_checks(args)
    except (ValueError, TypeError, ImportError, SyntaxError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except CheckTimeout:
        print(f"error: the checks did not finish within {args.timeout:g} s (--timeout): the layer's code hangs or "
              "is far slower than a LoRA layer; every check counts as failed.", file=sys.stderr)  # fmt: skip
        return 1
    except SystemExit as err:  # the layer's own code: a CI gate must not read it as the kit's verdict
        print(f"error: the layer's code called sys.exit({err.code!r}) while it was checked, so no check could "
              "finish; every check counts as failed.", file=sys.stderr)  # fmt: skip
        return 1
    except Exception as err:  # noqa: BLE001  (the layer's code may raise anything)
        print(f"error: the layer raised {type(err).__name__} while it was checked ({str(err)[:300]}); every "
              "check counts as failed.", file=sys.stderr)  # fmt: skip
        return 1
    failed = sum(check.passed is False and not check.convention for check in report.checks)
    not_kept = sum(check.passed is False and check.convention for check in report.checks)
    verdict = "all checks of LoRA's math passed" if not failed else f"{failed} check(s) of LoRA's math failed"
    if not_kept:
        verdict += f"; {not_kept} convention(s) not kept" + (" (--strict: they fail the run)" if args.strict
                                                             else " (--strict would fail the run)")  # fmt: skip
    try:
        for path, norm in report.norms.items():
            print(f"{path}: ‖s·B A‖_F = {norm:.4g}")
        print(f"{report}\n\n{verdict}", flush=True)
    except BrokenPipeError:  # `... | head`: the reader left; end quietly
        from support.cli import reader_gone

        return reader_gone()
    return 1 if failed or (args.strict and not_kept) else 0


class CheckTimeout(Exception):
    """The checks ran past --timeout."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Inside the block, CheckTimeout after `seconds` (raised between bytecodes, in the main thread); code stuck
    in C past 10 s more is ended by faulthandler, which prints where it hung and exits with status 1."""

    def expire(signum, frame):
        raise CheckTimeout

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + 10, exit=True, file=sys.__stderr__)  # the process's own stderr
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()


def run_checks(args: argparse.Namespace) -> Report:
    """The command line's checks: of an adapter directory, or of the layer a factory builds."""
    if args.adapter is not None:
        return check_adapter_dir(args.adapter, args.model or _config_base(args.adapter))
    factory = load_factory(args.factory)
    return check_lora_layer(
        factory,
        r=args.r,
        alpha=args.alpha,
        use_rslora=args.rslora,
        zero_init=not args.nonzero_init,
        dora=args.dora,
    )


if __name__ == "__main__":
    raise SystemExit(main())
