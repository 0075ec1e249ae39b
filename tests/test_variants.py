"""DoRA and PiSSA against their formulas and against PEFT (a test dependency), in both directions."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, toy_t5
from safetensors.torch import load_file, save_file

from lora import (
    AdapterError,
    DoRALinear,
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_disabled,
    lora_layers,
    merge_lora,
    merged_state_dict,
    save_adapter,
    unmerge_lora,
)
from lora.save import PEFT_NAMES

peft = __import__("peft")
TIGHT = {"rtol": 1e-5, "atol": 1e-5}


def randomize(model, seed=7, scale=0.1):
    """Random A, B and (DoRA) magnitudes, so that every term of each formula shows in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_params().values():
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def peft_model_with(ours, **config):
    """A PEFT model over a fresh tiny base whose adapter holds our model's values."""
    defaults = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q", "v"], task_type="SEQ_2_SEQ_LM")
    model = peft.get_peft_model(toy_t5(), peft.LoraConfig(**{**defaults, **config}))
    state = {key: param for key, param in model.named_parameters()}
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            for param_name, param in layer.adapter_params().items():
                key = f"base_model.model.{name}.{PEFT_NAMES[param_name].replace('.weight', '')}.default.weight"
                state[key].copy_(param)
    return model.eval()


# --- DoRA -----------------------------------------------------------------------------------------


def test_dora_forward_is_the_papers_formula():
    torch.manual_seed(0)
    layer = DoRALinear(6, 5, r=2, alpha=4, bias=True)
    randomize(layer)
    x = torch.randn(3, 6)
    directed = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A  # (out, in)
    expected = F.linear(x, layer.lora_magnitude.unsqueeze(1) * directed / directed.norm(dim=1, keepdim=True))
    torch.testing.assert_close(layer(x), expected + layer.bias, rtol=1e-6, atol=1e-6)


def test_dora_step_zero_equals_base_and_magnitude_starts_at_row_norms(t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0, use_dora=True)
    for layer in lora_layers(model).values():
        assert isinstance(layer, DoRALinear)
        torch.testing.assert_close(layer.lora_magnitude, layer.weight.norm(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(logits(model, t5_batch), logits(toy_t5(), t5_batch), rtol=1e-6, atol=1e-6)


def test_dora_merge_equals_unmerged_and_unmerge_restores_w0(t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, use_dora=True)
    randomize(model)
    w0 = {name: layer.weight.clone() for name, layer in lora_layers(model).items()}
    unmerged = logits(model, t5_batch)
    assert not torch.allclose(unmerged, logits(toy_t5(), t5_batch), atol=1e-3)  # the adapter does something
    merge_lora(model)
    merge_lora(model)  # idempotent
    torch.testing.assert_close(logits(model, t5_batch), unmerged, **TIGHT)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight, w0[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, t5_batch), unmerged, **TIGHT)
    plain = toy_t5()
    plain.load_state_dict(merged_state_dict(model), strict=True)  # no lora_magnitude key left
    torch.testing.assert_close(logits(plain, t5_batch), unmerged, **TIGHT)


def test_peft_loads_our_dora_adapter_and_we_load_peft_s(tmp_path, t5_batch):
    ours = toy_t5()
    inject_lora(ours, r=4, alpha=8, dropout=0.0, use_dora=True)
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours/adapter_config.json").read_text())["use_dora"] is True
    from_ours = peft.PeftModel.from_pretrained(toy_t5(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(from_ours, t5_batch), logits(ours, t5_batch), **TIGHT)

    peft_model = peft_model_with(ours, use_dora=True)  # PEFT's own DoRA, saved by PEFT
    peft_model.save_pretrained(tmp_path / "peft")
    assert any(key.endswith(".lora_magnitude_vector") for key in load_file(tmp_path / "peft/adapter_model.safetensors"))
    loaded = toy_t5()
    load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, t5_batch), logits(peft_model, t5_batch), **TIGHT)


def test_dora_gradients_equal_peft_s(t5_batch):
    ours = toy_t5()
    inject_lora(ours, r=4, alpha=8, dropout=0.0, use_dora=True)
    randomize(ours)
    theirs = peft_model_with(ours, use_dora=True)
    ours(**t5_batch).loss.backward()
    theirs(**t5_batch).loss.backward()
    grads = {name: param.grad for name, param in theirs.named_parameters() if param.requires_grad}
    for name, layer in lora_layers(ours).items():
        for param_name, param in layer.adapter_params().items():
            key = f"base_model.model.{name}.{PEFT_NAMES[param_name].replace('.weight', '')}.default.weight"
            assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{param_name} got no gradient"
            torch.testing.assert_close(param.grad, grads[key], **TIGHT)


def test_dora_with_dropout_trains_as_peft_s(t5_batch):
    """With dropout on, PEFT feeds the dropped input to the correction only; ours does the same."""
    ours = toy_t5().train()
    inject_lora(ours, r=4, alpha=8, dropout=0.3, use_dora=True)
    randomize(ours)
    theirs = peft_model_with(ours, use_dora=True, lora_dropout=0.3).train()
    torch.manual_seed(11)
    ours_loss = ours(**t5_batch).loss
    torch.manual_seed(11)  # the same dropout masks, drawn in the same order
    torch.testing.assert_close(ours_loss, theirs(**t5_batch).loss, **TIGHT)


def test_dora_file_with_magnitude_but_no_use_dora_is_refused(tmp_path):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, use_dora=True)
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    with pytest.raises(AdapterError, match=r"holds a DoRA magnitude \('base_model.*lora_magnitude_vector'\)"):
        load_adapter(toy_t5(), tmp_path)


# --- PiSSA ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_step_zero_equals_the_original_base(init, t5_batch):
    model = toy_t5()
    torch.manual_seed(0)
    inject_lora(model, r=4, alpha=8, init=init)
    torch.testing.assert_close(logits(model, t5_batch), logits(toy_t5(), t5_batch), **TIGHT)
    layer = lora_layers(model)["encoder.block.0.layer.0.SelfAttention.q"]
    w0 = toy_t5().get_submodule("encoder.block.0.layer.0.SelfAttention.q").weight
    assert layer.lora_B.abs().sum() > 0  # A and B start from W0's principal part, not from zero
    torch.testing.assert_close(layer.weight + layer.delta_weight(), w0, **TIGHT)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_pissa_init_equals_peft_s(init, monkeypatch):
    # The randomised SVD draws its start from torch's RNG, and PEFT draws more numbers before it than we
    # do (it builds nn.Linear layers for A and B): seed each call alike, so that the test compares how the
    # two use the SVD (its arguments, the scaling, the residual), not the two RNG streams.
    svd_lowrank = torch.svd_lowrank

    def seeded_svd_lowrank(*args, **kwargs):
        torch.manual_seed(123)
        return svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(torch, "svd_lowrank", seeded_svd_lowrank)
    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded_svd_lowrank)
    ours = toy_t5()
    inject_lora(ours, r=4, alpha=16, init=init)
    theirs = peft.get_peft_model(
        toy_t5(), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q", "v"], init_lora_weights=init)
    )
    for name, layer in lora_layers(ours).items():
        peft_layer = theirs.base_model.model.get_submodule(name)
        peft_delta = peft_layer.get_delta_weight("default")
        torch.testing.assert_close(layer.delta_weight(), peft_delta, **TIGHT)  # B@A: the SVD's signs are arbitrary
        torch.testing.assert_close(layer.weight, peft_layer.base_layer.weight, **TIGHT)  # the residual


def test_pissa_adapters_load_both_ways_with_equal_logits(tmp_path, t5_batch):
    ours = toy_t5()
    inject_lora(ours, r=4, alpha=8, dropout=0.0, init="pissa")
    randomize(ours)
    save_adapter(ours, tmp_path / "ours")  # PiSSA form: applies to the residual, which a loader rebuilds
    from_ours = peft.PeftModel.from_pretrained(toy_t5(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(from_ours, t5_batch), logits(ours, t5_batch), **TIGHT)

    theirs = peft.get_peft_model(
        toy_t5(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], init_lora_weights="pissa")
    )
    randomize(ours, seed=8)
    state = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            state[f"base_model.model.{name}.lora_A.default.weight"].copy_(layer.lora_A)
            state[f"base_model.model.{name}.lora_B.default.weight"].copy_(layer.lora_B)
    theirs.eval().save_pretrained(tmp_path / "peft")
    loaded = toy_t5()
    load_adapter(loaded, tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, t5_batch), logits(theirs, t5_batch), **TIGHT)


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_pissa_converted_to_rank_2r_lora_gives_the_pissa_model_on_the_original_base(
    tmp_path, t5_batch, use_dora, use_rslora
):
    pissa = toy_t5()
    torch.manual_seed(0)
    inject_lora(pissa, r=4, alpha=8, dropout=0.0, use_rslora=use_rslora, use_dora=use_dora, init="pissa_niter_2")
    randomize(pissa)  # as if trained
    save_adapter(pissa, tmp_path, pissa_as_lora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"]) == (8, True)
    original = toy_t5()
    load_adapter(original, tmp_path)
    layer = next(iter(lora_layers(original).values()))
    assert type(layer) is (DoRALinear if use_dora else LoRALinear) and layer.init == "lora"
    torch.testing.assert_close(logits(original, t5_batch), logits(pissa, t5_batch), **TIGHT)
    if not use_dora:  # PEFT's own conversion drops DoRA's magnitude, so only plain LoRA is compared there
        in_peft = peft.PeftModel.from_pretrained(toy_t5(), tmp_path).eval()
        torch.testing.assert_close(logits(in_peft, t5_batch), logits(pissa, t5_batch), **TIGHT)


def test_a_randomised_pissa_adapter_is_refused_on_a_fresh_base(tmp_path):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, init="pissa_niter_2")
    save_adapter(model, tmp_path)
    with pytest.raises(AdapterError, match="randomised SVD .*pissa_as_lora=True"):
        load_adapter(toy_t5(), tmp_path)


def test_unknown_init_is_refused_before_the_model_is_touched():
    model = toy_t5()
    with pytest.raises(ValueError, match="init must be one of lora, pissa, pissa_niter_N, got 'svd'"):
        inject_lora(model, init="svd")
    assert not lora_layers(model)


def test_tampered_file_is_still_refused(tmp_path):
    """A magnitude of the wrong length names its key, like any other shape mismatch."""
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, use_dora=True)
    save_adapter(model, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = next(key for key in tensors if key.endswith("lora_magnitude_vector"))
    tensors[key] = tensors[key][:-1].contiguous()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match=f"'{key}' has shape"):
        load_adapter(toy_t5(), tmp_path)


def test_pissa_merged_equals_unmerged_and_lora_disabled_gives_the_residual(t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, init="pissa")
    randomize(model)
    unmerged = logits(model, t5_batch)
    merge_lora(model)
    torch.testing.assert_close(logits(model, t5_batch), unmerged, **TIGHT)
    unmerge_lora(model)
    residual = toy_t5()  # what lora_disabled leaves: W0 − s·B0 A0, as PEFT's disable_adapter
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            residual.get_submodule(name).weight.copy_(layer.weight)
    with lora_disabled(model):
        torch.testing.assert_close(logits(model, t5_batch), logits(residual, t5_batch), **TIGHT)


@pytest.mark.parametrize("flags", [["--use-dora"], ["--init", "pissa_niter_2"]])
def test_train_py_variants_train_save_and_answer_in_infer_py(tmp_path, flags):
    import train
    from infer import Assistant

    argv = ["--model", "tiny", "--val-data", "none", "--max-steps", "3", "--output-dir", str(tmp_path), *flags]
    summary = train.train(train.parse_args(argv))
    assert summary["skipped_steps"] == 0
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_dora"] is ("--use-dora" in flags) and config["init_lora_weights"] is True
    assert config["r"] == (128 if "--init" in flags else 64)  # PiSSA is saved as rank-2r plain LoRA
    assert len(Assistant(tmp_path, precision="fp32").generate(["I lost my card"], max_new_tokens=4)) == 1
