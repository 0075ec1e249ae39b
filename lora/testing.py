"""Check anyone's LoRA layer against the formula and against this project's `LoRALinear`.

    python -m lora.testing my_lora.py:make_layer      # or a module name: my_package.layers:make_layer

`make_layer(base: nn.Linear, r: int, alpha: float)` returns the layer under test wrapping `base`, with its
low-rank factors as `lora_A` (r, in) and `lora_B` (out, r): parameters, or modules holding a `.weight`.
The checks set A and B to known values and compare the layer with

    h = W0 x + b + s · B A x,    s = alpha / r   (alpha / sqrt(r) for rsLoRA)

its gradients with the hand-derived ones, and (when it has them) its `merge()`/`unmerge()` with their
definitions. `check_lora_layer` returns a `Report`; `assert_lora_layer` raises AssertionError with it.
A failed check comes with one sentence naming the likely mistake.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
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


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=dict)  # check_adapter_dir: ‖s·B A‖_F per module

    @property
    def passed(self) -> bool:
        return all(check.passed is not False for check in self.checks)

    def add(self, name: str, error: float | None, bound: float | None, mistake: str) -> bool:
        passed = error is not None and bound is not None and error <= bound
        self.checks.append(Check(name, passed, error, bound, "" if passed else mistake))
        return passed

    def skip(self, name: str, why: str) -> None:
        self.checks.append(Check(name, None, mistake=why))

    def __str__(self) -> str:
        lines = ["| check | result | error | bound | likely mistake |", "|---|---|---|---|---|"]
        for c in self.checks:
            result = {True: "passed", False: "FAILED", None: "n/a"}[c.passed]
            error = "" if c.error is None else f"{c.error:.3g}"
            bound = "" if c.bound is None else f"{c.bound:.3g}"
            lines.append(f"| {c.name} | {result} | {error} | {bound} | {c.mistake} |")
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


def check_lora_layer(
    make_layer: Callable[[nn.Linear, int, float], nn.Module],
    *,
    in_features: int = 24,
    out_features: int = 16,
    r: int = 4,
    alpha: float = 8.0,
    use_rslora: bool = False,
    zero_init: bool = True,
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
    expected_base = x @ w0.T + b0
    layer.eval()
    with torch.no_grad():
        at_init = layer(x)
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
    with torch.no_grad():
        A.copy_(A_value)
        B.copy_(B_value)
    _check_forward(report, layer, x, expected_base, A_value, B_value, scaling, alpha, r, use_rslora)
    _check_gradients(report, layer, x, A, B, A_value, B_value, scaling, w0, b0, generator)
    _check_dropout(report, layer, x, expected_base, B)
    with torch.no_grad():
        A.copy_(A_value)
        B.copy_(B_value)
    _check_merge(report, layer, x, w0, b0, A_value, B_value, scaling)
    _check_bf16_base(report, make_layer, base, x, r, alpha, A_value, B_value, scaling)
    return report


def assert_lora_layer(make_layer, **options) -> Report:
    """check_lora_layer, raising AssertionError with the report when a check fails (for a user's pytest)."""
    report = check_lora_layer(make_layer, **options)
    if not report.passed:
        raise AssertionError("the LoRA layer failed checks:\n" + str(report))
    return report


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference relative to the larger magnitude (1 at least): an error rounding cannot reach."""
    scale = max(b.detach().abs().max().item(), 1.0)
    return (a.detach().float() - b.detach().float()).abs().max().item() / scale


def _check_forward(report, layer, x, expected_base, A, B, scaling, alpha, r, use_rslora) -> None:
    with torch.no_grad():
        got = layer(x)
    low_rank = x @ A.T @ B.T  # (N, out): B A x without the scaling
    error = _err(got, expected_base + scaling * low_rank)
    mistake = "the forward does not compute W0 x + b + s·B A x."
    other_scale = alpha / r if use_rslora else alpha / math.sqrt(r)
    for wrong, sentence in [
        (alpha, "the update is scaled by alpha, not alpha / r."),
        (other_scale, "rsLoRA's alpha / sqrt(r) and LoRA's alpha / r are confused."),
        (1.0, "the update is not scaled at all (s = 1): multiply by alpha / r."),
    ]:
        if wrong != scaling and _err(got, expected_base + wrong * low_rank) <= FP32_TOLERANCE:
            mistake = sentence
    report.add("forward: W0 x + b + s·B A x (eval mode)", error, FP32_TOLERANCE, mistake)


def _check_gradients(report, layer, x, A, B, A_value, B_value, scaling, w0, b0, generator) -> None:
    layer.eval()  # dropout off: the gradients are then exactly the formula's
    for param in layer.parameters():
        param.grad = None
    g = torch.randn(x.shape[0], B.shape[0], generator=generator)  # dL/dh
    (layer(x) * g).sum().backward()
    grad_B = scaling * g.T @ (x @ A_value.T)  # (out, r)
    grad_A = scaling * (g @ B_value).T @ x  # (r, in)
    for name, tensor, expected in (("A", A, grad_A), ("B", B, grad_B)):
        got = tensor.grad if tensor.grad is not None else torch.zeros_like(expected)
        report.add(
            f"gradient of {name} is s·{'Bᵀ G xᵀ' if name == 'A' else 'G (A x)ᵀ'}", _err(got, expected), FP32_TOLERANCE,
            f"{name}'s gradient is not the formula's: {name} is detached, not trainable, or misused in the forward.",
        )  # fmt: skip
    frozen = [n for n, p in layer.named_parameters() if p.grad is not None and p is not A and p is not B]
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


def _check_dropout(report, layer, x, expected_base, B) -> None:
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
    saved = B.detach().clone()
    with torch.no_grad():
        B.zero_()
        layer.train()
        base_only = layer(x)
        B.copy_(saved)
    layer.eval()
    report.add(
        "dropout touches only the low-rank branch", _err(base_only, expected_base), FP32_TOLERANCE,
        "with B = 0 the train-mode output is not the base: dropout is applied to the base path, not only to x "
        "before A.",
    )  # fmt: skip


def _check_merge(report, layer, x, w0, b0, A, B, scaling) -> None:
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
    expected_weight = w0 + scaling * B @ A
    mistake = "the merged layer computes something else than the unmerged one."
    if _err(weight_once, w0 + B @ A) <= FP32_TOLERANCE:
        mistake = "the merge adds B A to W0 without the scaling s = alpha / r."
    elif _err(weight_once, expected_weight) > FP32_TOLERANCE:
        mistake = "the merged weight is not W0 + s·B A."
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
        "keep the base weight under the key 'weight' (and 'bias').",
    )  # fmt: skip
    with torch.no_grad():
        layer.unmerge()
    bound = 4 * torch.finfo(w0.dtype).eps * max(expected_weight.abs().max().item(), 1.0)
    report.add(
        "unmerge gives W0 back within rounding", (weight.detach() - w0).abs().max().item(), bound,
        "after unmerge() the weight is not W0: unmerge must subtract exactly what merge added.",
    )  # fmt: skip


def _check_bf16_base(report, make_layer, base, x, r, alpha, A, B, scaling) -> None:
    """A bf16 W0 and b with fp32 A and B, as set_base_dtype leaves them: the output is the base product in bf16
    plus the fp32 update, rounded once; anything within two bf16 units of that passes."""
    layer = make_layer(copy.deepcopy(base), r, alpha).eval()
    try:
        with torch.no_grad():
            for name, param in layer.named_parameters():
                if "lora" not in name:
                    param.data = param.data.to(torch.bfloat16)
            factor(layer, "lora_A").copy_(A)
            factor(layer, "lora_B").copy_(B)
            x16 = x.to(torch.bfloat16)
            got = layer(x16)
    except RuntimeError as err:
        report.add("bf16 base, fp32 A and B", None, None, f"the layer fails on a bf16 base: {str(err)[:120]}")
        return
    with torch.no_grad():
        w16, b16 = base.weight.to(torch.bfloat16), base.bias.to(torch.bfloat16)
        expected = (x16.float() @ w16.float().T + b16.float()) + scaling * (x16.float() @ A.T @ B.T)
    bound = 2 * 2.0**-8  # two bf16 units, relative to the output's magnitude
    report.add(
        "bf16 base, fp32 A and B", _err(got, expected), bound,
        "on a bf16 base the output is off by more than bf16's rounding: the update is lost or computed in too low "
        "a precision (compute s·B A x in A's dtype, cast once before the sum).",
    )  # fmt: skip


def check_adapter_dir(directory, base: nn.Module | str) -> Report:
    """Check an adapter directory from any tool (ours, PEFT's) against a base model (a module, or what
    --model takes): its config, every key's module and shape, finite values, the update's norm per module
    (an all-zero B is flagged), that it loads here, and, where peft is installed, PEFT's logits against ours."""
    from safetensors.torch import load_file

    from support.files import loads_json

    from .adapter_io import CONFIG_NAME, KEY_PREFIX, WEIGHTS_NAME, AdapterError, load_adapter, read_adapter_config

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
    from support.files import loads_json

    from .adapter_io import CONFIG_NAME

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
    args = p.parse_args(argv)
    if (args.factory is None) == (args.adapter is None):
        p.error("give a MODULE:FACTORY or --adapter DIR (one of them)")
    try:
        if args.adapter is not None:
            model = args.model or _config_base(args.adapter)
            report = check_adapter_dir(args.adapter, model)
            for path, norm in report.norms.items():
                print(f"{path}: ‖s·B A‖_F = {norm:.4g}")
        else:
            factory = load_factory(args.factory)
            report = check_lora_layer(
                factory, r=args.r, alpha=args.alpha, use_rslora=args.rslora, zero_init=not args.nonzero_init
            )
    except (ValueError, TypeError, ImportError, SyntaxError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report)
    failed = sum(check.passed is False for check in report.checks)
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
