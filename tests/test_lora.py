import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import logits, randomize_adapter, toy_t5
from safetensors.torch import load_file, save_file
from torch import nn

import support.fast_modules
from lora import (
    AdapterError,
    LoRALinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_disabled,
    lora_layers,
    lora_param_groups,
    merge_lora,
    merged_state_dict,
    save_adapter,
    set_base_dtype,
    unmerge_lora,
)
from support.fast_modules import frozen_linear

# --- the layer --------------------------------------------------------------------------------------------


def test_hand_computed_4x6_case():
    layer = LoRALinear(in_features=6, out_features=4, r=2, alpha=4)  # scaling 2
    with torch.no_grad():
        layer.weight.copy_(torch.arange(24, dtype=torch.float32).reshape(4, 6) / 10)
        layer.lora_A.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 1, 0]]))
        layer.lora_B.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0]]))
    x = torch.tensor([[1.0, 2, 3, 4, 5, 6]])
    # W0 x: row i of arange(24)/10 dotted with x.
    base = [sum((6 * i + j) / 10 * (j + 1) for j in range(6)) for i in range(4)]
    # A x = [1 + 6, 2 + 5] = [7, 7]; B A x = [7, 7, 14, 0]; scaled by alpha/r = 2.
    expected = torch.tensor([[base[0] + 14, base[1] + 14, base[2] + 28, base[3]]])
    torch.testing.assert_close(layer(x), expected)


def test_init_kaiming_a_and_zero_b_and_scaling():
    torch.manual_seed(0)
    layer = LoRALinear(64, 32, r=8, alpha=16)
    assert torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    assert layer.scaling == 2.0
    assert LoRALinear(64, 32, r=16, alpha=32, use_rslora=True).scaling == pytest.approx(32 / 4)


def test_dropout_only_in_train_mode_and_only_on_lora_branch():
    torch.manual_seed(0)
    layer = LoRALinear(16, 16, r=4, alpha=8, dropout=0.5)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.lora_B.data.zero_()  # with no LoRA contribution, train-mode output is the base output exactly
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight))


def test_train_eval_switch_never_merges():
    layer = LoRALinear(8, 8, r=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    before = layer.weight.clone()
    layer.eval()
    layer.train()
    assert not layer.merged and torch.equal(layer.weight, before)


# --- injection --------------------------------------------------------------------------------------------


def test_flan_t5_base_architecture_counts():
    from transformers import T5Config, T5ForConditionalGeneration

    from support.architectures import FLAN_T5_BASE_CONFIG as FLAN_T5_BASE

    config = T5Config(**FLAN_T5_BASE)
    with torch.device("meta"):  # shapes only: no 900 MB of random weights
        model = T5ForConditionalGeneration(config)
    replaced = inject_lora(model)
    assert len(replaced) == 72
    trainable, total = count_parameters(model)
    assert trainable == 1_769_472 == 72 * 16 * (768 + 768)


def test_targets_match_exactly_and_everything_else_is_frozen():
    model = toy_t5()
    replaced = inject_lora(model, ("q", "v"), r=4, alpha=8)
    assert all(name.rsplit(".", 1)[-1] in ("q", "v") for name in replaced)
    assert not any("relative_attention_bias" in name for name in replaced)
    assert len(replaced) == 2 * 2 + 2 * 4  # encoder: self q, v; decoder: self and cross q, v
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{p}" for name in replaced for p in ("lora_A", "lora_B")}


def test_base_weight_keeps_its_state_dict_key():
    model = toy_t5()
    base_state = model.state_dict()
    inject_lora(model, r=4, alpha=8)
    state = model.state_dict()
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in state
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert unexpected == [] and all(k.endswith(("lora_A", "lora_B")) for k in missing)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target_modules=("nothing",)), r"\['nothing'\] match no nn.Linear"),
        (dict(target_modules=("q", "wi")), r"\['wi'\] match no nn.Linear.*wi_0, wi_1"),  # gated T5 has no wi
        (dict(r=0), "rank r must be a positive integer"),
        (dict(r=-2), "rank r must be a positive integer"),
        (dict(alpha=0), "alpha must be a positive number"),
        (dict(alpha="8"), "alpha must be a positive number"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dropout=-0.1), r"dropout must be in \[0, 1\)"),
    ],
)
def test_inject_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        inject_lora(toy_t5(), **kwargs)


def test_inject_twice_is_refused():
    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA layers"):
        inject_lora(model, r=4, alpha=8)


# --- invariants -------------------------------------------------------------------------------------------


def test_step_zero_output_equals_base(t5_batch):
    base = toy_t5()
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    assert torch.equal(logits(model, t5_batch), logits(base, t5_batch))


def test_one_optimizer_step_changes_only_a_and_b(t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.1)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(("lora_A", "lora_B"))}
    adapter = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    model(**t5_batch).loss.backward()
    optimizer.step()
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())
    assert all(not torch.equal(state[k], v) for k, v in adapter.items() if k.endswith("lora_B"))


def test_merged_equals_unmerged_and_merge_is_idempotent(t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    unmerged = logits(model, t5_batch)
    w0 = {name: layer.weight.clone() for name, layer in lora_layers(model).items()}
    merge_lora(model)
    once = {name: layer.weight.clone() for name, layer in lora_layers(model).items()}
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight, w0[name] + layer.scaling * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(logits(model, t5_batch), unmerged, rtol=1e-5, atol=1e-5)
    merge_lora(model)
    assert all(torch.equal(layer.weight, once[name]) for name, layer in lora_layers(model).items())
    unmerge_lora(model)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        torch.testing.assert_close(layer.weight, w0[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(logits(model, t5_batch), unmerged, rtol=1e-5, atol=1e-5)


def test_merged_forward_is_the_base_matmul_alone():
    layer = LoRALinear(8, 4, r=2, alpha=4)
    nn.init.normal_(layer.lora_B)
    layer.merge()
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight))


@pytest.mark.parametrize("merge_first", [False, True])
def test_merged_state_dict_loads_into_a_plain_linear_and_gives_the_same_output(merge_first):
    torch.manual_seed(0)
    layer = LoRALinear(8, 4, r=2, alpha=4, bias=True)
    nn.init.normal_(layer.lora_B)
    w0 = layer.weight.clone()
    if merge_first:
        layer.merge()
    plain = nn.Linear(8, 4)
    plain.load_state_dict(merged_state_dict(layer), strict=True)
    x = torch.randn(3, 8)
    torch.testing.assert_close(plain(x), layer(x), rtol=0, atol=1e-6)
    assert not torch.allclose(plain(x), nn.functional.linear(x, w0, layer.bias), atol=1e-3)  # ΔW is in it


def test_merged_state_dict_of_a_model_loads_into_its_plain_base(t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = toy_t5(seed=9)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    torch.testing.assert_close(logits(plain, t5_batch), logits(model, t5_batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(plain, t5_batch), logits(toy_t5(), t5_batch), atol=1e-3)
    assert all(torch.equal(v, weights_before[k]) for k, v in model.state_dict().items())  # the model is untouched


def test_merge_refuses_non_finite_result():
    layer = LoRALinear(8, 4, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    before = layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.weight, before)


def test_lora_disabled_gives_base_and_restores_even_on_error(t5_batch):
    base = toy_t5()
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    adapted = logits(model, t5_batch)
    with lora_disabled(model):
        assert torch.equal(logits(model, t5_batch), logits(base, t5_batch))
    assert torch.equal(logits(model, t5_batch), adapted)
    with pytest.raises(RuntimeError, match="boom"):
        with lora_disabled(model):
            raise RuntimeError("boom")
    assert torch.equal(logits(model, t5_batch), adapted)
    merge_lora(model)  # a merged model is unmerged inside the block and merged again after
    with lora_disabled(model):
        torch.testing.assert_close(logits(model, t5_batch), logits(base, t5_batch), rtol=1e-5, atol=1e-5)
    assert all(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model, t5_batch), adapted, rtol=1e-5, atol=1e-5)


def test_count_parameters_counts_tied_tensors_once():
    model = toy_t5(tie_word_embeddings=True)
    assert count_parameters(model)[1] == sum(p.numel() for p in set(model.parameters()))
    inject_lora(model, r=4, alpha=8)
    trainable, _ = count_parameters(model)
    assert trainable == sum(lay.lora_A.numel() + lay.lora_B.numel() for lay in lora_layers(model).values())


# --- adapter files ----------------------------------------------------------------------------------------


def test_save_writes_peft_layout(tmp_path):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.05)
    save_adapter(model, tmp_path, base_model_name_or_path="some/base")
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert "base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight" in keys
    assert "base_model.model.decoder.block.1.layer.1.EncDecAttention.v.lora_B.weight" in keys
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors["base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_A.weight"].shape == (4, 32)
    assert tensors["base_model.model.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight"].shape == (32, 4)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM",
        "base_model_name_or_path": "some/base",
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.05,
        "target_modules": ["q", "v"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }
    assert not list(tmp_path.glob("*.tmp"))


def test_save_then_load_is_bit_exact(tmp_path, t5_batch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0, use_rslora=True)
    randomize_adapter(model)
    save_adapter(model, tmp_path)
    fresh = toy_t5()
    loaded = load_adapter(fresh, tmp_path)  # injects with the file's r, alpha and targets
    assert sorted(loaded) == sorted(lora_layers(model))
    for name, layer in lora_layers(model).items():
        other = lora_layers(fresh)[name]
        assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B)
        assert other.use_rslora and other.scaling == layer.scaling
    assert torch.equal(logits(fresh, t5_batch), logits(model, t5_batch))


def test_save_is_atomic(tmp_path, monkeypatch):
    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    save_adapter(model, tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapter(model)

    write_bytes = Path.write_bytes

    def crash(path, data):  # the weights' bytes are written by Python: interrupted half-way
        write_bytes(path, data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_bytes", crash)
    with pytest.raises(KeyboardInterrupt):
        save_adapter(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def saved_adapter(tmp_path, **inject_kwargs):
    model = toy_t5()
    inject_lora(model, **{"r": 4, "alpha": 8, **inject_kwargs})
    save_adapter(model, tmp_path)
    return tmp_path


def edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_load_refuses_missing_key(tmp_path):
    directory = saved_adapter(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    key = "base_model.model.decoder.block.0.layer.1.EncDecAttention.q.lora_B.weight"
    del tensors[key]
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match=f"lacks 1 key.*{key}"):
        load_adapter(toy_t5(), directory)


def test_load_refuses_unprefixed_keys(tmp_path):
    directory = saved_adapter(tmp_path)
    tensors = {
        k.removeprefix("base_model.model."): v for k, v in load_file(directory / "adapter_model.safetensors").items()
    }
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="lacks 24 key"):
        load_adapter(toy_t5(), directory)


def test_load_refuses_unexpected_key(tmp_path):
    directory = saved_adapter(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    tensors["base_model.model.encoder.block.0.layer.0.SelfAttention.k.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="key.*the model does not.*SelfAttention.k.lora_A"):
        load_adapter(toy_t5(), directory)


def test_load_refuses_shape_mismatch(tmp_path):
    directory = saved_adapter(tmp_path)
    with pytest.raises(AdapterError, match=r"has shape \(4, 32\) but the model expects \(4, 40\)"):
        load_adapter(toy_t5(d_model=40), directory)


def test_load_refuses_other_rank_in_injected_model(tmp_path):
    directory = saved_adapter(tmp_path)
    model = toy_t5()
    inject_lora(model, r=8, alpha=8)
    with pytest.raises(AdapterError, match="r=8"):
        load_adapter(model, directory)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("use_dora", True, "says use_dora: true, but .* holds no DoRA magnitude .*lora_magnitude_vector"),
        ("use_dora", "yes", "'use_dora' must be true or false"),
        ("bias", "all", "'bias'"),
        ("fan_in_fan_out", True, "'fan_in_fan_out'"),
        ("peft_type", "IA3", "'peft_type'"),
        ("r", 0, "rank r must be a positive integer"),
        ("lora_alpha", "16", "alpha must be a positive number"),
        ("target_modules", ".*attn.*", "'target_modules'"),
        ("modules_to_save", ["lm_head"], "'modules_to_save'"),
        ("use_rslora", "false", "'use_rslora' must be true or false"),
        ("lora_alpha", True, "alpha must be a positive number"),
        ("lora_alpha", float("inf"), "alpha must be a positive number"),
        ("lora_alpha", 1e300, "alpha must be a positive number up to"),
        ("r", 10**12, "rank r must be a positive integer up to"),
        ("r", 64, "exceeds this layer's smallest dimension"),  # the tiny T5's layers are 32 wide
        ("lora_dropout", 2.0, "dropout must be in"),
        ("lora_dropout", "0.1", "dropout must be in"),
        ("base_model_name_or_path", 5, "'base_model_name_or_path' must be a model name or path"),
        ("layer_replication", [[0, 1]], "'layer_replication'"),
        ("target_parameters", ["q.weight"], "'target_parameters'"),
        ("exclude_modules", ["q"], "'exclude_modules'"),
        ("init_lora_weights", "olora", "'init_lora_weights'"),
        ("init_lora_weights", "pissa_niter_x", "PiSSA's are 'pissa' and 'pissa_niter_N'"),
    ],
)
def test_load_refuses_unsupported_config(tmp_path, field, value, message):
    directory = saved_adapter(tmp_path)
    edit_config(directory, **{field: value})
    with pytest.raises(AdapterError, match=message):
        load_adapter(toy_t5(), directory)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda t: t.to(torch.int32), "holds torch.int32 values"),
        (lambda t: t > 0, "holds torch.bool values"),
        (lambda t: t.fill_(float("nan")), "NaN or infinite values"),
    ],
)
def test_load_refuses_tensors_that_are_no_lora_weights(tmp_path, damage, message):
    directory = saved_adapter(tmp_path)
    tensors = load_file(directory / "adapter_model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = damage(tensors[key])
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    model = toy_t5()
    with pytest.raises(AdapterError, match=message):
        load_adapter(model, directory)
    assert not lora_layers(model)  # refused before the model was touched


def test_load_refuses_pickle_and_missing_files(tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load_adapter(toy_t5(), tmp_path / "nowhere")
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(toy_t5(), tmp_path)
    directory = saved_adapter(tmp_path)
    (directory / "adapter_model.safetensors").rename(directory / "adapter_model.bin")
    with pytest.raises(AdapterError, match="only adapter_model.bin.*never unpickles"):
        load_adapter(toy_t5(), directory)


def test_a_bf16_base_with_an_fp32_adapter(t5_batch):
    """The frozen base in bf16, A and B in fp32: the branch computes in fp32, gradients reach A and B in
    fp32, merging rounds scaling·B@A into the bf16 weight once, and merged and unmerged outputs agree to bf16's
    precision."""
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    set_base_dtype(model, torch.bfloat16)
    layers = lora_layers(model).values()
    assert all(layer.weight.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32 for layer in layers)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    model(**t5_batch).loss.backward()
    assert all(layer.lora_A.grad.dtype == torch.float32 and layer.lora_A.grad.abs().sum() > 0 for layer in layers)
    unmerged = logits(model, t5_batch)
    w0 = {id(layer): layer.weight.float().clone() for layer in layers}
    merge_lora(model)
    for layer in layers:
        assert torch.equal(layer.weight, (w0[id(layer)] + layer.delta_weight()).to(torch.bfloat16))
    merged = logits(model, t5_batch)
    assert torch.isfinite(merged).all() and (merged - unmerged).abs().max() < 0.05 * unmerged.abs().max()


def test_a_frozen_bf16_product_on_a_cpu_without_bf16_matmul_is_computed_in_fp32(monkeypatch):
    """frozen_linear: on an AVX2 CPU a frozen bf16 weight's product and the input's gradient are the fp32
    products of the same bf16 values rounded once (PyTorch's bf16 GEMM there is 5-300x slower), it keeps
    nothing but the weight for the backward, and every other case is F.linear."""
    monkeypatch.setattr(support.fast_modules, "cpu_has_bf16_matmul", lambda: False)
    torch.manual_seed(0)
    x = torch.randn(3, 5, 48).bfloat16().requires_grad_()
    weight, bias = torch.randn(64, 48).bfloat16(), torch.randn(64).bfloat16()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = frozen_linear(x, weight, bias)
    assert type(y.grad_fn).__name__ == "_Bf16LinearInFp32Backward"
    assert y.dtype == torch.bfloat16 and torch.equal(y, (x.float() @ weight.float().T + bias.float()).bfloat16())
    assert [t.data_ptr() for t in saved] == [weight.data_ptr()]  # the weight itself, no copy, no activation
    native = F.linear(x, weight, bias).float()
    assert ((y.float() - native).abs() <= 2**-7 * native.abs() + 1e-6).all()  # within one bf16 rounding
    grad = torch.randn(3, 5, 64).bfloat16()
    y.backward(grad)
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, (grad.float() @ weight.float()).bfloat16())
    for args in [(x.float(), weight.float(), None), (x, weight.requires_grad_(), None)]:  # fp32; a trained weight
        assert type(frozen_linear(*args).grad_fn).__name__ != "_Bf16LinearInFp32Backward"
    # AVX-512 or AMX: PyTorch's own bf16 GEMM
    monkeypatch.setattr(support.fast_modules, "cpu_has_bf16_matmul", lambda: True)
    assert type(frozen_linear(x, weight.detach()).grad_fn).__name__ != "_Bf16LinearInFp32Backward"


def test_lora_plus_groups_hold_exactly_the_as_and_the_bs():
    model = toy_t5()
    inject_lora(model, r=4, alpha=8)
    layers = list(lora_layers(model).values())
    (plain,) = lora_param_groups(model, lr=1e-3)
    assert plain["lr"] == 1e-3 and plain["params"] == [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    a_group, b_group = lora_param_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    assert a_group["params"] == [layer.lora_A for layer in layers] and a_group["lr"] == 1e-3
    assert b_group["params"] == [layer.lora_B for layer in layers] and b_group["lr"] == 16e-3
    optimizer = torch.optim.AdamW(lora_param_groups(model, 1e-3, 16), 1e-3)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
