"""Your own data: the row formats read in full, runs on small data that say what they are, answers of other
domains shown as the model writes them, the warnings a careful user wants, and exit statuses that follow the
README's rule (2: refused before any work; 1: failed while working)."""

import contextlib
import json
import re
import shutil
from pathlib import Path

import pytest

import infer
import train
from banking.assistant import Generation, answer
from banking.grounding import (
    CUT_OFF,
    DEFAULT_ACCOUNTS,
    REPEATING,
    UNAVAILABLE,
    AccountStore,
    ground,
    grounding_for,
    off_topic_advice,
)
from data import TRAIN_FILE, DataError, build_prompt, encode_examples, load_examples, training_splits
from data.dataset import leaking_validation, unreadable_rows

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "docs" / "examples"


class RecordingTokenizer:
    """What encode_examples hands the tokenizer: the prompts and the targets, as text."""

    def __init__(self):
        self.texts = []

    def __call__(self, texts):
        self.texts.append(list(texts))
        return type("Encoded", (), {"input_ids": [[5, 1] for _ in texts]})()


# --- formats ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, context_field", [("alpaca.jsonl", "input"), ("dolly.jsonl", "context")])
def test_alpaca_and_dolly_rows_put_their_context_in_the_prompt_the_model_sees(name, context_field):
    raw = [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()]
    dolly_labels = pytest.warns(UserWarning, match="'category' \\(3 rows\\) are not read")
    with dolly_labels if name == "dolly.jsonl" else contextlib.nullcontext():
        rows = load_examples(EXAMPLES / name)
    tokenizer = RecordingTokenizer()
    encode_examples(rows, tokenizer)
    prompts, targets = tokenizer.texts
    for row, prompt, target in zip(raw, prompts, targets):
        assert prompt == build_prompt(row["instruction"], row[context_field])
        if row[context_field]:  # Alpaca's rows without an input carry "input": ""
            assert prompt.endswith(f" Context: {row[context_field]}")
        assert target == row.get("output", row.get("response"))


def test_the_prompt_format_with_and_without_context():
    assert build_prompt(" When do you open? ") == "Instruction: When do you open?"
    assert build_prompt("When?", " Open 11 AM. ") == "Instruction: When? Context: Open 11 AM."
    assert build_prompt("When?", "  ") == "Instruction: When?"


@pytest.mark.parametrize(
    "row, message",
    [
        ({"instruction": "a", "answer": "b"}, "'response' is missing (nor is 'output'); 'answer' found: rename it"),
        ({"question": "a", "response": "b"}, "'instruction' is missing; 'question' found: rename it to 'instruction'"),
        ({"instruction": "a", "response": "b", "output": "c"}, "'response' and 'output' both give the answer"),
        ({"instruction": "a", "input": "x", "context": "y", "output": "c"}, "'context' and 'input' both give"),
        ({"instruction": "a", "input": 3, "output": "c"}, "'input' must be a string, got int"),
    ],
)
def test_a_near_miss_is_refused_with_the_fix(tmp_path, row, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(f"{path}, line 1: ") + ".*" + re.escape(message)):
        load_examples(path)


def test_a_field_no_format_reads_is_named_not_dropped_in_silence(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"instruction": "a", "response": "b", "source": "faq", "id": i} for i in range(3)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.warns(UserWarning, match=r"field\(s\) 'id' \(3 rows\), 'source' \(3 rows\) are not read"):
        load_examples(path)


# --- small data -------------------------------------------------------------------------------------------


def test_the_readme_path_on_a_30_row_faq_trains_and_shows_its_answers(tmp_path, capsys):
    """docs/your-data.md as written (its output directory under tmp_path): the 30-row pizza FAQ trains,
    records that it is no banking adapter, and its answers are shown, not withheld."""
    doc = (ROOT / "docs" / "your-data.md").read_text()
    commands = re.findall(r"^python (train\.py|infer\.py) (.*)$", doc, re.MULTILINE)
    assert [script for script, _ in commands[:2]] == ["train.py", "infer.py"]
    readme = (ROOT / "README.md").read_text()
    assert all(f"python {script} {arguments}" in readme for script, arguments in commands[:2])  # the same path
    out = tmp_path / "runs" / "pizza"
    for script, arguments in commands[:2]:
        argv = [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', arguments)]
        argv = [str(out) if a == "runs/pizza" else str(ROOT / a) if a.startswith("docs/") else a for a in argv]
        module = train if script == "train.py" else infer
        assert module.main(argv) == 0, capsys.readouterr().err
    stdout = capsys.readouterr().out
    assert "note:" not in stdout  # enough steps for the note to stay silent
    assert json.loads((out / "training_config.json").read_text())["grounding"] == "none"
    answer_line = stdout.strip().splitlines()[-1]
    assert answer_line and answer_line != UNAVAILABLE and "I'm sorry, I can't give you that figure" not in answer_line


def test_a_run_too_short_to_learn_says_so_before_it_starts_and_its_summary_is_honest(tmp_path, capsys):
    """30 rows at the tiny model's defaults: 8 steps. A note before training says so and how many epochs
    would do; the summary of a run shorter than --log-every reports its one logged mean, not 'X -> X'."""
    argv = ["--model", "tiny", "--data", str(EXAMPLES / "pizza_faq.jsonl"), "--output-dir", str(tmp_path / "run")]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    note = next(line for line in out.splitlines() if line.startswith("note: 27 training rows"))
    assert "8 in all: too few to learn much" in note and "pass --epochs 100 (200 steps)" in note
    summary = out.strip().splitlines()[-1]
    assert re.search(r"train loss \d+\.\d{4} \(the mean of its one logged interval\)", summary), summary
    assert not re.search(r"train loss (\S+) -> \1", summary)


# --- grounding ----------------------------------------------------------------------------------------------


class FakeAssistant:
    """An assistant whose model answers with `outputs` and grounds as `grounding` says."""

    def __init__(self, outputs, grounding):
        self.outputs, self.grounding, self.names = outputs, grounding, ["fine_tuned"]
        self.device = __import__("torch").device("cpu")

    def grounded(self, name):
        return self.grounding

    def generate_with_ends(self, queries, max_new_tokens, **options):
        return self.outputs


@pytest.mark.parametrize("grounding", [True, False])
def test_an_answer_of_another_domain_is_shown_and_an_invented_balance_is_still_withheld(grounding):
    store = AccountStore.load(DEFAULT_ACCOUNTS)
    outputs = [("We are open every day from 11 AM to 11 PM.", True), ("Your checking balance is $7,250.00.", True)]
    queries = ["Are you open late on Friday?", "What is my checking balance?"]
    results = answer(FakeAssistant(outputs, grounding), store, queries, Generation())
    pizza, balance = results
    if grounding:  # the banking adapter: neither number is the store's or the user's
        assert pizza["response"] == UNAVAILABLE and balance["response"] == UNAVAILABLE
        assert "'7,250.00' is in neither the query nor the store" in balance["withheld_because"][0]
    else:  # an adapter of another domain: its text, as the model wrote it
        assert pizza["response"] == "We are open every day from 11 AM to 11 PM." and "withheld_because" not in pizza
    assert {r["grounding"] for r in results} == {"banking" if grounding else "none"}


def test_train_records_the_grounding_its_data_needs_and_infer_follows_it(tmp_path, trained_run):
    assert grounding_for(row["response"] for row in load_examples(TRAIN_FILE)) == "banking"
    assert grounding_for(row["response"] for row in load_examples(EXAMPLES / "pizza_faq.jsonl")) == "none"
    assert json.loads((trained_run / "training_config.json").read_text())["grounding"] == "banking"
    pizza = tmp_path / "pizza"
    shutil.copytree(trained_run, pizza, ignore=shutil.ignore_patterns("checkpoints", "best"))
    config = json.loads((pizza / "training_config.json").read_text())
    (pizza / "training_config.json").write_text(json.dumps({**config, "grounding": "none"}))
    assert infer.Assistant(pizza).grounding == {"fine_tuned": False}
    assert infer.Assistant(pizza, grounding="banking").grounding == {"fine_tuned": True}
    assert infer.Assistant(trained_run).grounding == {"fine_tuned": True}


def test_an_answer_that_ran_to_the_limit_repeating_itself_is_not_called_cut_off():
    store = AccountStore.load(DEFAULT_ACCOUNTS)
    assert ground("We We We We We We We We", "Do you deliver?", store, complete=False).response == REPEATING
    assert ground("Please call us at the number on the back of", "hi", store, complete=False).response == CUT_OFF


# The refusal advice for questions the bundled data never saw, by topic.
OFF_TOPIC = [
    ("How do I bake sourdough bread?", "cooking"),
    ("What's a good marinade for chicken?", "cooking"),
    ("Who won the football game last night?", "sports"),
    ("When is the next tennis tournament?", "sports"),
    ("What should I take for a migraine?", "medical"),
    ("Is it bad to sleep only five hours?", "medical"),
    ("Can my landlord keep my deposit?", "legal"),
    ("Do I need a lawyer to write my will?", "legal"),
    ("How do I fix a segfault in my program?", "coding"),
    ("What does this Python function return?", "coding"),
    ("What is the tallest mountain on earth?", "general knowledge"),
    ("Recommend a book for the weekend.", "general knowledge"),
]


@pytest.mark.parametrize("question, topic", OFF_TOPIC)
def test_an_off_topic_refusal_advises_for_the_questions_topic(question, topic):
    store = AccountStore.load(DEFAULT_ACCOUNTS)
    refusal = "I'm sorry, I can only help with banking questions, such as cards, accounts, transfers and loans."
    learned = f"{refusal} For medical questions, please ask a doctor or pharmacist."  # whatever the model wrote
    shown = ground(learned, question, store).response
    assert shown.startswith(refusal) and shown.endswith(off_topic_advice(question))
    assert off_topic_advice(question).startswith(f"For {topic} questions, ")


def test_the_advice_matches_the_bundled_datas_own_for_its_off_topic_questions():
    rows = [row for row in load_examples(TRAIN_FILE) if row.get("intent") == "out_of_domain"]
    agree = [off_topic_advice(row["instruction"]) in row["response"] for row in rows]
    assert sum(agree) >= 0.97 * len(rows)  # the misses are the data's deliberate typos ("yPthon")


# --- warnings -----------------------------------------------------------------------------------------------


def test_validation_rows_that_are_training_rows_are_named(tmp_path):
    data = EXAMPLES / "pizza_faq.jsonl"
    rows = load_examples(data)
    copy = tmp_path / "copy.jsonl"
    shutil.copy(data, copy)
    assert leaking_validation(data, str(data), rows, rows) == f"--val-data {data} is the training data itself"
    assert "byte-identical copy" in leaking_validation(data, str(copy), rows, load_examples(copy))
    some = tmp_path / "some.jsonl"
    some.write_text("".join(data.read_text().splitlines(keepends=True)[:10]))  # 10 training rows, 2 new ones
    some.write_text(some.read_text() + json.dumps({"instruction": "New?", "response": "Yes."}) + "\n")
    assert leaking_validation(data, str(some), rows, load_examples(some)) == (
        f"10 of the 11 rows of --val-data {some} are training rows too"
    )
    assert leaking_validation(data, "auto", *training_splits(data, "auto", 42)[:2]) is None


def test_a_leaking_validation_file_is_a_one_line_warning_of_the_command(tmp_path, capsys):
    data = str(EXAMPLES / "pizza_faq.jsonl")
    argv = ["--model", "tiny", "--data", data, "--val-data", data, "--max-steps", "1", "--output-dir", str(tmp_path)]
    assert train.main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: --val-data {data} is the training data itself: the validation loss and best/" in err


def test_rows_the_tokenizer_cannot_read_are_named_by_line(tmp_path, tiny_model_path):
    from transformers import AutoTokenizer

    path = tmp_path / "rows.jsonl"
    rows = [
        {"instruction": f"question {i}", "response": "ᚠᚢᚦᚨᚱᚲ ᚷᚹᚺᚾ ᛁᛃᛇᛈ" if i % 4 == 1 else f"answer {i}"}
        for i in range(16)
    ]  # a quarter in runes: <unk> to T5, though the file's share of <unk> tokens stays low
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    loaded = load_examples(path)
    encoded, _ = encode_examples(loaded, AutoTokenizer.from_pretrained(tiny_model_path))
    assert unreadable_rows(loaded, encoded, AutoTokenizer.from_pretrained(tiny_model_path).unk_token_id) == [
        "line 2",
        "line 6",
        "line 10",
        "line 14",
    ]
    argv = ["--model", "tiny", "--data", str(path), "--val-data", "none", "--max-steps", "1"]
    with pytest.warns(UserWarning, match=r"4 of 16 training rows \(25%\) .*: line 2, line 6, line 10 and 1 more of"):
        train.train(train.parse_args([*argv, "--output-dir", str(tmp_path / "run")]))


# --- exit statuses ------------------------------------------------------------------------------------------

# (script, arguments, status, words of the sentence): 2 for what is refused before any work, 1 for a failure
# met while working.
EXIT_STATUSES = [
    ("train", ["--lr", "0"], 2, "--lr must be positive"),
    ("train", ["--data", "{missing}"], 2, "does not exist"),
    ("train", ["--data", "{answer_field}"], 2, "'answer' found: rename it to 'response'"),
    ("train", ["--model", "{missing}"], 2, "does not exist"),
    ("train", ["--target-modules", "wi"], 2, "match no nn.Linear"),
    ("infer", ["--adapter", "{missing}", "hi"], 2, "does not exist"),
    ("infer", ["--adapter", "{pizza}", "--context", "x"], 2, "--context goes with a query"),
    ("infer", ["--adapter", "{pizza}", "--accounts", "{missing}", "hi"], 2, "accounts file"),
    ("infer", ["--adapter", "{pizza}", "--model", "{missing}", "hi"], 2, "does not exist"),
    ("infer", ["--adapter", "{other_size}", "hi"], 1, "has shape"),
]


@pytest.mark.parametrize("script, arguments, status, words", EXIT_STATUSES)
def test_exit_statuses_follow_the_readme(tmp_path, capsys, trained_run, script, arguments, status, words):
    from conftest import saved_random_adapter

    (tmp_path / "answer.jsonl").write_text(json.dumps({"instruction": "a", "answer": "b"}) + "\n")
    saved_random_adapter(tmp_path / "other_size")
    config = json.loads((tmp_path / "other_size" / "adapter_config.json").read_text())
    (tmp_path / "other_size" / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "tiny"})
    )
    places = {"missing": tmp_path / "missing", "answer_field": tmp_path / "answer.jsonl", "pizza": trained_run,
              "other_size": tmp_path / "other_size"}  # fmt: skip
    argv = [a.format(**places) for a in arguments]
    if script == "train":
        argv = ["--model", "tiny", "--max-steps", "1", "--output-dir", str(tmp_path / "run"), *argv]
    code = (train if script == "train" else infer).main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]  # warnings may come first
    assert code == status and len(errors) == 1 and words in errors[0] and "Traceback" not in err, err
