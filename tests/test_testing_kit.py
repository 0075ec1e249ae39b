"""lora.testing: a correct layer written from the formula passes; each classic mistake fails with its sentence."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lora import DoRALinear, LoRALinear
from lora.testing import assert_lora_layer, check_lora_layer


class StudentLoRA(nn.Module):
    """A LoRA layer as a student writes it from the paper: h = W0 x + b + (alpha/r) B A dropout(x)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.2):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        self.scaling, self.dropout, self.merged = alpha / r, nn.Dropout(dropout), False

    def update(self, x):
        return self.scaling * F.linear(F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A), self.lora_B)

    def forward(self, x):
        result = F.linear(x, self.weight, self.bias)
        return result if self.merged else result + self.update(x).to(result.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += (self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight -= (self.scaling * self.lora_B @ self.lora_A).to(self.weight.dtype)
            self.merged = False


def student(**changes):
    def make(base, r, alpha):
        layer = StudentLoRA(base, r, alpha)
        for name, value in changes.items():
            setattr(layer, name, value(layer) if callable(value) and name != "forward" else value)
        return layer

    return make


def failed(report) -> dict[str, str]:
    return {check.name: check.mistake for check in report.checks if check.passed is False}


def test_a_layer_written_from_the_formula_passes_every_check():
    report = assert_lora_layer(student())
    assert report.passed and sum(check.passed is True for check in report.checks) >= 12
    assert all(check.passed is not None for check in report.checks)  # dropout and merge were checked too


def test_this_projects_layer_passes():
    assert_lora_layer(lambda base, r, alpha: LoRALinear.from_linear(base, r, alpha, dropout=0.1))


class AlphaNotOverR(StudentLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.scaling = alpha


class RsLoRAConfused(StudentLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.scaling = alpha / math.sqrt(r)


class NonZeroB(StudentLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.lora_B.data.normal_()


class Transposed(StudentLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.lora_A = nn.Parameter(torch.zeros(base.in_features, r))


class DropoutOnBase(StudentLoRA):
    def forward(self, x):
        x = self.dropout(x)
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class DropoutInEval(StudentLoRA):
    def update(self, x):
        x = F.dropout(x, 0.2, training=True)
        return self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)


class TrainableBase(StudentLoRA):
    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha)
        self.weight.requires_grad_(True)


class MergeWithoutScaling(StudentLoRA):
    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.weight += self.lora_B @ self.lora_A
            self.merged = True


class UnmergeForgets(StudentLoRA):
    @torch.no_grad()
    def unmerge(self):
        self.merged = False


class Bf16Update(StudentLoRA):
    def update(self, x):  # the update through the bf16 base's own dtype, rounded before it is scaled
        low = F.linear(F.linear(self.dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return (
            (self.scaling * low.to(torch.float8_e4m3fn).to(x.dtype))
            if x.dtype == torch.bfloat16
            else self.scaling * low
        )


@pytest.mark.parametrize(
    "layer, check, words",
    [
        (AlphaNotOverR, "forward", "scaled by alpha, not alpha / r"),
        (RsLoRAConfused, "forward", "rsLoRA's alpha / sqrt(r) and LoRA's alpha / r are confused"),
        (NonZeroB, "at initialisation", "B must start at zero"),
        (Transposed, "shapes", "swapped or transposed"),
        (DropoutOnBase, "dropout touches only", "dropout is applied to the base path"),
        (DropoutInEval, "no dropout in eval mode", "still active in eval mode"),
        (TrainableBase, "W0 and b get no gradient", "the base is left trainable"),
        (MergeWithoutScaling, "merged output equals unmerged", "without the scaling"),
        (UnmergeForgets, "unmerge gives W0 back", "unmerge must subtract exactly what merge added"),
        (Bf16Update, "bf16 base", "lost or computed in too low a precision"),
    ],
)
def test_each_classic_mistake_is_named(layer, check, words):
    report = check_lora_layer(lambda base, r, alpha: layer(base, r, alpha))
    failures = failed(report)
    named = [mistake for name, mistake in failures.items() if name.startswith(check)]
    assert named and words in named[0], failures
    with pytest.raises(AssertionError, match="failed checks"):
        assert_lora_layer(lambda base, r, alpha: layer(base, r, alpha))


@pytest.mark.parametrize(
    "layer, words",
    [(AlphaNotOverR, "scaled by alpha, not alpha / r"), (RsLoRAConfused, "are confused")],
)
def test_a_scaling_mistake_is_named_on_every_row_it_fails(layer, words):
    """The forward, both gradients (a constant multiple of the formula's) and the bf16 row (which fails because
    the forward does) all point to the scale, not to a detached factor or too low a precision."""
    failures = failed(check_lora_layer(lambda base, r, alpha: layer(base, r, alpha)))
    assert sorted(failures) == [
        "bf16 base, fp32 A and B",
        "forward: W0 x + b + s·B A x (eval mode)",
        "gradient of A is s·Bᵀ G xᵀ",
        "gradient of B is s·G (A x)ᵀ",
    ]
    assert all(words in failures[name] for name in failures if not name.startswith("bf16"))
    assert "the forward is wrong in fp32 already" in failures["bf16 base, fp32 A and B"]


def test_rslora_is_checked_against_alpha_over_sqrt_r():
    make = lambda base, r, alpha: LoRALinear.from_linear(base, r, alpha, use_rslora=True)  # noqa: E731
    assert check_lora_layer(make, use_rslora=True).passed
    assert "confused" in failed(check_lora_layer(make))["forward: W0 x + b + s·B A x (eval mode)"]


def test_a_dora_layer_is_not_lora_and_the_kit_says_where():
    report = check_lora_layer(lambda base, r, alpha: DoRALinear.from_linear(base, r, alpha))
    assert "forward: W0 x + b + s·B A x (eval mode)" in failed(report)  # its formula is DoRA's, not LoRA's


# --- DoRA: h = m ⊙ (W0 + s·B A) x / ‖W0 + s·B A‖_c + b -------------------------------------------------------


class StudentDoRA(StudentLoRA):
    """DoRA as a student writes it from the paper, the norm a constant for autograd (Section 4.3)."""

    def __init__(self, base, r, alpha):
        super().__init__(base, r, alpha, dropout=0.0)
        self.lora_magnitude = nn.Parameter(self.weight.norm(dim=1).detach().clone())

    def adapted(self):
        return self.weight + self.scaling * self.lora_B @ self.lora_A

    def norm(self, adapted):
        return adapted.norm(dim=1).detach()

    def forward(self, x):
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        adapted = self.adapted()  # in A's fp32, whatever W0's dtype
        weight = (self.lora_magnitude / self.norm(adapted)).unsqueeze(1) * adapted
        return F.linear(x.to(weight.dtype), weight, self.bias.to(weight.dtype)).to(x.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.w0 = self.weight.clone()
            adapted = self.adapted()
            self.weight.copy_((self.lora_magnitude / self.norm(adapted)).unsqueeze(1) * adapted)
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self.w0)
            self.merged = False


class MagnitudeIgnored(StudentDoRA):
    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(x, self.scaling * self.lora_B @ self.lora_A)


class NormOfW0(StudentDoRA):
    def norm(self, adapted):
        return self.weight.norm(dim=1)


class NormAttached(StudentDoRA):
    def norm(self, adapted):
        return adapted.norm(dim=1)


class MergeWithoutMagnitude(StudentDoRA):
    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.w0 = self.weight.clone()
            self.weight.copy_(self.adapted())
            self.merged = True


def test_dora_from_the_paper_and_this_projects_dora_layer_pass_as_dora():
    for make in (StudentDoRA, lambda base, r, alpha: DoRALinear.from_linear(base, r, alpha, dropout=0.1)):
        report = assert_lora_layer(make, dora=True)
        names = [check.name for check in report.checks if check.passed]
        assert "forward: m ⊙ (W0 + s·B A) x / ‖W0 + s·B A‖_c + b (eval mode)" in names
        assert {"gradient of A is DoRA's", "gradient of B is DoRA's", "gradient of m is DoRA's"} <= set(names)


@pytest.mark.parametrize(
    "layer, check, words",
    [
        (MagnitudeIgnored, "forward", "the magnitude m is not applied: this is plain LoRA"),
        (NormOfW0, "forward", "the norm is taken of W0 alone"),
        (NormAttached, "gradient of A", "DoRA (Section 4.3) treats it as a constant"),
        (MergeWithoutMagnitude, "merged output equals unmerged", "the merged weight is not m ⊙ W' / ‖W'‖_c"),
        (StudentLoRA, "DoRA magnitude", "no 'lora_magnitude' parameter"),
    ],
)
def test_each_dora_mistake_is_named(layer, check, words):
    failures = failed(check_lora_layer(layer, dora=True))
    named = [mistake for name, mistake in failures.items() if name.startswith(check)]
    assert named and words in named[0], failures


def test_the_command_line_checks_a_layer_in_a_file(tmp_path, capsys):
    """`python -m lora.testing FILE:FACTORY` as a user runs it (one subprocess), then a wrong layer and a
    missing factory through the same main()."""
    from lora.testing import main

    layer_file = tmp_path / "my_lora.py"
    layer_file.write_text(
        "from lora import LoRALinear\n\ndef make_layer(base, r, alpha):\n"
        "    return LoRALinear.from_linear(base, r, alpha, dropout=0.1)\n\n"
        "def wrong(base, r, alpha):\n    layer = LoRALinear.from_linear(base, r, alpha)\n    layer.scaling = alpha\n"
        "    return layer\n"
    )
    good = subprocess.run(
        [sys.executable, "-m", "lora.testing", f"{layer_file}:make_layer"], capture_output=True, text=True, timeout=120
    )
    assert good.returncode == 0 and "all checks of LoRA's math passed" in good.stdout and "| check |" in good.stdout
    assert main([f"{layer_file}:wrong"]) == 1 and "scaled by alpha, not alpha / r" in capsys.readouterr().out
    assert main([f"{layer_file}:nothing"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err


LAYERS_THAT_BREAK = {
    "exits": "import sys\n\ndef make_layer(base, r, alpha):\n    sys.exit(0)\n",
    "hangs": "def make_layer(base, r, alpha):\n    while True:\n        pass\n",
    "raises": "def make_layer(base, r, alpha):\n    raise KeyError('lora_A')\n",
}


@pytest.mark.parametrize(
    "case, message",
    [
        ("exits", "the layer's code called sys.exit(0) while it was checked"),
        ("hangs", "the checks did not finish within 1 s (--timeout)"),
        ("raises", "the layer raised KeyError while it was checked"),
    ],
)
def test_a_layer_that_exits_hangs_or_breaks_fails_in_one_sentence(tmp_path, capsys, case, message):
    """A factory calling sys.exit(0) made the kit exit 0 with no output (a CI gate passed), one that never
    returned ran until killed, one that raised ended in a traceback: each is now a failure, exit 1, said in one
    sentence."""
    from lora.testing import main

    (tmp_path / "my_lora.py").write_text(LAYERS_THAT_BREAK[case])
    assert main([f"{tmp_path / 'my_lora.py'}:make_layer", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1 and "Traceback" not in err


class ReturnsATuple(StudentLoRA):
    def forward(self, x):
        return super().forward(x), None


class CachesItsUpdate(StudentLoRA):
    """Computes s·B A once, at its first forward, and keeps it: stale once A or B change, and gradient-free."""

    def forward(self, x):
        if not hasattr(self, "delta"):
            with torch.no_grad():
                self.delta = self.scaling * self.lora_B @ self.lora_A
        return F.linear(x, self.weight + self.delta, self.bias)


def test_a_tuple_forward_and_a_cached_update_are_failed_checks_with_their_mistakes():
    """A forward returning a tuple ended in AttributeError, and a layer caching its update in 'element 0 of
    tensors does not require grad': each is a failed row of the report, naming the likely mistake."""
    tuple_rows = failed(check_lora_layer(lambda base, r, alpha: ReturnsATuple(base, r, alpha)))
    assert list(tuple_rows) == ["the forward returns one tensor (batch, out)"]
    assert "returns tuple, not one tensor of shape (5, 16)" in tuple_rows["the forward returns one tensor (batch, out)"]
    cached = failed(check_lora_layer(lambda base, r, alpha: CachesItsUpdate(base, r, alpha, dropout=0.0)))
    assert "did not change when A and B were given new values" in cached["forward: W0 x + b + s·B A x (eval mode)"]
    assert "no gradient reaches A or B" in cached["gradients"] and "cached or detached" in cached["gradients"]


class BaseLayerInside(StudentLoRA):
    """PEFT's and litgpt's shape: the base kept whole as a submodule (`base_layer.weight`), correct math."""

    def __init__(self, base, r, alpha, dropout=0.2):
        super().__init__(base, r, alpha, dropout)
        del self.weight, self.bias
        self.base_layer = base.requires_grad_(False)

    def forward(self, x):
        result = self.base_layer(x)
        return result if self.merged else result + self.update(x).to(result.dtype)

    @torch.no_grad()
    def merge(self):
        if not self.merged:
            self.base_layer.weight += self.scaling * self.lora_B @ self.lora_A
            self.merged = True

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.base_layer.weight -= self.scaling * self.lora_B @ self.lora_A
            self.merged = False


class Fp32Only(StudentLoRA):
    """Correct in fp32; its update multiplies x by A as they come, so a bf16 x and an fp32 A do not mix."""

    def update(self, x):
        return self.scaling * (x @ self.lora_A.T) @ self.lora_B.T


@pytest.mark.parametrize(
    "layer, convention",
    [(BaseLayerInside, "a merged state dict loads into nn.Linear"), (Fp32Only, "bf16 base, fp32 A and B")],
)
def test_correct_layers_of_other_conventions_pass_and_strict_names_the_convention(capsys, layer, convention):
    """A correct layer in another state-dict layout, or for fp32 only, was called wrong: LoRA's math passes,
    the convention is reported as not kept, and only --strict makes that fail the run."""
    report = check_lora_layer(lambda base, r, alpha: layer(base, r, alpha))
    assert report.passed and not report.conventions_kept
    assert [c.name for c in report.checks if c.passed is False] == [convention]
    assert_lora_layer(lambda base, r, alpha: layer(base, r, alpha))
    with pytest.raises(AssertionError, match="failed checks"):
        assert_lora_layer(lambda base, r, alpha: layer(base, r, alpha), strict=True)
    from lora.testing import main

    spec = f"test_testing_kit:{layer.__name__}"  # the class is a factory: layer(base, r, alpha)
    assert main([spec]) == 0
    out = capsys.readouterr().out
    assert f"| {convention} (convention) | not kept |" in out and "1 convention(s) not kept" in out
    assert main([spec, "--strict"]) == 1


# --- adapter directories from any tool -----------------------------------------------------------------


@pytest.fixture
def adapters(tmp_path):
    import peft
    from conftest import saved_random_adapter, toy_t5

    saved_random_adapter(tmp_path / "ours")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights=False)
    peft.get_peft_model(toy_t5(), config).save_pretrained(tmp_path / "peft")
    return tmp_path


def test_adapters_of_ours_and_of_peft_pass(adapters):
    from conftest import toy_t5

    from lora.testing import check_adapter_dir

    for name in ("ours", "peft"):
        report = check_adapter_dir(adapters / name, toy_t5())
        assert report.passed, str(report)
        assert [c.passed for c in report.checks if c.name == "PEFT's logits equal ours"] == [True]
        assert len(report.norms) == 12 and all(norm > 0 for norm in report.norms.values())  # q, v of 12 layers


@pytest.mark.parametrize(
    "damage, check, words",
    [
        ("nan", "no NaN or inf", "non-finite values"),
        ("shape", "every key names", "has shape (3, 32)"),
        ("module", "every key names", "names no linear layer"),
        ("zero_b", "B is not all zero", "B is all zero"),
    ],
)
def test_each_problem_of_a_damaged_adapter_is_reported(adapters, damage, check, words):
    from conftest import toy_t5
    from safetensors.torch import load_file, save_file

    from lora.testing import check_adapter_dir

    path = adapters / "ours" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if "lora_A" in k)
    if damage == "nan":
        tensors[key][0, 0] = float("nan")
    elif damage == "shape":
        tensors[key] = tensors[key][:3]
    elif damage == "module":
        tensors[key.replace("block.0", "block.9")] = tensors.pop(key)
    else:
        tensors = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}
    save_file(tensors, path)
    report = check_adapter_dir(adapters / "ours", toy_t5())
    failures = failed(report)
    assert not report.passed and words in failures.get(next(n for n in failures if n.startswith(check)), ""), failures


@pytest.mark.parametrize("active", ["retail", "business"])
def test_the_layer_of_several_adapters_passes_for_each_adapter(active):
    """A MultiLoRALinear holding two adapters (the other one random), seen through its active adapter's A and B."""
    from lora.multi_layer import LowRank, MultiLoRALinear

    class ActiveAdapter(MultiLoRALinear):
        lora_A = property(lambda self: self.adapters[self.active].lora_A)
        lora_B = property(lambda self: self.adapters[self.active].lora_B)

    def make(base, r, alpha):
        base.requires_grad_(False)
        layer = ActiveAdapter(base.weight, base.bias)
        for name in ("retail", "business"):
            layer.adapters[name] = LowRank(base.in_features, base.out_features, r, alpha, 0.2, False)
        other = "business" if active == "retail" else "retail"
        torch.nn.init.normal_(layer.adapters[other].lora_B)  # an adapter that is not active must change nothing
        layer.active = active
        return layer

    assert_lora_layer(make)


def test_checking_an_adapter_prints_nothing_but_its_report(tmp_path, capsys, tiny_model_path):
    """`--adapter DIR` printed a transformers FutureWarning (and, on CPUs with AVX-512 BF16, bitsandbytes'
    missing-kernel warning) before its report: the oracle's own noise, silenced for its import and load only."""
    import logging
    import warnings

    from conftest import randomize_adapter

    from lora import inject_lora, save_adapter
    from lora.testing import quiet_oracle
    from support.models import load_model_and_tokenizer

    model = load_model_and_tokenizer("tiny")[0]
    inject_lora(model, ("q", "v"), r=4, alpha=8)
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="tiny")
    result = subprocess.run(
        [sys.executable, "-m", "lora.testing", "--adapter", str(tmp_path / "adapter")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0 and "PEFT's logits equal ours | passed" in result.stdout, result.stderr
    assert result.stderr == ""
    noisy = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with quiet_oracle(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        noisy.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
        warnings.warn("deprecated", FutureWarning, stacklevel=1)
        warnings.warn("kept", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["kept"] and capsys.readouterr().err == ""
    assert logging.getLogger("bitsandbytes").level == logging.NOTSET  # restored


@pytest.mark.parametrize("tool", ["lora.testing", "lora.inspect"])
def test_a_reader_that_goes_away_ends_the_tools_quietly(tmp_path, tool):
    """`python -m lora.testing ... | head -1`: the reader closes the pipe before the report; the tool ends as
    cat does (status 141), without a BrokenPipeError traceback or an 'error:' about a broken pipe."""
    from conftest import saved_random_adapter

    (tmp_path / "my_lora.py").write_text(
        "from lora import LoRALinear\n\ndef make_layer(base, r, alpha):\n"
        "    return LoRALinear.from_linear(base, r, alpha)\n"
    )
    saved_random_adapter(tmp_path / "adapter")
    argument = f"{tmp_path / 'my_lora.py'}:make_layer" if tool == "lora.testing" else str(tmp_path / "adapter")
    process = subprocess.Popen([sys.executable, "-m", tool, argument], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    process.stdout.close()  # gone before the report
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 141 and err == "", err[-2000:]
