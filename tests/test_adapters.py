"""Several adapters on one base: by name, active one at a time, or one per row of a mixed batch; PEFT agrees."""

import pytest
import torch
from conftest import logits, toy_t5

from lora import AdapterError, inject_lora, load_adapter, lora_layers, merge_lora, save_adapter, unmerge_lora
from lora.adapters import (
    accept_adapter_names,
    active_adapter,
    adapter_names,
    add_adapter,
    delete_adapter,
    mixed_adapters,
    set_active_adapter,
)
from lora.named_adapter_io import load_named_adapter, save_named_adapter

peft = __import__("peft")
EXACT = {"rtol": 1e-5, "atol": 1e-6}  # a row alone and in a batch of 3 meet differently blocked matmuls


def trained_like(directory, seed, **inject):
    """An adapter file with random A and B (as if trained), from a model injected once."""
    model = toy_t5()
    inject_lora(model, **inject)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.2)
    save_adapter(model, directory)
    return directory


@pytest.fixture
def two_adapters(tmp_path):
    """retail: r=4 on q, v; business: r=2, rsLoRA, on q, k, o (different ranks and targets)."""
    retail = trained_like(tmp_path / "retail", 1, r=4, alpha=8, dropout=0.0)
    business = trained_like(tmp_path / "business", 2, target_modules=("q", "k", "o"), r=2, alpha=4, use_rslora=True)
    return retail, business


def model_with(retail, business):
    model = toy_t5()
    load_named_adapter(model, retail, "retail")
    load_named_adapter(model, business, "business")
    return model


def row(batch, i):
    return {key: value[i : i + 1] for key, value in batch.items()}


def mixed_rows_each_alone(model, batch, names):
    """The logits of `batch` as a mixed batch of `names`, once each row is checked to be that row alone with
    its adapter active."""
    with mixed_adapters(model, names):
        mixed = logits(model, batch)
    for i, name in enumerate(names):
        with active_adapter(model, name):
            alone = logits(model, row(batch, i))
        torch.testing.assert_close(mixed[i : i + 1], alone, **EXACT)
    return mixed


def test_each_row_of_a_mixed_batch_is_that_row_alone_with_its_adapter(two_adapters, t5_batch):
    model = model_with(*two_adapters)
    assert adapter_names(model) == ["retail", "business"]
    names = ["business", None, "retail"]
    mixed = mixed_rows_each_alone(model, t5_batch, names)
    with active_adapter(model, None):
        assert torch.equal(logits(model, t5_batch), logits(toy_t5(), t5_batch))
    assert not torch.allclose(mixed[0], mixed[2])  # the two adapters really differ


def test_a_mixed_batch_with_gradients_equals_it_without_and_each_row_trains_only_its_adapter(two_adapters, t5_batch):
    """Without gradients a mixed batch stacks every adapter's factors and gathers each row's (serving's path);
    with gradients it groups the rows by adapter (training's path). Both give the same logits, and a loss on
    one row reaches only that row's adapter."""
    model = model_with(*two_adapters)
    names = ["business", None, "retail"]
    with mixed_adapters(model, names):
        gathered = logits(model, t5_batch)
        grouped = model(**t5_batch).logits
    torch.testing.assert_close(grouped.detach(), gathered, **EXACT)
    grouped[0].square().sum().backward()  # row 0 is business's
    for name, param in model.named_parameters():
        if "retail" in name:
            assert param.grad is None or not param.grad.any(), name
        if "business" in name and name.endswith("lora_B"):
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_a_mixed_batch_sees_a_factor_changed_inside_its_block(two_adapters, t5_batch):
    """The stacked factors are kept for the block; a step between two evaluations (here a copy_ into
    business's B) must reach the next forward, not the factors stacked before it."""
    model = model_with(*two_adapters)
    names = ["business", None, "retail"]
    with mixed_adapters(model, names):
        before = logits(model, t5_batch)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "business" in name and name.endswith("lora_B"):
                    param.copy_(param * -3)
        after = logits(model, t5_batch)
    with active_adapter(model, "business"):
        torch.testing.assert_close(after[:1], logits(model, row(t5_batch, 0)), rtol=1e-4, atol=1e-5)  # B grew 3x
    assert not torch.allclose(after[0], before[0])
    torch.testing.assert_close(after[2], before[2], rtol=0, atol=0)  # retail's row did not change


def test_a_mixed_batch_of_adapters_made_under_inference_mode(tmp_path, t5_batch):
    """Adapters added and changed under torch.inference_mode are inference tensors, which keep no version
    counter: the mixed batch answers with their factors as they are at each call, and does not fail."""
    with torch.inference_mode():
        model = toy_t5()
        inject_lora(model, r=4, alpha=8)
        add_adapter(model, "second", r=2, alpha=4)
        generator = torch.Generator().manual_seed(0)
        for layer in lora_layers(model).values():
            for adapter in layer.adapters.values():
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=generator) * 0.2)
        names = ["second", None, "default"]
        with mixed_adapters(model, names):
            before = model(**t5_batch).logits
            for layer in lora_layers(model).values():
                layer.adapters["second"].lora_B.mul_(-3)
            after = model(**t5_batch).logits
        with active_adapter(model, "second"):
            alone = model(**row(t5_batch, 0)).logits
    torch.testing.assert_close(after[:1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(after[0], before[0])
    assert torch.equal(after[2], before[2])


def test_a_mixed_batch_on_an_nf4_base_gives_each_row_its_adapter_alone(two_adapters, t5_batch):
    """QLoRA with several adapters: the base quantised after they are loaded (as infer.py does for adapters
    trained with --base-dtype nf4). Each row of a mixed batch is that row alone with its adapter, on the same
    4-bit base; and model(..., adapter_names=...) alike. (The mixed batch once read the 4-bit weight's device,
    which it did not have.)"""
    from lora.nf4 import quantize_base

    model = model_with(*two_adapters)
    quantize_base(model, torch.float32)
    names = ["business", None, "retail"]
    mixed = mixed_rows_each_alone(model, t5_batch, names)
    with torch.no_grad():
        torch.testing.assert_close(model(**t5_batch, adapter_names=names).logits, mixed, rtol=0, atol=0)
    assert not torch.allclose(mixed[0], mixed[2])


def test_on_an_nf4_base_deleting_every_adapter_gives_the_4_bit_base_back_and_nf4_layers_take_none(
    two_adapters, t5_batch
):
    """Deleting the last adapter of an NF4 layer raised TypeError half-way, one adapter already gone; adding
    one to a layer quantised without an adapter said it 'matches no linear layer'. Now the layers become
    LinearNF4 again around the same 4-bit weights (the quantised base's own outputs), and the addition is
    refused in one sentence, the model unchanged."""
    from lora.nf4 import LinearNF4, quantize_base

    model = model_with(*two_adapters)
    quantize_base(model, torch.float32)
    with active_adapter(model, None):
        base_logits = logits(model, t5_batch)
    weights = {path: layer.weight for path, layer in lora_layers(model).items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"target module\(s\) \['wo'\] are stored in NF4 without an adapter"):
        add_adapter(model, "wholesale", ("wo",), r=2, alpha=4)
    assert adapter_names(model) == ["retail", "business"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.warns(UserWarning, match="is active now"):
        delete_adapter(model, "retail")
    delete_adapter(model, "business")
    assert lora_layers(model) == {} and adapter_names(model) == []
    for path, weight in weights.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, LinearNF4) and layer.weight is weight
    torch.testing.assert_close(logits(model, t5_batch), base_logits, rtol=0, atol=0)


def test_mixed_batch_equals_peft_s_and_peft_loads_ours_by_name(two_adapters, t5_batch):
    retail, business = two_adapters
    ours = model_with(retail, business)
    theirs = peft.PeftModel.from_pretrained(toy_t5(), retail, adapter_name="retail")
    theirs.load_adapter(business, adapter_name="business")
    theirs.eval()
    with torch.no_grad():
        expected = theirs(**t5_batch, adapter_names=["retail", "__base__", "business"]).logits
    with mixed_adapters(ours, ["retail", None, "business"]):
        torch.testing.assert_close(logits(ours, t5_batch), expected, rtol=1e-5, atol=1e-5)


def test_a_peft_saved_pair_loads_by_name(tmp_path, t5_batch):
    config = dict(lora_dropout=0.0, task_type="SEQ_2_SEQ_LM")
    theirs = peft.get_peft_model(toy_t5(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], **config))
    theirs.add_adapter("business", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k", "wo"], **config))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    theirs.save_pretrained(tmp_path)  # "default" in tmp_path, "business" in tmp_path/business
    ours = toy_t5()
    load_named_adapter(ours, tmp_path, "default")
    load_named_adapter(ours, tmp_path / "business", "business")
    theirs.eval()
    for name in ("default", "business"):
        theirs.set_adapter(name)
        with active_adapter(ours, name):
            torch.testing.assert_close(logits(ours, t5_batch), logits(theirs, t5_batch), rtol=1e-5, atol=1e-5)


def test_mixed_generate_gives_each_row_the_answer_of_its_adapter_alone(two_adapters):
    model = model_with(*two_adapters)
    generator = torch.Generator().manual_seed(4)
    inputs = {"input_ids": torch.randint(2, 64, (4, 6), generator=generator)}
    names = ["retail", "business", None, "business"]
    options = dict(max_new_tokens=6, do_sample=False)
    for beams in (1, 2):
        with torch.no_grad(), mixed_adapters(model, names):
            mixed = model.generate(**inputs, num_beams=beams, **options)
        for i, name in enumerate(names):
            with torch.no_grad(), active_adapter(model, name):
                alone = model.generate(input_ids=inputs["input_ids"][i : i + 1], num_beams=beams, **options)
            assert mixed[i, : alone.shape[1]].tolist() == alone[0].tolist()


def test_merging_folds_in_the_active_adapter_and_switching_unmerges_first(two_adapters, t5_batch):
    model = model_with(*two_adapters)
    expected = {}
    for name in ("retail", "business"):
        with active_adapter(model, name):
            expected[name] = logits(model, t5_batch)
    set_active_adapter(model, "business")
    merge_lora(model)
    torch.testing.assert_close(logits(model, t5_batch), expected["business"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="a mixed batch needs every adapter unmerged"):
        with mixed_adapters(model, ["retail", None, None]):
            pass
    set_active_adapter(model, "retail")  # unmerges business first
    assert not any(layer.merged for layer in lora_layers(model).values())
    torch.testing.assert_close(logits(model, t5_batch), expected["retail"], rtol=1e-5, atol=1e-5)


def test_save_by_name_then_load_is_bit_exact_and_delete_restores_the_base(two_adapters, tmp_path, t5_batch):
    model = model_with(*two_adapters)
    with pytest.raises(AdapterError, match="several adapters .*save or load one by its name"):
        save_adapter(model, tmp_path / "which")
    save_named_adapter(model, tmp_path / "business_again", "business")
    alone = toy_t5()
    load_adapter(alone, tmp_path / "business_again")
    with active_adapter(model, "business"):
        assert torch.equal(logits(alone, t5_batch), logits(model, t5_batch))
    with pytest.warns(UserWarning, match="'business' is active now"):
        delete_adapter(model, "retail")
    delete_adapter(model, "business")
    assert not lora_layers(model)
    assert torch.equal(logits(model, t5_batch), logits(toy_t5(), t5_batch))


def test_errors_leave_nothing_half_loaded(two_adapters, tmp_path):
    retail, business = two_adapters
    model = model_with(retail, business)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="already has an adapter named 'retail'"):
        load_named_adapter(model, business, "retail")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['wholesale'\]"):
        with mixed_adapters(model, ["retail", "wholesale"]):
            pass
    bigger = toy_t5(d_model=48, d_kv=12)  # another base size: shapes differ
    inject_lora(bigger, r=4, alpha=8)
    save_adapter(bigger, tmp_path / "bigger")
    with pytest.raises(AdapterError, match="has shape"):
        load_named_adapter(model, tmp_path / "bigger", "wholesale")
    assert adapter_names(model) == ["retail", "business"]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    unmerge_lora(model)


def test_peft_s_adapter_names_keyword_in_forward_and_generate_equals_peft(two_adapters):
    """PEFT's form, model(..., adapter_names=[...]): two adapters of different ranks and targets and base rows
    ("__base__", PEFT's name) in one batch give PEFT's logits, and generate (greedy, beams) PEFT's tokens."""
    retail, business = two_adapters
    ours = model_with(retail, business)
    theirs = peft.PeftModel.from_pretrained(toy_t5(), retail, adapter_name="retail")
    theirs.load_adapter(business, adapter_name="business")
    theirs.eval()
    generator = torch.Generator().manual_seed(5)
    inputs = {"input_ids": torch.randint(2, 64, (4, 7), generator=generator)}
    decoder = {"decoder_input_ids": torch.randint(2, 64, (4, 5), generator=generator)}
    names = ["business", "__base__", "retail", "business"]
    with torch.no_grad():
        mixed = ours(**inputs, **decoder, adapter_names=names).logits
        torch.testing.assert_close(mixed, theirs(**inputs, **decoder, adapter_names=names).logits, rtol=0, atol=1e-5)
        assert (mixed - ours(**inputs, **decoder).logits).abs().max() > 0.1  # the keyword was acted on
        for beams in (1, 2):
            options = dict(max_new_tokens=6, do_sample=False, num_beams=beams)
            tokens = ours.generate(**inputs, adapter_names=names, **options)
            assert tokens.tolist() == theirs.generate(**inputs, adapter_names=names, **options).tolist()
            assert tokens.tolist() != ours.generate(**inputs, **options).tolist()
    assert all("forward" not in vars(layer) for layer in lora_layers(ours).values())  # nothing stays mixed


def test_adapter_names_that_cannot_be_honoured_are_refused_in_one_sentence(two_adapters, tmp_path):
    from lora import DoRALinear

    model = model_with(*two_adapters)
    x = {"input_ids": torch.randint(2, 64, (3, 6)), "decoder_input_ids": torch.randint(2, 64, (3, 4))}
    refusals = {
        "unknown adapter\\(s\\) \\['zzz_unknown'\\]": ["zzz_unknown", "retail", None],
        "has 2 names for a batch of 3 rows": ["retail", "business"],
        "has 4 names for a batch of 3 rows": ["retail"] * 4,
        "a non-empty list": "retail",
    }
    for message, names in refusals.items():
        with pytest.raises(ValueError, match=message):
            model(**x, adapter_names=names)
        with pytest.raises(ValueError, match=message):
            model.generate(input_ids=x["input_ids"], adapter_names=names, max_new_tokens=2)
    merge_lora(model)
    with pytest.raises(ValueError, match="needs every adapter unmerged"):
        model(**x, adapter_names=["retail", None, "business"])
    unmerge_lora(model)
    with pytest.warns(UserWarning, match="'business' is active now"):
        delete_adapter(model, "retail")
    delete_adapter(model, "business")
    with pytest.raises(ValueError, match="the model holds no adapter"):
        model(**x, adapter_names=["retail", None, None])
    dora = toy_t5()
    inject_lora(dora, use_dora=True)
    accept_adapter_names(dora)  # plain inject_lora installs no handling of the keyword
    assert any(isinstance(layer, DoRALinear) for layer in lora_layers(dora).values())
    with pytest.raises(ValueError, match="holds a DoRA adapter"):
        dora(**x, adapter_names=["default", None, "default"])
    assert all("forward" not in vars(layer) for layer in lora_layers(dora).values())


def test_mixed_blocks_nest_and_check_their_rows(two_adapters, t5_batch):
    model = model_with(*two_adapters)
    with mixed_adapters(model, ["retail", None, "business"]):
        outer = logits(model, t5_batch)
        with mixed_adapters(model, ["business", "business", "business"]):
            pass
        torch.testing.assert_close(logits(model, t5_batch), outer, rtol=0, atol=0)  # the outer rows are back
    with pytest.raises(ValueError, match="names an adapter for each of 2 rows, but this batch has 3 rows"):
        with mixed_adapters(model, ["retail", "business"]):
            logits(model, t5_batch)
    two_rows = {key: value[:2] for key, value in t5_batch.items()}
    four_rows = {key: torch.cat([value, value]) for key, value in two_rows.items()}
    with pytest.raises(ValueError, match="names an adapter for each of 2 rows, but this batch has 4 rows"):
        with mixed_adapters(model, ["retail", "business"]):  # a multiple of the names is beams only in generate
            logits(model, four_rows)


def test_adapter_bookkeeping_completes_or_changes_nothing(two_adapters, t5_batch):
    """An unnamed load into a model of several adapters, deleting an unknown adapter, or deleting from a merged
    model used to overwrite the first adapter, do nothing, or half delete: each is refused before any change."""
    retail, business = two_adapters
    model = model_with(retail, business)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="holds several adapters: load .* under a name of its own"):
        load_adapter(model, business)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="no adapter named 'nosuch' \\(it has retail, business\\)"):
        delete_adapter(model, "nosuch")
    set_active_adapter(model, "retail")
    merge_lora(model)
    merged, paths = {k: v.clone() for k, v in model.state_dict().items()}, list(lora_layers(model))
    with pytest.raises(ValueError, match="is merged: unmerge_lora"):
        delete_adapter(model, "business")
    assert adapter_names(model) == ["retail", "business"] and list(lora_layers(model)) == paths
    assert all(torch.equal(model.state_dict()[k], v) for k, v in merged.items())
    unmerge_lora(model)


def test_deleting_the_active_adapter_activates_a_remaining_one_with_a_warning(two_adapters, t5_batch):
    model = model_with(*two_adapters)
    with active_adapter(model, "business"):
        business = logits(model, t5_batch)
    set_active_adapter(model, "retail")
    with pytest.warns(UserWarning, match="adapter 'retail' was active and is deleted: 'business' is active now"):
        delete_adapter(model, "retail")
    assert torch.equal(logits(model, t5_batch), business)  # not the base, silently
