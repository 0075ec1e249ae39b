"""NF4 written out (lora/nf4.py) against bitsandbytes, the outside oracle: the levels, the packed bytes,
the scales and their 8-bit form, the dequantised weights bit for bit; and QLoRA on a tiny T5 against
PEFT's LoRA on bitsandbytes' Linear4bit."""

import copy

import pytest
import torch
from conftest import randomize_adapter, toy_t5
from torch import nn

from lora import inject_lora, lora_layers, merge_lora, merged_state_dict
from lora.nf4 import (
    LinearNF4,
    NF4Weight,
    dequantize_base,
    dynamic_levels,
    nf4_bytes,
    nf4_levels,
    nf4_nbytes,
    quantize_base,
)

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional


def test_the_levels_are_bitsandbytes_constants():
    assert torch.equal(nf4_levels(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_levels(), F.create_dynamic_map(signed=True))
    levels = nf4_levels()
    assert levels[0] == -1 and levels[-1] == 1 and levels[7] == 0 and (levels.diff() > 0).all()


# flan-t5-base's shapes (q, k, v, o: 768x768; wi_0, wi_1: 2048x768; wo: 768x2048) and odd ones: a last
# block shorter than 64, an odd count of values (half a byte of padding), fewer blocks than 256.
SHAPES = [(768, 768), (2048, 768), (768, 2048), (7, 9), (130, 33), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
def test_quantize_and_dequantize_are_bitsandbytes_bit_for_bit(shape, double_quant):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape))) * 0.05
    ours = NF4Weight(weight, double_quant=double_quant)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    assert torch.equal(ours.packed, packed.flatten())
    if double_quant:
        assert torch.equal(ours.absmax_codes, state.absmax)  # uint8 indices into the dynamic map
        assert torch.equal(ours.absmax_scales, state.state2.absmax)
        assert torch.equal(ours.absmax_offset, state.offset)
    else:
        assert torch.equal(ours.absmax, state.absmax)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        state.dtype = dtype
        assert torch.equal(ours.dequantize(dtype), F.dequantize_4bit(packed, state)), dtype


def test_double_quantisation_saves_what_it_says():
    weight = torch.randn(2048, 768)
    plain, double = NF4Weight(weight, double_quant=False), NF4Weight(weight, double_quant=True)
    assert plain.nbytes() * 8 / weight.numel() == 4.5  # 4 bits + a 32-bit absmax per 64
    assert double.nbytes() * 8 / weight.numel() == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    error = (double.dequantize() - weight).abs().max() / weight.abs().max()
    assert error < 0.25  # NF4's largest gap between levels is 0.28 of the absmax: half of it at most, plus the scale


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(3, 5), (64, 64), (130, 257), (768, 2048)])
def test_a_weight_without_values_gets_the_buffers_quantising_gives(shape, double_quant):
    """A model built on the meta device (a memory plan) skips the quantisation, whose shapes it cannot change:
    every buffer has the shape and dtype quantising a real weight of that shape gives."""
    real, meta = (
        NF4Weight(torch.randn(shape), double_quant=double_quant),
        NF4Weight(torch.empty(shape, device="meta"), double_quant=double_quant),
    )
    buffers = {name: (tuple(b.shape), b.dtype) for name, b in real.named_buffers()}
    assert {name: (tuple(b.shape), b.dtype) for name, b in meta.named_buffers()} == buffers
    assert all(b.is_meta for b in meta.buffers()) and meta.nbytes() == real.nbytes() == nf4_nbytes(shape, double_quant)


def test_casting_a_model_never_rounds_the_scales():
    linear = nn.Linear(64, 32)
    layer = LinearNF4(linear.weight, linear.bias, torch.float32)
    before = layer.weight.dequantize()
    layer.to(torch.bfloat16)
    assert torch.equal(layer.weight.dequantize(torch.float32), before)


def test_the_product_keeps_nothing_but_the_packed_weight_for_the_backward():
    layer = LinearNF4(nn.Linear(256, 128, bias=False).weight, None, torch.float32)
    x = torch.randn(4, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    assert all(t.numel() < 256 * 128 for t in saved)  # no dense (out, in) weight is kept
    out.square().sum().backward()
    dense = layer.weight.dequantize().requires_grad_(False)
    x_ref = x.detach().clone().requires_grad_(True)
    (x_ref @ dense.T).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)


def bitsandbytes_base(model, skip):
    """The model with every nn.Linear but `skip` replaced by bitsandbytes' Linear4bit (NF4, double
    quantisation, fp32 compute), as transformers' BitsAndBytesConfig(load_in_4bit=True) builds it."""
    for path, module in list(model.named_modules()):
        parent, _, name = path.rpartition(".")
        if isinstance(module, nn.Linear) and name not in skip:
            nf4 = {"compress_statistics": True, "quant_type": "nf4"}
            quantized = bnb.nn.Linear4bit(
                module.in_features, module.out_features, module.bias is not None, torch.float32, **nf4
            )
            quantized.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, **nf4)
            setattr(model.get_submodule(parent), name, quantized.to("cpu"))  # quantises it
    model.is_loaded_in_4bit = True  # what PEFT reads to give the layers its bitsandbytes LoRA
    return model


def test_qlora_on_a_tiny_t5_equals_peft_on_bitsandbytes_linear4bit(tmp_path):
    import peft

    from lora import load_adapter, save_adapter

    # transformers keeps T5's wo out of 4 bits (_keep_in_fp32_modules), and T5 casts wo's input to its
    # weight's dtype, which for a bitsandbytes weight is uint8: both sides leave wo dense here.
    skip = ("lm_head", "wo")
    base = toy_t5(d_model=64, d_kv=16, d_ff=128)
    theirs = bitsandbytes_base(copy.deepcopy(base), skip)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                         init_lora_weights=False))  # fmt: skip
    assert type(theirs.base_model.model.encoder.block[0].layer[0].SelfAttention.q).__module__.endswith("bnb")
    ours = copy.deepcopy(base)
    inject_lora(ours, ["q", "v"], r=4, alpha=8, dropout=0.0)
    assert quantize_base(ours, torch.float32, skip=skip) == 6 * 4 + 4 * 2  # q, k, v, o of 6 attentions; wi_0, wi_1
    peft_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for path, layer in lora_layers(ours).items():
            layer.lora_A.copy_(peft_params[f"base_model.model.{path}.lora_A.default.weight"])
            layer.lora_B.copy_(peft_params[f"base_model.model.{path}.lora_B.default.weight"])
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(2, 64, (3, 7), generator=generator),
             "decoder_input_ids": torch.randint(2, 64, (3, 5), generator=generator)}  # fmt: skip
    ours_logits, their_logits = ours.train()(**batch).logits, theirs.train()(**batch).logits
    assert (ours_logits - their_logits).abs().max() <= 1e-5 * their_logits.abs().max()
    ours_logits.square().sum().backward()
    their_logits.square().sum().backward()
    for path, layer in lora_layers(ours).items():
        for name in ("lora_A", "lora_B"):
            expected = peft_params[f"base_model.model.{path}.{name}.default.weight"].grad
            assert (getattr(layer, name).grad - expected).abs().max() <= 1e-5 * expected.abs().max(), (path, name)

    # The files cross both ways: ours into PEFT over a bitsandbytes base, PEFT's into ours over an NF4 base.
    save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    peft_loads_ours = peft.PeftModel.from_pretrained(bitsandbytes_base(copy.deepcopy(base), skip), tmp_path / "ours")
    ours_loads_peft = copy.deepcopy(base)
    load_adapter(ours_loads_peft, tmp_path / "peft")
    quantize_base(ours_loads_peft, torch.float32, skip=skip)
    # In train mode (dropout is 0): on a CPU with AVX-512 bf16, bitsandbytes repacks a Linear4bit's weight for a
    # bf16 kernel the first time the layer runs in eval mode without gradients, and computes in bf16 from then on.
    expected = ours(**batch).logits
    assert (peft_loads_ours.train()(**batch).logits - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert (ours_loads_peft.train()(**batch).logits - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_merging_into_an_nf4_base_goes_through_a_dense_weight_and_loads_into_the_plain_model():
    model = toy_t5()
    inject_lora(model, ["q", "v"], r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    quantize_base(model, torch.float32)
    assert nf4_bytes(model) > 0
    x = {"input_ids": torch.randint(2, 64, (2, 6)), "decoder_input_ids": torch.randint(2, 64, (2, 4))}
    with torch.no_grad():
        unmerged = model(**x).logits
    with pytest.raises(ValueError, match="dequantize_base"):
        merge_lora(model)  # never into 4 bits
    dequantize_base(model, torch.float32)
    assert nf4_bytes(model) == 0
    merge_lora(model)
    with torch.no_grad():
        merged = model(**x).logits
    assert (merged - unmerged).abs().max() <= 1e-5 * unmerged.abs().max()
    plain = toy_t5()
    plain.load_state_dict(merged_state_dict(model), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(**x).logits, merged)


def test_dora_and_pissa_are_refused_on_an_nf4_base():
    from lora import DoRALinear

    model = toy_t5()
    inject_lora(model, ["q", "v"], r=4, alpha=8, use_dora=True)
    assert any(isinstance(layer, DoRALinear) for layer in lora_layers(model).values())
    with pytest.raises(ValueError, match="plain LoRA"):
        quantize_base(model, torch.float32)


def test_quantizing_while_loading_equals_quantizing_the_loaded_model():
    from support.models import load_model_and_tokenizer

    def inject(model):
        inject_lora(model, ["q", "v"], r=4, alpha=8)

    torch.manual_seed(0)
    loaded = load_model_and_tokenizer("tiny")[0]
    inject(loaded)
    quantize_base(loaded, torch.float32)
    torch.manual_seed(0)
    streamed = load_model_and_tokenizer("tiny", torch.float32, qlora_inject=inject)[0]
    expected, got = loaded.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys() and any(key.endswith("packed") for key in got)
    assert all(torch.equal(expected[key], got[key]) for key in expected)  # the 4-bit base, A and B alike
    assert not any(t.is_meta for t in [*streamed.parameters(), *streamed.buffers()])


def test_the_memory_plan_counts_the_4bit_weights_and_their_scales_exactly():
    from support.memory import plan_memory

    for shape in SHAPES:
        for double_quant in (False, True):
            held = NF4Weight(torch.randn(*shape), double_quant=double_quant).nbytes()  # counted from its tensors
            assert held == nf4_nbytes(shape, double_quant), (shape, double_quant)
    model = toy_t5()
    inject_lora(model, ["q", "v"], r=4, alpha=8)
    quantize_base(model, torch.float32)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()] if not t.requires_grad}  # tied once
    held = sum(t.numel() * t.element_size() for t in tensors.values())
    assert plan_memory(model, 2, 8, 8, torch.float32, False).frozen_bytes == held


def test_qlora_trains_resumes_exactly_and_answers(tmp_path, capsys):
    import shutil

    import infer
    import train

    argv = ["--model", "tiny", "--val-data", "none", "--base-dtype", "nf4", "--gradient-checkpointing",
            "--max-steps", "4", "--save-every", "2", "--keep-checkpoints", "2", "--batch-size", "4"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train.main([*argv, "--output-dir", str(straight)]) == 0
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (resumed / name).unlink()
    assert train.main([*argv, "--output-dir", str(resumed), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    expected = (straight / "adapter_model.safetensors").read_bytes()
    assert expected == (resumed / "adapter_model.safetensors").read_bytes()
    assert infer.main(["--adapter", str(straight), "--json", "What is my checking balance?"]) == 0
    assert "answer" in capsys.readouterr().out


def test_dora_on_an_nf4_base_is_refused_in_one_sentence(tmp_path, capsys):
    import train

    argv = ["--model", "tiny", "--base-dtype", "nf4", "--use-dora", "--output-dir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--base-dtype nf4 takes plain LoRA" in err


def test_infer_refuses_a_dora_adapter_on_an_nf4_base_in_one_sentence(tmp_path, capsys):
    """infer.py --base-dtype nf4 with a DoRA adapter printed the right sentence inside a ValueError traceback
    from lora/nf4.py, after loading the model; now it is refused before the model loads, exit 2."""
    import infer
    from lora import save_adapter
    from support.models import load_model_and_tokenizer

    model = load_model_and_tokenizer("tiny")[0]
    inject_lora(model, ("q", "v"), r=4, alpha=8, use_dora=True)
    save_adapter(model, tmp_path / "dora", "tiny")
    assert infer.main(["--adapter", str(tmp_path / "dora"), "--base-dtype", "nf4", "What is my balance?"]) == 2
    err = capsys.readouterr().err  # beside the warning that the adapter records no prompt length (not train.py's)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "is a DoRA or PiSSA adapter" in errors[0] and "Traceback" not in err


def test_a_checkpoints_own_lm_head_is_kept_when_quantizing_while_loading(tmp_path):
    import shutil

    from support.models import load_model_and_tokenizer
    from support.tiny_model import tiny_model_dir

    untied = toy_t5(tie_word_embeddings=False)
    with torch.no_grad():
        untied.lm_head.weight = nn.Parameter(torch.randn_like(untied.shared.weight))  # flan-t5's layout
    untied.save_pretrained(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir() / name, tmp_path / name)

    def inject(model):
        inject_lora(model, ["q", "v"], r=4, alpha=8)

    torch.manual_seed(0)
    loaded = load_model_and_tokenizer(str(tmp_path))[0]
    inject(loaded)
    quantize_base(loaded, torch.float32)
    torch.manual_seed(0)
    streamed = load_model_and_tokenizer(str(tmp_path), torch.float32, qlora_inject=inject)[0]
    assert streamed.lm_head.weight is not streamed.shared.weight
    assert torch.equal(streamed.lm_head.weight, untied.lm_head.weight)
    expected, got = loaded.state_dict(), streamed.state_dict()
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)


@pytest.mark.parametrize("base_dtype", ["nf4", "fp32"])
def test_a_checkpoint_saved_quantized_by_bitsandbytes_is_refused_in_one_sentence(
    tmp_path, capsys, tiny_model_path, base_dtype
):
    """What transformers writes for a model loaded with BitsAndBytesConfig(load_in_4bit=True) and saved:
    a quantization_config in config.json. It holds no full-precision weights to train on."""
    import json
    import shutil

    from transformers import BitsAndBytesConfig

    import train

    base = tmp_path / "bnb-4bit"
    shutil.copytree(tiny_model_path, base)
    config = json.loads((base / "config.json").read_text())
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    config["quantization_config"] = quantization.to_dict()
    (base / "config.json").write_text(json.dumps(config))
    argv = ["--model", str(base), "--base-dtype", base_dtype, "--output-dir", str(tmp_path / "run")]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "was saved quantised by bitsandbytes (its config.json has a quantization_config)" in err
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
