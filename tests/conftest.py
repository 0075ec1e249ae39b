import os
import tempfile

import pytest
import torch

from lora import lora_layers

# One tiny-model cache per test session, inherited by the subprocesses tests start.
os.environ.setdefault("LORA_T5_CACHE", tempfile.mkdtemp(prefix="lora-t5-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_t5(seed: int = 0, **overrides):
    """A small T5 built from a config: two layers, d_model 32, random weights."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = dict(
        vocab_size=64,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(T5Config(**config)).eval()


@pytest.fixture
def t5_batch():
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(2, 64, (3, 7), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    labels = torch.randint(2, 64, (3, 5), generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture(scope="session")
def tiny_model_path():
    from support.models import resolve_model_path

    return resolve_model_path("tiny")


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def randomize_adapter(model, seed=3, scale=0.1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * scale)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """One short tiny-model run shared by the tests that need a run directory or a trained adapter:
    40 steps, validated and checkpointed every 20."""
    import train

    out = tmp_path_factory.mktemp("trained") / "run"
    argv = ["--model", "tiny", "--max-steps", "40", "--eval-every", "20", "--save-every", "20", "--log-every", "10"]
    summary = train.train(train.parse_args([*argv, "--output-dir", str(out)]))
    assert summary["final_train_loss"] < summary["first_train_loss"]
    return out
