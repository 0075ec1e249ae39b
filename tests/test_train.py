import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter, toy_t5
from helpers import one_thread, run_to_the_end
from safetensors.torch import load_file

import support.fast_modules
import train
from data import TRAIN_FILE, EncodedExample, collate
from lora import inject_lora, load_adapter
from support.lr_schedule import lr_factor

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--model", "tiny", "--val-data", "none", "--log-every", "1"]
CPU = torch.device("cpu")


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
        (["--r", "0"], "rank r must be a positive integer"),
        (["--alpha", "0"], "alpha must be a positive number"),
        (["--lr", "0"], "--lr must be positive"),
        (["--lr=-1e-3"], "--lr must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--target-modules", "q", "query"], "unknown target module(s) ['query']"),
        (["--dropout", "1"], "dropout must be in [0, 1)"),
        (["--precision", "fp16"], "fp16 needs a CUDA GPU"),
        (["--loraplus-lr-ratio", "0"], "--loraplus-lr-ratio must be in (0, 1000]"),
    ],
)
def test_invalid_values_are_refused_before_the_model_loads(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(train, "load_with_lora", lambda *a, **k: pytest.fail("model loaded"))
    code, err = run_main(FAST + ["--output-dir", str(tmp_path / "out")] + extra, capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_under_torchrun_only_rank_0_prints_a_refusal(tmp_path, capsys, monkeypatch):
    argv = FAST + ["--output-dir", str(tmp_path / "out"), "--lr", "0"]
    monkeypatch.setenv("RANK", "1")
    assert run_main(argv, capsys) == (2, "")  # every rank refuses alike; one sentence is enough
    monkeypatch.setenv("RANK", "0")
    code, err = run_main(argv, capsys)
    assert code == 2 and "--lr must be positive" in err


def test_empty_data_file_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "load_with_lora", lambda *a, **k: pytest.fail("model loaded"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run_main(FAST + ["--data", str(empty), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and f"{empty} holds no rows" in err


def test_unloadable_model_gets_one_clear_message(tmp_path, capsys):
    code, err = run_main(["--model", str(tmp_path / "no-such-model"), "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "--model tiny" in err and "Traceback" not in err


def test_a_target_that_matches_no_layer_is_refused(tmp_path, capsys):
    """flan-t5 is gated: its feed-forward layers are wi_0 and wi_1, so 'wi' would silently adapt nothing."""
    code, err = run_main(FAST + ["--target-modules", "q", "wi", "--output-dir", str(tmp_path / "out")], capsys)
    assert code == 2 and "['wi'] match no nn.Linear" in err and "wi_0, wi_1" in err and "Traceback" not in err


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


# --- the step: train_step on its own ---------------------------------------------------------------------

ROWS = [  # 3, 7, 2 and 6 supervised tokens, prompts of different lengths
    EncodedExample([5, 6, 7, 8, 1], [9, 8, 1]),
    EncodedExample([4, 1], [3, 3, 3, 3, 3, 3, 1]),
    EncodedExample([2, 3, 1], [7, 1]),
    EncodedExample([9, 9, 9, 1], [5, 6, 7, 8, 9, 1]),
]


def lora_t5():
    model = toy_t5()
    inject_lora(model, r=4, alpha=8, dropout=0.0)
    randomize_adapter(model)
    return model.train()


def step(model, micro_batches, optimizer=None, scaler=None, max_grad_norm=1e9):
    optimizer = optimizer or torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scaler = scaler or torch.amp.GradScaler("cpu", enabled=False)
    return train.train_step(
        model, optimizer, scaler, micro_batches, device=CPU, dtype=torch.float32, max_grad_norm=max_grad_norm
    )


def gradient_of_one_step(model, micro_batches, **kwargs):
    """What one train_step applied: with SGD at lr 1, the update is minus the (clipped) gradient."""
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    result = step(model, micro_batches, **kwargs)
    return {n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}, result


def test_accumulated_micro_batches_give_the_gradient_of_one_big_batch():
    """Micro-batches of 3 and 15 supervised tokens weigh every token alike: a per-batch mean would not."""
    whole, whole_result = gradient_of_one_step(lora_t5(), [collate(ROWS, 0)])
    parts, parts_result = gradient_of_one_step(lora_t5(), [collate(ROWS[:1], 0), collate(ROWS[1:], 0)])
    assert parts_result.supervised_tokens == whole_result.supervised_tokens == 18
    assert parts_result.loss_sum == pytest.approx(whole_result.loss_sum, rel=1e-6)
    assert all(g.abs().sum() > 0 for g in whole.values())
    for name in whole:
        torch.testing.assert_close(parts[name], whole[name], rtol=0, atol=1e-6)


def test_a_gradient_scaler_changes_nothing_but_the_scale():
    """With the scaler on, the step unscales before clipping: same clipped update, same reported norm."""
    batches = [collate(ROWS[:2], 0), collate(ROWS[2:], 0)]
    plain, plain_result = gradient_of_one_step(lora_t5(), batches, max_grad_norm=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaled, scaled_result = gradient_of_one_step(lora_t5(), batches, scaler=scaler, max_grad_norm=0.01)
    assert plain_result.grad_norm > 0.01  # clipping is active
    assert scaled_result.grad_norm == pytest.approx(plain_result.grad_norm, rel=1e-5)
    for name in plain:
        torch.testing.assert_close(scaled[name], plain[name], rtol=0, atol=1e-7)


def test_a_step_with_an_infinite_loss_changes_nothing_and_training_goes_on():
    model = lora_t5()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    batches = [collate(ROWS, 0)]
    assert step(model, batches, optimizer).skipped is None  # a good step first, so the optimizer has state

    adapter = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    optimizer_state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    hook = model.lm_head.register_forward_hook(lambda module, inputs, output: output + float("inf"))
    result = step(model, batches, optimizer)
    hook.remove()
    assert result.skipped and "non-finite" in result.skipped
    assert all(torch.equal(model.state_dict()[k], v) for k, v in adapter.items())
    assert {id(p): s for p, s in optimizer.state.items()}.keys() == optimizer_state.keys()
    for p, state in optimizer.state.items():
        assert all(torch.equal(state[k], optimizer_state[id(p)][k]) for k in state)
    assert all(p.grad is None for p in model.parameters())  # nothing left over for the next step

    assert step(model, batches, optimizer).skipped is None
    assert not all(torch.equal(model.state_dict()[k], v) for k, v in adapter.items())


def checkpointing_gradients(checkpointing: bool, dropout: float):
    """The gradient of one train_step on the tiny model built as train.py builds it, with LoRA and T5 dropout."""
    args = train.parse_args([*FAST, "--dropout", str(dropout), *(["--gradient-checkpointing"] * checkpointing)])
    model, _, _ = train.build_lora_model(args, train.dist.Distributed(0, 1, CPU))
    randomize_adapter(model)  # B = 0 would give A no gradient, checkpointing or not
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = dropout  # the tiny model's own dropout is 0: switch T5's on too
    torch.manual_seed(0)
    return gradient_of_one_step(model, [collate(ROWS[:2], 0), collate(ROWS[2:], 0)])[0]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_gradient_checkpointing_changes_nothing_but_memory(dropout):
    """Every A and B gets the same gradient with checkpointing as without (the recomputation sees the same
    dropout masks), and none is zero."""
    plain, checkpointed = checkpointing_gradients(False, dropout), checkpointing_gradients(True, dropout)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 36  # tiny: 36 adapted layers
    for name in plain:  # the recomputed backward sums in another order: up to 1.2e-5 of the largest gradient apart
        assert checkpointed[name].abs().sum() > 0, name
        assert (checkpointed[name] - plain[name]).abs().max() <= 3e-5 * plain[name].abs().max(), name


def test_a_step_without_supervised_tokens_is_skipped():
    empty = collate([EncodedExample([5, 1], [])], 0)
    result = step(lora_t5(), [empty])
    assert result.skipped == "the batch has no supervised token" and result.supervised_tokens == 0


def test_our_loss_is_t5s_own_loss_without_t5_computing_it():
    """collate's decoder inputs are T5's shift of the labels, and sum / tokens is T5's mean cross-entropy."""
    model = toy_t5()
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


def test_the_lm_head_on_supervised_positions_only_gives_t5s_loss_and_gradients():
    """The loss and every gradient of the labelled-positions-only LM head equal those of T5's full logits."""
    rows = [
        EncodedExample([5, 6, 7, 1], [9, 8, 1]),
        EncodedExample([4, 1], [3, 3, 3, 3, 1]),
        EncodedExample([2, 1], [1]),
    ]
    batch = collate(rows, pad_token_id=0)
    grads, losses = [], []
    for full_logits in (False, True):
        model = toy_t5()
        inject_lora(model, ("q", "v", "wo"), r=4, alpha=8)
        randomize_adapter(model)
        model.lm_head.weight.requires_grad_(True)  # the LM head's own gradient too, as full fine-tuning has it
        if full_logits:
            loss = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
            loss = loss * int((batch["labels"] != -100).sum())
        else:
            loss = train.sequence_loss_sum(model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-6, atol=1e-6, msg=name)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 4, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a > b for a, b in zip(factors[3:], factors[4:])) and lr_factor(20, 4, 20) == 0


# --- NaN guards in the whole loop -------------------------------------------------------------------------


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


def test_repeated_non_finite_steps_stop_training_and_keep_the_last_good_adapter(tmp_path):
    snapshots = []
    args = train.parse_args(FAST + ["--max-steps", "20", "--max-skipped-steps", "3", "--output-dir", str(tmp_path)])
    with pytest.raises(train.TrainingAborted, match="3 consecutive steps"):
        train.train(args, prepare_model=inf_on_calls(set(range(3, 100)), snapshots))
    saved = adapter_tensors(tmp_path)
    last_good = snapshots[2]  # the adapter after the two good steps
    for key, value in last_good.items():  # "...q.lora_A" is saved as "base_model.model....q.lora_A.weight"
        assert torch.equal(saved[f"base_model.model.{key}.weight"], value)


# --- the run directory, checkpoints and exact resume ------------------------------------------------------


def test_output_directory_holds_everything_infer_and_peft_need(trained_run):
    names = {p.name for p in trained_run.iterdir()}
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
    assert (trained_run / "training_loss.png").read_bytes()[:4] == b"\x89PNG"
    rows = metrics(trained_run)
    assert {"step", "epoch", "train_loss", "lr", "grad_norm", "skipped_steps", "tokens_per_s"} <= rows[0].keys()
    assert [r["step"] for r in rows if "val_loss" in r] == [20, 40]
    assert sorted(p.name for p in (trained_run / "checkpoints").iterdir()) == ["step-00000020", "step-00000040"]
    from transformers import AutoModelForSeq2SeqLM

    config = json.loads((trained_run / "adapter_config.json").read_text())
    base = AutoModelForSeq2SeqLM.from_pretrained(config["base_model_name_or_path"])
    assert len(load_adapter(base, trained_run)) == 2 * 7 + 2 * 7 + 2 * 4  # tiny targets every linear but lm_head


def rows_file(path: Path, count: int) -> Path:
    """The first `count` rows of the bundled training data, as a file of the user's."""
    path.write_text("".join(Path(TRAIN_FILE).read_text().splitlines(keepends=True)[:count]))
    return path


def cut_back(run: Path, step: int, out: Path) -> Path:
    """A copy of `run` as a run stopped right after its checkpoint of `step` would have left it."""
    shutil.copytree(run, out)
    for later in (out / "checkpoints").glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    for written_at_the_end in ("adapter_model.safetensors", "adapter_config.json", "metrics.jsonl"):
        (out / written_at_the_end).unlink()
    return out


def resumed_from_each_checkpoint(straight: Path, root: Path, argv: list[str]) -> dict[int, Path]:
    """`straight` cut back to each of its checkpoints in turn and resumed to the end with `argv` in this
    process; {checkpoint's step: the resumed run's directory}."""
    resumed = {}
    steps = sorted(int(p.name.split("-")[1]) for p in (straight / "checkpoints").glob("step-*"))
    for step in steps[:-1]:  # the last was written by the last step: nothing is left to resume
        out = cut_back(straight, step, root / f"from-step-{step}")
        assert train.main([*argv, "--output-dir", str(out), "--resume"]) == 0, step
        resumed[step] = out
    return resumed


def assert_same_run(run: Path, reference: Path, atol: float = 1e-6) -> None:
    """The adapters within `atol`; the logged rows at the same steps and epochs, losses and norms to 1e-6."""
    ours, theirs = adapter_tensors(run), adapter_tensors(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=atol, msg=lambda m, k=key: f"{run}, {k}: {m}")
    rows, expected = metrics(run), metrics(reference)
    assert [(r["step"], r["epoch"], r.keys() - {"tokens_per_s"}) for r in rows] == [
        (r["step"], r["epoch"], r.keys() - {"tokens_per_s"}) for r in expected
    ], run
    for name in ("train_loss", "grad_norm", "val_loss", "lr"):
        values = [[r[name] for r in log if name in r] for log in (rows, expected)]
        torch.testing.assert_close(torch.tensor(values[0]), torch.tensor(values[1]), rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """13 rows: 12 to train on in batches of 5, 5 and 2 (a short last batch), one held out for validation;
    7 steps, two epochs and a step, dropout on (its RNG must continue too), a checkpoint after every step and
    a log row every 2 (so that a resume may split a log interval). (argv, the run's directory)."""
    root = tmp_path_factory.mktemp("two_epochs")
    argv = ["--model", "tiny", "--data", str(rows_file(root / "rows.jsonl", 13)), "--batch-size", "5",
            "--max-steps", "7", "--dropout", "0.1", "--save-every", "1", "--keep-checkpoints", "10",
            "--log-every", "2"]  # fmt: skip
    assert train.main([*argv, "--output-dir", str(root / "run")]) == 0
    return argv, root / "run"


def test_resuming_from_every_checkpoint_of_two_epochs_ends_as_the_uninterrupted_run(two_epochs, tmp_path):
    """The resumes start inside an epoch, on its last batch, right after its end and in the second epoch;
    each must end with the uninterrupted run's adapter, its logged losses at the same steps and epochs, and
    its validation at the same epochs' ends. The epoch's end was once counted from where the run resumed:
    a run resumed after the first batch ended that epoch a batch early and trained on other batches."""
    argv, straight = two_epochs
    assert [(r["step"], r["epoch"]) for r in metrics(straight) if "val_loss" in r] == [(3, 1.0), (6, 2.0), (7, 2.333)]
    resumed = resumed_from_each_checkpoint(straight, tmp_path, argv)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for run in resumed.values():
        assert_same_run(run, straight)


def test_a_checkpoint_of_the_older_epoch_counter_continues_exactly_or_is_refused(two_epochs, tmp_path, capsys):
    """An older train.py also wrote its epoch and the batches of it done. Where they are where the step count
    puts the run (step 4: epoch 1, 1 batch done), the run continues exactly; elsewhere (what a resume
    that ended an epoch early left) it is refused in one sentence, nothing trained."""
    argv, straight = two_epochs

    def older_checkpoint(name: str, epoch: int, batches_done: int) -> Path:
        out = cut_back(straight, 4, tmp_path / name)
        state_file = out / "checkpoints" / "step-00000004" / "training_state.pt"
        state = torch.load(state_file, weights_only=True)
        state["progress"].update(epoch=epoch, batch_in_epoch=batches_done)
        torch.save(state, state_file)
        (state_file.parent / "checksums.json").unlink()  # which that train.py did not write either
        return out

    where_it_belongs = older_checkpoint("belongs", 1, 1)
    assert train.main([*argv, "--output-dir", str(where_it_belongs), "--resume"]) == 0
    assert_same_run(where_it_belongs, straight)

    elsewhere = older_checkpoint("elsewhere", 2, 0)
    capsys.readouterr()
    assert train.main([*argv, "--output-dir", str(elsewhere), "--resume"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is at epoch 2, batch 0, where its step 4 belongs at epoch 1, batch 1" in err
    assert "--overwrite" in err and "Traceback" not in err
    assert (
        not (elsewhere / "adapter_model.safetensors").exists()
        and not (elsewhere / "checkpoints" / "step-00000005").exists()
    )


# A run interrupted in a subprocess and resumed here must match a run done here: with as many threads as this
# process, since on some CPUs (AMX ones) a product's rounding depends on how many threads share it.
AS_THIS_PROCESS = {"OMP_NUM_THREADS": str(torch.get_num_threads())}


def train_command(rows, output_dir, *extra):
    """12 steps over 52 rows: 5 held out, 47 to train on in 7 batches of 7 (the last of 5) an epoch, so a run
    stopped at any step before the 7th, or at the 8th checkpoint, resumes across an epoch's end."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *("--model", "tiny", "--data", str(rows), "--batch-size", "7", "--max-steps", "12"),
        *("--save-every", "4", "--eval-every", "6", "--dropout", "0.1", "--log-every", "2"),
        *("--output-dir", str(output_dir), *extra),
    ]


@pytest.fixture(scope="module")
def stop_rows(tmp_path_factory):
    return rows_file(tmp_path_factory.mktemp("rows") / "rows.jsonl", 52)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, stop_rows):
    """The uninterrupted run that killed and interrupted runs must match after --resume (in this process)."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    assert train.main(train_command(stop_rows, straight)[2:]) == 0
    assert [r["epoch"] for r in metrics(straight) if "val_loss" in r] == [0.857, 1.714]  # 6 and 12 of 7 batches
    return straight


def test_resume_after_sigkill_matches_an_uninterrupted_run(stop_rows, straight_run, tmp_path, capsys):
    straight = straight_run
    killed = tmp_path / "killed"
    env = {**os.environ, **AS_THIS_PROCESS}
    process = subprocess.Popen(
        train_command(stop_rows, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    deadline = time.time() + 120
    while not list((killed / "checkpoints").glob("step-*")) and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoints = sorted((killed / "checkpoints").glob("step-*"))
    assert checkpoints and not (killed / "adapter_model.safetensors").exists(), "the run was not interrupted"
    state = torch.load(checkpoints[-1] / "training_state.pt", weights_only=True)  # plain tensors and values only
    assert state["progress"]["step"] in (4, 8)

    capsys.readouterr()
    assert train.main(train_command(stop_rows, killed, "--resume")[2:]) == 0
    out = capsys.readouterr().out
    resumed_at = state["progress"]["step"]
    assert f"resumed from {checkpoints[-1]} at step {resumed_at}" in out
    assert f"12 steps (0 skipped), the last {12 - resumed_at} resumed here, in" in out  # the time is of those
    assert_same_run(killed, straight)
    assert not all(torch.count_nonzero(v) == 0 for k, v in adapter_tensors(straight).items() if "lora_B" in k)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_request_finishes_the_step_checkpoints_and_resume_matches_an_uninterrupted_run(
    stop_rows, straight_run, tmp_path, capsys, stop
):
    out = tmp_path / "stopped"
    env = {**os.environ, **AS_THIS_PROCESS, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        train_command(stop_rows, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
    )
    err = ""
    while "training:" not in err and process.poll() is None:  # the loop has begun
        err += process.stderr.read(1)
    time.sleep(0.3)
    process.send_signal(stop)
    err += process.stderr.read()
    assert process.wait() == 130, err[-2000:]
    assert f"interrupted: {stop.name} at step" in err and "continue with --resume" in err
    assert list((out / "checkpoints").glob("step-*")) and not (out / "adapter_model.safetensors").exists()
    capsys.readouterr()
    assert train.main(train_command(stop_rows, out, "--resume")[2:]) == 0
    assert_same_run(out, straight_run)


STUCK_IN_A_COLLECTIVE = """
import datetime, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from support.cli import stop_requests
store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=120), wait_for_workers=False)
with stop_requests(grace_s=2):
    print("waiting for a rank that never comes", flush=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=datetime.timedelta(seconds=120))
"""


def test_a_stop_request_ends_a_process_stuck_in_c_plus_plus_after_its_grace(tmp_path):
    """Python runs signal handlers between bytecodes only: a rank waiting in gloo for a peer that never comes
    would note SIGTERM and wait on (here 120 s). The deadline ends it, with the stacks of where it hung."""
    script = tmp_path / "stuck.py"
    script.write_text(STUCK_IN_A_COLLECTIVE)
    command = [sys.executable, "-u", str(script), str(ROOT)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    process = subprocess.Popen(command, **pipes, text=True, start_new_session=True)
    try:
        assert process.stdout.readline().startswith("waiting"), process.stderr.read()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        code = process.wait(timeout=30)
        assert time.monotonic() - sent < 15
    finally:
        with contextlib.suppress(ProcessLookupError):  # nothing of it may outlive the test
            os.killpg(process.pid, signal.SIGKILL)
    err = process.stderr.read()
    assert code == 1 and "SIGTERM: finishing the step" in err and "past 2 s the run ends anyway" in err
    assert "in init_process_group" in err  # faulthandler's stacks: where it was stuck


# --- distributed ------------------------------------------------------------------------------------------


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]  # a free port
WORK_DONE = "; adapter in "  # rank 0's summary line: what is left after it is the teardown


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # each rank, and the one process


def on_two_processes(argv: list[str]) -> str:
    """train.py with `argv` under torchrun on 2 gloo processes, to its end; its stdout."""
    code, stdout, stderr = run_to_the_end(
        [*TORCHRUN, str(ROOT / "train.py"), *argv], work_done=WORK_DONE, env=ONE_THREAD
    )
    assert code == 0, stderr[-3000:]
    return stdout


def ddp_argv(rows: Path, *options: str) -> list[str]:
    """45 rows in batches of 10: 5 batches an epoch, so in its last step rank 1 of 2 has none and runs an
    empty one; 7 steps of 2 batches, two epochs and a step; dropout 0, so that 1 and 2 processes compare."""
    return [*FAST, "--data", str(rows), "--batch-size", "10", "--max-steps", "7", "--dropout", "0",
            "--save-every", "1", "--keep-checkpoints", "10", *options]  # fmt: skip


@pytest.fixture(scope="module")
def ddp_rows(tmp_path_factory):
    return rows_file(tmp_path_factory.mktemp("ddp_rows") / "rows.jsonl", 45)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, ddp_rows):
    """The DDP run of ddp_argv on 2 processes, a checkpoint after each step."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    stdout = on_two_processes([*ddp_argv(ddp_rows), "--output-dir", str(out)])
    assert stdout.count("trainable parameters") == 1  # only rank 0 logs
    assert json.loads((out / "training_config.json").read_text())["world_size"] == 2
    return out


@pytest.mark.parametrize("options", [[], ["--base-dtype", "nf4"]], ids=["ddp", "ddp-nf4-base"])
def test_two_processes_train_exactly_as_one_with_gradient_accumulation(tmp_path, ddp_rows, request, options):
    """2 gloo processes at batch 10 see, step by step, the same 20 rows as 1 process accumulating 2 batches
    of 10, over two epochs of 45 rows. Dropout is 0, so the adapters match: on a dense base and on an NF4 one
    (QLoRA under DDP). FSDP: tests/test_fsdp.py."""
    if options:
        ddp = tmp_path / "ddp"
        on_two_processes([*ddp_argv(ddp_rows, *options), "--output-dir", str(ddp)])
    else:
        ddp = request.getfixturevalue("ddp_run")
    with one_thread():
        assert (
            train.main([*ddp_argv(ddp_rows, *options), "--grad-accum", "2", "--output-dir", str(tmp_path / "one")]) == 0
        )
    assert any(torch.count_nonzero(v) for k, v in adapter_tensors(ddp).items() if "lora_B" in k)
    assert_same_run(tmp_path / "one", ddp)  # AdamW and clipping hide a gradient's scale; its logged norm does not


def test_a_ddp_run_resumes_across_epochs_on_two_processes_on_one_and_back(ddp_run, ddp_rows, tmp_path, capsys):
    """The 2-process run's checkpoints (3 steps an epoch): the one after step 1, with two steps of its epoch
    left, resumed on 2 processes; every one resumed on 1 process with --grad-accum 2 (the same global batch);
    and one written by such a single process after the first epoch's end, resumed on 2 processes again. Each
    ends with the uninterrupted run's adapter (<= 1e-6, as one process and DDP compare) and its logged rows."""
    from_one = cut_back(ddp_run, 1, tmp_path / "from-step-1")
    on_two_processes([*ddp_argv(ddp_rows), "--output-dir", str(from_one), "--resume"])
    assert_same_run(from_one, ddp_run)

    with one_thread():
        on_one = resumed_from_each_checkpoint(ddp_run, tmp_path / "on_one", [*ddp_argv(ddp_rows), "--grad-accum", "2"])
    assert sorted(on_one) == [1, 2, 3, 4, 5, 6]
    assert capsys.readouterr().out.count("the checkpoint was written by 2 process(es), this run has 1") == 6
    for run in on_one.values():
        assert_same_run(run, ddp_run)

    back_on_two = cut_back(on_one[1], 4, tmp_path / "back_on_two")  # steps 2-4 were taken by the single process
    stdout = on_two_processes([*ddp_argv(ddp_rows), "--output-dir", str(back_on_two), "--resume"])
    assert "the checkpoint was written by 1 process(es), this run has 2" in stdout
    assert_same_run(back_on_two, ddp_run)


RANK_1_STARTED_OTHERWISE = """
import os, sys
sys.path.insert(0, sys.argv[1])
import train
extra = sys.argv[2].split() if os.environ["RANK"] == "1" else []  # what another node's command line would add
raise SystemExit(train.main([*sys.argv[3:], *extra]))
"""


@pytest.mark.parametrize(
    "rank_1_adds, says",
    [("--lr 0.002", "rank 1 was started with lr=0.002, rank 0 with 0.003"),
     ("--max-steps 6", "rank 1 was started with max_steps=6, rank 0 with 3")],
)  # fmt: skip
def test_processes_started_with_other_settings_are_refused_before_any_work(tmp_path, rank_1_adds, says):
    """Two nodes given different --lr trained each with its own, and with different --max-steps rank 0 printed
    its success line and then died in the teardown: every rank's settings, data fingerprint and code version
    are compared at the start, and a difference is one sentence on every rank, before any work."""
    script = tmp_path / "rank_1_otherwise.py"
    script.write_text(RANK_1_STARTED_OTHERWISE)
    argv = [*FAST, "--batch-size", "8", "--max-steps", "3", "--lr", "0.003", "--output-dir", str(tmp_path / "run")]
    command = [*TORCHRUN, str(script), str(ROOT), rank_1_adds, *argv]
    code, stdout, stderr = run_to_the_end(command, work_done="error: ", env=ONE_THREAD, timeout=120)
    sentences = [line for line in stderr.splitlines() if line.startswith("error: ")]
    expected = f"error: {says}: every process of a torchrun job must run the same code with the same arguments"
    assert code != 0 and len(sentences) == 1 and sentences[0].startswith(expected), stderr[-3000:]
    assert "trainable parameters" not in stdout and not (tmp_path / "run").exists()


RANK_1_CRASHES_AFTER_ITS_WORK = """
import os, sys
sys.path.insert(0, sys.argv[1])
import train
if os.environ["RANK"] == "1":  # rank 1 dies between the adapter's save and the run's last words
    summary = train.run_summary
    def crash(*args, **kwargs):
        summary(*args, **kwargs)
        os._exit(1)
    train.run_summary = crash
raise SystemExit(train.main(sys.argv[2:]))
"""


def test_a_run_that_fails_on_any_rank_never_prints_its_success_line(tmp_path):
    """Rank 1 dies after the training and the save, before the end: rank 0 printed 'adapter in ...' as if the
    run had succeeded, then died in the teardown's barrier with gloo's traceback. Every rank now meets before
    the success line, and rank 0 names the lost rank in one sentence instead."""
    script = tmp_path / "rank_1_crashes.py"
    script.write_text(RANK_1_CRASHES_AFTER_ITS_WORK)
    argv = [*FAST, "--batch-size", "8", "--max-steps", "2", "--output-dir", str(tmp_path / "run")]
    code, stdout, stderr = run_to_the_end([*TORCHRUN, str(script), str(ROOT), *argv], work_done="error: ",
                                          env=ONE_THREAD, timeout=120)  # fmt: skip
    assert code != 0 and "adapter in" not in stdout, stdout[-2000:]
    sentences = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(sentences) == 1 and sentences[0].startswith("error: rank 0: rank 1 stopped answering"), stderr[-3000:]
    assert "Traceback" not in stderr.split("failed (exitcode")[0]  # what follows is torchrun's own report


def test_a_run_that_outlives_its_work_fails_and_its_whole_process_group_ends(tmp_path):
    """The guard of the torchrun tests: a command that lingers after its work fails the test, and its
    children (torchrun's workers) end with it, rather than living on, reparented to init."""
    pid_file = tmp_path / "child.pid"
    lingering = ["bash", "-c", f"sleep 300 & echo $! > {pid_file}; echo work done; wait"]
    with pytest.raises(AssertionError, match="still running 1 s later"):
        run_to_the_end(lingering, work_done="work done", linger_s=1)
    child = int(pid_file.read_text())
    deadline = time.time() + 5
    while Path(f"/proc/{child}").exists() and time.time() < deadline:
        time.sleep(0.05)  # killed, then reaped by init
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


WRAPPERS_AT_TEARDOWN = """
import gc, os, sys
sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import train

destroy = dist.destroy_process_group
def counting_wrappers():
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"rank {dist.get_rank()}: {alive} DDP wrapper(s) alive when the process group is destroyed", flush=True)
    destroy()
dist.destroy_process_group = counting_wrappers

if os.environ.get("FAIL_AT_STEP"):  # an error inside the step: its frames hold the wrapper as they unwind
    train_step, calls = train.train_step, []
    def failing_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(os.environ["FAIL_AT_STEP"]):
            raise KeyboardInterrupt("stopped inside the step")
        return train_step(*args, **kwargs)
    train.train_step = failing_step
raise SystemExit(train.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("fail_at_step", [None, 2], ids=["ends", "fails"])
def test_torchrun_runs_end_with_their_work_and_no_ddp_wrapper_outlives_the_process_group(tmp_path, fail_at_step):
    """A DDP wrapper freed after destroy_process_group frees the group in its Reducer's destructor, holding
    the GIL while it joins gloo's workers: at random, a run that never ends. So the wrapper must be gone
    before (counted at destroy_process_group, on a clean end and on an error), and each run must exit
    within seconds of its work."""
    script = tmp_path / "count_wrappers.py"
    script.write_text(WRAPPERS_AT_TEARDOWN)
    env = dict(ONE_THREAD)
    if fail_at_step:
        env["FAIL_AT_STEP"] = str(fail_at_step)
    argv = [*FAST, "--batch-size", "8", "--max-steps", "3", "--output-dir", str(tmp_path / "run")]
    work_done = "interrupted: stopped inside the step" if fail_at_step else WORK_DONE
    code, stdout, stderr = run_to_the_end([*TORCHRUN, str(script), str(ROOT), *argv], work_done=work_done, env=env)
    assert code == (1 if fail_at_step else 0), stderr[-3000:]
    counts = sorted(line for line in stdout.splitlines() if "when the process group is destroyed" in line)
    assert counts == [f"rank {r}: 0 DDP wrapper(s) alive when the process group is destroyed" for r in (0, 1)]


def test_bf16_autocast_on_the_cpu_trains_with_fp32_adapter(tmp_path, monkeypatch):
    monkeypatch.setattr(support.fast_modules, "cpu_has_bf16_matmul", lambda: False)  # as on this project's AVX2 CPUs
    with pytest.warns(UserWarning, match="this CPU has no bf16 matrix instructions"):
        summary = train.train(
            train.parse_args(FAST + ["--max-steps", "1", "--precision", "bf16", "--output-dir", str(tmp_path)])
        )
    assert summary["skipped_steps"] == 0 and summary["final_train_loss"] < 20
    tensors = adapter_tensors(tmp_path)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    assert any(torch.count_nonzero(t) for k, t in tensors.items() if "lora_B" in k)


def test_a_bf16_base_trains_and_its_adapter_answers_alike_on_an_fp32_base(tmp_path):
    """--base-dtype bf16: the loss halves as in fp32, the adapter is saved in fp32, and on an fp32 base
    (merged, as infer.py answers) it predicts the bf16 run's own next token at 95% of the answer positions
    of 40 test rows (teacher-forced: greedy answers of a 40-step model ramble, and a ramble's later tokens
    flip on rounding)."""
    from data import TEST_FILE, encode_examples, load_examples
    from lora import load_adapter, merge_lora, set_base_dtype
    from support.models import load_model_and_tokenizer

    argv = FAST + ["--max-steps", "40", "--batch-size", "32", "--base-dtype", "bf16", "--output-dir", str(tmp_path)]
    summary = train.train(train.parse_args(argv))
    assert summary["skipped_steps"] == 0 and summary["final_train_loss"] < summary["first_train_loss"] / 2
    tensors = adapter_tensors(tmp_path)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())

    bf16_run, tokenizer, _ = load_model_and_tokenizer("tiny")  # the model as the run trained it: bf16 base,
    load_adapter(bf16_run, tmp_path)  # fp32 adapter, unmerged
    set_base_dtype(bf16_run, torch.bfloat16)
    fp32, _, _ = load_model_and_tokenizer("tiny")
    load_adapter(fp32, tmp_path)
    merge_lora(fp32)
    rows, _ = encode_examples(load_examples(TEST_FILE)[:40], tokenizer)
    batch = collate(rows, tokenizer.pad_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "decoder_input_ids")}
    with torch.no_grad():
        predicted = [model.eval()(**inputs).logits.argmax(-1) for model in (bf16_run, fp32)]
    answer = batch["labels"] != -100
    agree = (predicted[0] == predicted[1])[answer].float().mean().item()
    assert agree >= 0.95, f"{agree:.1%} of the answer tokens agree"
    right = (predicted[1] == batch["labels"])[answer].float().mean().item()
    assert right > 0.3, f"the adapter predicts only {right:.1%} of the answer tokens"  # it did learn something
