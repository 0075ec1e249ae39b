import collections
import json
import re
import subprocess
import sys

import pytest
import torch

from data import (
    IGNORE_INDEX,
    TEST_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    DataError,
    EncodedExample,
    LengthBucketSampler,
    StepPlan,
    bucket_key,
    build_prompt,
    collate,
    encode_examples,
    load_examples,
    sequential_batches,
)
from data.generate import INTENTS

SPLIT_FILES = {"train": TRAIN_FILE, "validation": VALIDATION_FILE, "test": TEST_FILE}


@pytest.fixture(scope="module")
def splits():
    return {name: load_examples(path) for name, path in SPLIT_FILES.items()}


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path)


# --- the bundled dataset ----------------------------------------------------------------------------------


def test_size_coverage_and_balance(splits):
    rows = [row for rows in splits.values() for row in rows]
    assert len(rows) >= 1500
    assert len({row["instruction"] for row in rows}) >= 1000
    counts = collections.Counter(row["intent"] for row in rows)
    assert len(counts) >= 14
    assert max(counts.values()) == min(counts.values())
    for intent in (
        "lost_stolen_card",
        "freeze_card",
        "card_declined",
        "check_balance",
        "recent_transactions",
        "transfer_funds",
        "loan_rates",
        "loan_apply",
        "branch_hours",
        "fees",
        "account_details",
        "open_account",
        "fraud_report",
        "reset_pin_password",
        "greeting",
        "thanks_goodbye",
        "out_of_domain",
    ):
        assert counts[intent] > 0, intent


def test_generator_is_deterministic_and_matches_committed_files(tmp_path):
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run(
            [sys.executable, "-m", "data.generate", "--seed", "0", "--out-dir", str(out)],
            check=True,
            capture_output=True,
        )
    for name, path in SPLIT_FILES.items():
        first = (tmp_path / "a" / f"banking_{name}.jsonl").read_bytes()
        assert first == (tmp_path / "b" / f"banking_{name}.jsonl").read_bytes()
        assert first == path.read_bytes(), f"{path} is stale: run python -m data.generate"


def test_no_instruction_in_two_splits_and_test_templates_held_out(splits):
    seen = {}
    for name, rows in splits.items():
        for row in rows:
            assert seen.setdefault(row["instruction"].lower(), name) == name, row["instruction"]
    train_templates = {row["template"] for row in splits["train"] + splits["validation"]}
    test_templates = {row["template"] for row in splits["test"]}
    assert test_templates and not (test_templates & train_templates)
    assert {t.split("/")[0] for t in test_templates} == set(INTENTS)  # every intent is tested


def test_one_question_one_answer(splits):
    """Responses depend on the question, not on chance: identical instructions would need identical answers."""
    answers = collections.defaultdict(set)
    for row in splits["train"]:
        answers[row["instruction"].lower()].add(row["response"])
    assert all(len(a) == 1 for a in answers.values())


def test_no_invented_figures_and_safe_characters(splits):
    """Every number in a response is one the user gave; figures we know are [PLACEHOLDERS] of allowed characters."""
    for row in (row for rows in splits.values() for row in rows):
        response = row["response"]
        assert not set("{}<") & set(response + row["instruction"])
        assert response.isascii()
        for placeholder in re.findall(r"\[[^\]]*\]", response):
            assert re.fullmatch(r"\[[A-Z0-9_]+\]", placeholder), placeholder
        query_numbers = {n.replace(",", "") for n in re.findall(r"\d[\d,]*(?:\.\d+)?", row["instruction"])}
        for number in re.findall(r"\d[\d,]*(?:\.\d+)?", re.sub(r"\[[A-Z0-9_]+\]", "", response)):
            assert number.replace(",", "") in query_numbers, (row["instruction"], response)
    balance_answers = {row["response"] for row in splits["train"] if row["intent"] == "check_balance"}
    assert all("_BALANCE]" in answer for answer in balance_answers)


def test_pin_reset_never_asks_for_secrets(splits):
    for row in (row for rows in splits.values() for row in rows):
        if row["intent"] == "reset_pin_password":
            assert "We will never ask you for your PIN, password or full card number" in row["response"]
        assert not re.search(
            r"(tell|send|give|confirm|enter) (me|us)? ?your (pin|password|full card number)", row["response"], re.I
        ), row["response"]


def test_every_text_round_trips_through_the_tokenizer(splits, tiny_tokenizer):
    for row in (row for rows in splits.values() for row in rows):
        for text in (row["response"], build_prompt(row["instruction"])):
            ids = tiny_tokenizer(text).input_ids
            assert tiny_tokenizer.unk_token_id not in ids, text
            assert tiny_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_tiny_tokenizer_is_a_real_vocabulary(tiny_tokenizer):
    assert 500 <= len(tiny_tokenizer) <= 2000
    assert (tiny_tokenizer.pad_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.unk_token_id) == (0, 1, 2)
    ids = tiny_tokenizer("What is my savings balance?").input_ids
    assert ids[-1] == tiny_tokenizer.eos_token_id and len(set(ids)) > 3


def test_tiny_model_names_its_attention_like_flan_t5(tiny_model_path):
    from transformers import AutoModelForSeq2SeqLM

    model = AutoModelForSeq2SeqLM.from_pretrained(tiny_model_path)
    names = {name for name, _ in model.named_modules()}
    assert "encoder.block.0.layer.0.SelfAttention.q" in names
    assert "decoder.block.0.layer.1.EncDecAttention.v" in names


# --- loading and bad input --------------------------------------------------------------------------------


def test_loads_original_json_array_format(tmp_path):
    path = tmp_path / "seed.json"
    path.write_text(
        json.dumps(
            [
                {"instruction": "I lost my card", "response": "Call us."},
                {"instruction": "Hi", "response": "Hello!", "intent": "greeting"},
            ]
        )
    )
    rows = load_examples(path)
    assert [r["instruction"] for r in rows] == ["I lost my card", "Hi"]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "response": "b"}\n{"instruction": "a", ', r"line 2: invalid JSON"),
        ('{"instruction": "a", "response": "b"}\n[1, 2]\n', r"line 2: expected an object"),
        ('{"response": "b"}\n', r"line 1: 'instruction' is missing"),
        ('{"instruction": 3, "response": "b"}\n', r"line 1: 'instruction' must be a string, got int"),
        ('{"instruction": "a", "response": "   "}\n', r"line 1: 'response' is empty"),
        ("\n\n", r"holds no rows"),
        ('[{"instruction": "a", "response": "b"}, "oops"]', r"index 1: expected an object"),
        ('[{"instruction": "a", "response": "b"},', r"invalid JSON at line 1"),
        ("[]", r"holds no rows"),
    ],
)
def test_bad_input_names_file_and_row(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        load_examples(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


# --- prompt, encoding, collation --------------------------------------------------------------------------


def test_one_prompt_format():
    assert build_prompt("  I lost my card ") == "Instruction: I lost my card"


def test_encoding_truncates_keeping_eos(tiny_tokenizer):
    rows = [{"instruction": "word " * 50, "response": "short"}, {"instruction": "hi", "response": "hello"}]
    encoded, truncated = encode_examples(rows, tiny_tokenizer, max_source_len=8, max_target_len=8)
    assert truncated == 1
    assert len(encoded[0].input_ids) == 8 and encoded[0].input_ids[-1] == tiny_tokenizer.eos_token_id
    full, _ = encode_examples(rows[1:], tiny_tokenizer)
    assert encoded[1] == full[0]


def test_bundled_rows_fit_the_default_limits(splits, tiny_tokenizer):
    _, truncated = encode_examples(splits["train"], tiny_tokenizer)
    assert truncated == 0


def test_collate_pads_labels_with_ignore_index_exactly():
    batch = [EncodedExample([5, 6, 1], [7, 1]), EncodedExample([5, 1], [7, 8, 9, 1])]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert out["labels"].tolist() == [[7, 1, IGNORE_INDEX, IGNORE_INDEX], [7, 8, 9, 1]]
    assert out["decoder_input_ids"].tolist() == [[0, 7, 1, 0], [0, 7, 8, 9]]
    padded = collate(batch, pad_token_id=0, pad_to_multiple_of=8)
    assert padded["input_ids"].shape == (2, 8) and padded["labels"].shape == (2, 8)
    assert padded["decoder_input_ids"].shape == (2, 8)
    assert (padded["labels"][:, 4:] == IGNORE_INDEX).all() and (padded["attention_mask"][:, 3:] == 0).all()


# --- the sampler ------------------------------------------------------------------------------------------


def test_sampler_every_row_exactly_once_and_deterministic():
    lengths = [(i * 37) % 50 + 3 for i in range(203)]
    sampler = LengthBucketSampler(lengths, batch_size=8, seed=1, bucket_batches=4)
    epoch0 = sampler.all_batches(0)
    assert len(epoch0) == sampler.batches_per_epoch == 26
    assert sorted(i for batch in epoch0 for i in batch) == list(range(203))
    assert epoch0 == LengthBucketSampler(lengths, batch_size=8, seed=1, bucket_batches=4).all_batches(0)
    assert sampler.all_batches(1) != epoch0
    assert sampler.all_batches(0) == epoch0  # asked again after another epoch: the same


def test_a_plan_of_one_process_trains_every_epoch_in_order_and_ends_each_on_its_last_batch():
    """Steps of 3 batches over epochs of 7 (the last step of each takes the one left): the run's batches,
    step after step, are epoch 0's, then epoch 1's, then epoch 2's, and only the last step of each ends it."""
    sampler = LengthBucketSampler([(i * 7) % 11 for i in range(50)], batch_size=8, seed=3)
    plan = StepPlan(sampler, grad_accum=3)
    assert plan.steps_per_epoch == 3
    steps = [plan.micro_batches(step) for step in range(9)]
    assert [len(s) for s in steps] == [3, 3, 1] * 3
    assert [b for s in steps for b in s] == sampler.all_batches(0) + sampler.all_batches(1) + sampler.all_batches(2)
    assert [n for n in range(10) if plan.ends_epoch(n)] == [3, 6, 9]
    assert [plan.position(n) for n in (0, 2, 3, 4)] == [(0, 0), (0, 6), (1, 0), (1, 3)]
    assert plan.epochs_done(4) == pytest.approx(1 + 3 / 7)


@pytest.mark.parametrize("world_size", [2, 3])
def test_plan_shards_by_rank_without_loss_or_repeat(world_size):
    sampler = LengthBucketSampler([(i * 13) % 40 + 2 for i in range(101)], 8, seed=2)
    plans = [StepPlan(sampler, 1, r, world_size) for r in range(world_size)]
    steps = [[plan.micro_batches(step) for step in range(plans[0].steps_per_epoch)] for plan in plans]
    assert all([len(s) for s in steps[0]] == [len(s) for s in shard] for shard in steps)  # all step together
    assert sorted(i for shard in steps for step in shard for batch in step for i in batch) == list(range(101))


def test_a_step_covers_the_same_rows_on_any_number_of_processes():
    """Steps of one global batch (processes x grad_accum = 12 batches of 8) over 101 rows (13 batches, which
    2, 3 and 4 do not divide), for two epochs: each step reads the same rows on 1, 2, 3 and 4 processes, so a
    run resumes exactly on another number of them; the ranks short of a batch get an empty one."""
    sampler = LengthBucketSampler([(i * 13) % 40 + 2 for i in range(101)], 8, seed=2)

    def steps(world_size):
        plans = [StepPlan(sampler, 12 // world_size, r, world_size) for r in range(world_size)]
        assert plans[0].steps_per_epoch == 2
        return [sorted(i for plan in plans for batch in plan.micro_batches(step) for i in batch) for step in range(4)]

    for world_size in (2, 3, 4):
        assert steps(world_size) == steps(1), world_size


def test_validation_batches_are_as_many_on_every_rank(splits, tiny_tokenizer):
    """15 batches of the bundled validation split on 2 ranks: 8 each, rank 1's last one empty (under FSDP
    every forward is a collective, so a rank with fewer batches would leave the other waiting)."""
    encoded, _ = encode_examples(splits["validation"], tiny_tokenizer)
    shards = [sequential_batches(encoded, 10, 0, None, rank, 2) for rank in (0, 1)]
    assert [len(shard) for shard in shards] == [8, 8] and len(encoded) == 142
    assert int((shards[1][-1]["labels"] != IGNORE_INDEX).sum()) == 0 and shards[1][-1]["attention_mask"].sum() == 0
    rows = sum(batch["labels"].shape[0] for shard in shards for batch in shard[:-1]) + shards[0][-1]["labels"].shape[0]
    assert rows == 142  # every row once


def test_bucketing_cuts_padding(splits, tiny_tokenizer):
    encoded, _ = encode_examples(splits["train"], tiny_tokenizer)

    def padding_fraction(batches):
        pad = real = 0
        for batch in batches:
            out = collate([encoded[i] for i in batch], pad_token_id=0)
            real += int(out["attention_mask"].sum() + (out["labels"] != IGNORE_INDEX).sum())
            pad += out["input_ids"].numel() + out["labels"].numel()
        return 1 - real / pad

    bucketed = padding_fraction(LengthBucketSampler([bucket_key(e) for e in encoded], 8, seed=0).all_batches(0))
    order = torch.randperm(len(encoded), generator=torch.Generator().manual_seed(0)).tolist()
    random_batches = padding_fraction([order[i : i + 8] for i in range(0, len(order), 8)])
    print(f"\npadding fraction, batch 8: length-bucketed {bucketed:.1%}, random batches {random_batches:.1%}")
    assert bucketed < random_batches / 2
