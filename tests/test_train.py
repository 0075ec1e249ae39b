import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_t5
from safetensors.torch import load_file

import train
from data import EncodedExample, collate
from lora import inject_lora, load_adapter, lora_layers

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--val-data", "none", "--log-every", "1"]


def run_main(argv, capsys):
    code = train.main(argv)
    return code, capsys.readouterr().err


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(directory):
    return load_file(Path(directory) / "adapter_model.safetensors")


# --- refusals before any model loads ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--r", "0"], "--r must be a positive integer"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr=-1e-3"], "--lr must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--target-modules", "q", "query"], "unknown target module(s) ['query']"),
        (["--dropout", "1"], "--dropout must be in [0, 1)"),
        (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
    ],
)
def test_invalid_values_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    code, err = run_main(FAST + ["--output-dir", str(tmp_path / "out")] + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_empty_data_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("model loaded"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_main(FAST + ["--data", str(empty), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 1 and f"{empty} holds no rows" in err


def test_unloadable_model_gets_one_clear_message(tmp_path, capsys):
    code, err = run_main(["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 1 and "--model tiny" in err and "Traceback" not in err


def test_another_run_is_never_overwritten_silently(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_main(FAST + ["--max-steps", "2", "--output-dir", str(out)], capsys)[0] == 0
    code, err = run_main(FAST + ["--max-steps", "2", "--lr", "1e-3", "--output-dir", str(out)], capsys)
    assert code == 2 and "already holds files" in err
    code, err = run_main(FAST + ["--max-steps", "2", "--lr", "1e-3", "--output-dir", str(out), "--resume"], capsys)
    assert code == 2 and "lr=0.003" in err and "lr=0.001" in err
    assert (
        run_main(FAST + ["--max-steps", "2", "--lr", "1e-3", "--output-dir", str(out), "--overwrite"], capsys)[0] == 0
    )
    assert json.loads((out / "training_config.json").read_text())["lr"] == 1e-3
    (out / "best").mkdir()
    (out / "best" / "adapter_config.json").write_text("{}")
    assert run_main(FAST + ["--max-steps", "2", "--output-dir", str(out), "--overwrite"], capsys)[0] == 0
    assert not (out / "best").exists()  # nothing of the replaced run passes for the new one's


# --- the loss ---------------------------------------------------------------------------------------------


def test_token_weighted_accumulation_is_the_exact_per_token_mean(t5_batch):
    """Two micro-batches of unequal token counts: sum/total equals the mean over all tokens."""
    model = tiny_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.normal_()
    batch = dict(t5_batch)
    batch["labels"] = batch["labels"].clone()
    batch["labels"][0, 2:] = -100  # rows now hold 2, 5 and 5 supervised tokens
    batch["decoder_input_ids"] = model._shift_right(batch["labels"])
    whole = torch.nn.functional.cross_entropy(model(**batch).logits.flatten(0, 1), batch["labels"].flatten())
    first = {k: v[:1] for k, v in batch.items()}
    rest = {k: v[1:] for k, v in batch.items()}
    total = int((batch["labels"] != -100).sum())
    accumulated = (train.sequence_loss_sum(model, first) + train.sequence_loss_sum(model, rest)) / total
    torch.testing.assert_close(accumulated, whole)
    naive = (train.sequence_loss_sum(model, first) / 2 + train.sequence_loss_sum(model, rest) / 10) / 2
    assert not torch.allclose(naive, whole)  # averaging per-batch means would weight tokens unequally


def test_our_loss_is_t5s_own_loss_without_t5_computing_it():
    """collate's decoder inputs are T5's shift of the labels, and sum / tokens is T5's mean cross-entropy."""
    model = tiny_t5()
    rows = [
        EncodedExample([5, 6, 7, 1], [9, 8, 1]),
        EncodedExample([4, 1], [3, 3, 3, 3, 1]),
        EncodedExample([2, 1], [1]),
    ]
    batch = collate(rows, pad_token_id=0)
    assert torch.equal(batch["decoder_input_ids"], model._shift_right(batch["labels"]))
    with torch.no_grad():
        ours = train.sequence_loss_sum(model, batch) / int((batch["labels"] != -100).sum())
        theirs = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
    torch.testing.assert_close(ours, theirs)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [train.lr_factor(s, 4, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(factors[3:], factors[4:])) and train.lr_factor(20, 4, 20) == 0


# --- NaN guards -------------------------------------------------------------------------------------------


def inf_on_calls(bad_calls, record):
    """A prepare_model hook: the lm_head returns inf on the given forward calls; adapter snapshots are recorded."""

    def prepare(model):
        calls = {"n": 0}

        def hook(module, inputs, output):
            calls["n"] += 1
            record.append({k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k})
            if calls["n"] in bad_calls:
                return output + float("inf")
            return output

        model.lm_head.register_forward_hook(hook)

    return prepare


def test_a_non_finite_step_is_skipped_and_training_goes_on(tmp_path):
    snapshots = []
    args = train.parse_args(FAST + ["--max-steps", "6", "--output-dir", str(tmp_path), "--weight-decay", "0.1"])
    summary = train.train(args, prepare_model=inf_on_calls({3}, snapshots))
    assert summary["steps"] == 6 and summary["skipped_steps"] == 1 and summary["aborted"] is None
    # snapshots[i] is the adapter as forward call i+1 saw it: step 3 failed, so step 4 sees step 3's adapter...
    assert all(torch.equal(snapshots[2][k], snapshots[3][k]) for k in snapshots[2])
    # ...while every good step moves it.
    assert not all(torch.equal(snapshots[1][k], snapshots[2][k]) for k in snapshots[1])
    assert not all(torch.equal(snapshots[3][k], snapshots[4][k]) for k in snapshots[3])
    rows = metrics(tmp_path)
    assert [r["skipped_steps"] for r in rows if "train_loss" in r] == [0, 0, 1, 1, 1]  # step 3 logs no loss
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path).values())


def test_repeated_non_finite_steps_stop_training_and_keep_the_last_good_adapter(tmp_path, capsys):
    snapshots = []
    args = train.parse_args(FAST + ["--max-steps", "20", "--max-skipped-steps", "3", "--output-dir", str(tmp_path)])
    with pytest.raises(train.TrainingAborted, match="3 consecutive steps"):
        train.train(args, prepare_model=inf_on_calls(set(range(3, 100)), snapshots))
    saved = adapter_tensors(tmp_path)
    last_good = snapshots[2]  # the adapter after the two good steps
    assert all(
        torch.equal(
            saved[
                f"base_model.model.{k.removesuffix('lora_A').removesuffix('lora_B')}"
                f"{'lora_A' if k.endswith('lora_A') else 'lora_B'}.weight"
            ],
            v,
        )
        for k, v in last_good.items()
    )


# --- checkpoints and exact resume -------------------------------------------------------------------------


def train_command(output_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "--model",
        "tiny",
        "--max-steps",
        "40",
        "--save-every",
        "10",
        "--eval-every",
        "20",
        "--dropout",
        "0.1",
        "--log-every",
        "5",
        "--output-dir",
        str(output_dir),
        *extra,
    ]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(train_command(tmp_path / "straight"), check=True, capture_output=True, env=env)

    killed = tmp_path / "killed"
    process = subprocess.Popen(train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted((killed / "checkpoints").glob("step-*"))
    assert checkpoints and not (killed / "adapter_model.safetensors").exists(), "the run was not interrupted"
    state = torch.load(checkpoints[-1] / "training_state.pt", weights_only=True)  # plain tensors and values only
    assert state["progress"]["step"] in (10, 20, 30)

    resumed = subprocess.run(train_command(killed, "--resume"), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    straight, again = adapter_tensors(tmp_path / "straight"), adapter_tensors(killed)
    assert straight.keys() == again.keys()
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], rtol=0, atol=1e-6)
    assert not all(torch.count_nonzero(v) == 0 for k, v in straight.items() if "lora_B" in k)


def test_output_directory_holds_everything_infer_and_peft_need(tmp_path):
    train.main(
        [
            "--model",
            "tiny",
            "--max-steps",
            "12",
            "--eval-every",
            "6",
            "--save-every",
            "6",
            "--log-every",
            "3",
            "--output-dir",
            str(tmp_path),
        ]
    )
    names = {p.name for p in tmp_path.iterdir()}
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "training_loss.png",
        "training_config.json",
        "tokenizer.json",
        "best",
        "checkpoints",
    } <= names
    assert (tmp_path / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = metrics(tmp_path)
    assert {"step", "epoch", "train_loss", "lr", "grad_norm", "skipped_steps", "tokens_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [6, 12]
    from transformers import AutoModelForSeq2SeqLM

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    base = AutoModelForSeq2SeqLM.from_pretrained(config["base_model_name_or_path"])
    assert len(load_adapter(base, tmp_path)) == 2 * 7 + 2 * 7 + 2 * 4  # tiny targets every linear but lm_head


# --- distributed ------------------------------------------------------------------------------------------


def test_two_cpu_processes_with_gloo_write_one_loadable_adapter(tmp_path):
    out = tmp_path / "ddp"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            str(ROOT / "train.py"),
            "--model",
            "tiny",
            "--max-steps",
            "6",
            "--log-every",
            "2",
            "--eval-every",
            "3",
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trainable parameters") == 1  # only rank 0 logs
    assert json.loads((out / "training_config.json").read_text())["world_size"] == 2
    from transformers import AutoModelForSeq2SeqLM

    config = json.loads((out / "adapter_config.json").read_text())
    base = AutoModelForSeq2SeqLM.from_pretrained(config["base_model_name_or_path"])
    load_adapter(base, out)
    assert any(torch.count_nonzero(layer.lora_B) for layer in lora_layers(base).values())


def test_bf16_autocast_on_the_cpu_trains_with_fp32_adapter(tmp_path):
    summary = train.train(
        train.parse_args(FAST + ["--max-steps", "4", "--precision", "bf16", "--output-dir", str(tmp_path)])
    )
    assert summary["skipped_steps"] == 0 and summary["final_train_loss"] < 20
    tensors = adapter_tensors(tmp_path)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
