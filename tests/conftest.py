import os
import tempfile

import pytest
import torch
from helpers import randomize_adapter, saved_random_adapter, toy_t5  # noqa: F401  (imported by the tests from conftest)

# One tiny-model cache per test session, inherited by the subprocesses tests start.
os.environ.setdefault("LORA_T5_CACHE", tempfile.mkdtemp(prefix="lora-t5-test-cache-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (-n 2, setup.cfg) two workers share the cores: each, and every process it starts, computes
# on one thread, since two thread pools spinning on the same cores would slow each other tenfold.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))


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
