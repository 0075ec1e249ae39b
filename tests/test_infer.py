"""infer.py: the assistant and its command line, run in this process (main() returns the exit status)."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter, toy_t5

import banking.assistant
import infer
from banking.assistant import Generation
from banking.grounding import CUT_OFF, DEFAULT_ACCOUNTS, UNAVAILABLE, AccountStore
from data import TEST_FILE, load_examples
from lora import inject_lora, save_adapter
from support.models import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def run_infer(capsys, *args):
    code = infer.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def random_adapter(tmp_path_factory, tiny_model_path):
    """An adapter on the tiny model whose B is random, so that merging changes every adapted weight."""
    model, _, path = load_model_and_tokenizer("tiny")
    inject_lora(model, ("q", "v"), r=4, alpha=8, dropout=0.0)
    randomize_adapter(model, scale=0.5)
    directory = tmp_path_factory.mktemp("random") / "adapter"
    save_adapter(model, directory, base_model_name_or_path=path)
    return directory


# --- refused before the model loads -----------------------------------------------------------------------


def test_empty_query_is_refused_without_generating(tmp_path, capsys):
    code, _, err = run_infer(capsys, "--adapter", tmp_path / "missing", "   ")
    assert code == 2 and "the query is empty" in err and "Traceback" not in err


def test_an_answer_length_past_any_answer_is_refused_before_the_model_loads(tmp_path, capsys):
    code, _, err = run_infer(capsys, "--adapter", tmp_path / "missing", "--max-new-tokens", "100000", "Hi")
    assert code == 2 and "--max-new-tokens must be at most 1024, got 100000" in err


@pytest.mark.parametrize(
    "content, message", [(b"\n  \n", "holds no non-empty line"), (b"caf\xe9?\n", "is not UTF-8 text")]
)
def test_unusable_query_file_is_refused_before_the_model_loads(tmp_path, capsys, content, message):
    queries = tmp_path / "queries.txt"
    queries.write_bytes(content)
    code, _, err = run_infer(capsys, "--adapter", tmp_path / "missing", "--file", queries)  # no adapter needed
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_or_incomplete_adapter_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        banking.assistant, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded first")
    )
    code, _, err = run_infer(capsys, "--adapter", tmp_path / "missing", "hi")
    assert code == 2 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "half").mkdir()
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q", "v"],
        "base_model_name_or_path": "tiny",
    }
    (tmp_path / "half" / "adapter_config.json").write_text(json.dumps(config))
    code, _, err = run_infer(capsys, "--adapter", tmp_path / "half", "hi")
    assert code == 2 and "adapter_model.safetensors is missing" in err


def test_adapter_of_another_base_model_is_refused(tmp_path, capsys):
    other = toy_t5()  # d_model 32, not the tiny model's 128
    inject_lora(other, r=4, alpha=8)
    save_adapter(other, tmp_path / "other", base_model_name_or_path="tiny")
    code, _, err = run_infer(capsys, "--adapter", tmp_path / "other", "hi")
    assert code == 1 and "shape" in err and "Traceback" not in err


# --- answers ----------------------------------------------------------------------------------------------


def test_answers_never_show_an_invented_figure():
    store = AccountStore.load(DEFAULT_ACCOUNTS)

    class FakeAssistant:
        device = torch.device("cpu")
        names = ["fine_tuned"]

        def grounded(self, name):
            return True

        def generate_with_ends(self, queries, max_new_tokens, **options):
            return [
                ("I can help you send $250 to Mom.", True),
                ("I can help you send $500 to Mom.", True),
                ("Your balance is [SAVINGS_BALANCE].", True),
                ("I'm sorry to hear that. Please call us at [SU", False),
            ]

    queries = ["Transfer 500 to Mom"] * 2 + ["savings balance?", "I lost my card"]
    results = infer.answer(FakeAssistant(), store, queries, Generation())
    assert results[0]["response"] == UNAVAILABLE and results[0]["raw_response"].startswith("I can help")
    assert "250" in results[0]["withheld_because"][0]
    assert results[1]["response"] == "I can help you send $500 to Mom." and "withheld_because" not in results[1]
    assert results[2]["response"] == "Your balance is $10,450.55."
    assert results[3]["response"] == CUT_OFF and "cut off" in results[3]["withheld_because"][0]
    assert {r["batch_size"] for r in results} == {4} and len({r["latency_s"] for r in results}) == 1


def test_answers_single_json_file_and_interactive(trained_run, tmp_path, capsys, monkeypatch):
    code, out, err = run_infer(capsys, "--adapter", trained_run, "--json", "What is my savings balance?")
    assert code == 0, err
    answer = json.loads(out)
    assert {"query", "response", "raw_response", "latency_s", "batch_size"} <= answer.keys()
    assert "[" not in answer["response"] and answer["batch_size"] == 1

    queries = tmp_path / "queries.txt"
    queries.write_text("I lost my card\n\nHello\nWhat is my checking balance?\n")
    code, out, err = run_infer(capsys, "--adapter", trained_run, "--file", queries, "--json", "--batch-size", "2")
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["query"] for a in answers] == ["I lost my card", "Hello", "What is my checking balance?"]
    assert [a["batch_size"] for a in answers] == [2, 2, 1]

    monkeypatch.setattr("sys.stdin", io.StringIO("I lost my card\n\nquit\nnever read\n"))
    code, out, err = run_infer(capsys, "--adapter", trained_run, "--model", "tiny")
    assert code == 0 and len(out.strip().splitlines()) == 1
    assert "warning" not in err  # --model tiny is the base the adapter records, as a path


def test_an_adapter_without_its_run_says_it_does_not_know_the_prompt_length(random_adapter, capsys):
    code, out, err = run_infer(capsys, "--adapter", random_adapter, "Hello")
    assert code == 0 and "does not record the prompt length it was trained with" in err


def test_prompts_are_cut_at_the_length_the_run_trained_with(trained_run):
    assistant = infer.Assistant(trained_run)
    assert assistant.max_source_len == json.loads((trained_run / "training_config.json").read_text())["max_source_len"]
    assert infer.Assistant(trained_run / "best").max_source_len == assistant.max_source_len
    # Answers may be as long as the longest the run trained on: none is cut off by default.
    longest = json.loads((trained_run / "training_config.json").read_text())["longest_target_tokens"]
    assert assistant.max_new_tokens == longest > 64


def test_merged_answers_equal_unmerged(trained_run):
    queries = [row["instruction"] for row in load_examples(TEST_FILE)[::20]]
    merged = infer.Assistant(trained_run).generate(queries)
    unmerged = infer.Assistant(trained_run, merge=False)
    assert merged == unmerged.generate(queries) and all(merged)
    assert merged != unmerged.generate(queries, base=True)  # the adapter does something


def test_fine_tuned_beats_base_on_held_out_templates(trained_run, tmp_path, capsys):
    rows = (TEST_FILE.read_text().splitlines())[::4]  # every intent, a quarter of the rows
    (tmp_path / "test.jsonl").write_text("\n".join(rows) + "\n")
    code, out, err = run_infer(
        capsys, "--adapter", trained_run, "--eval", "--eval-data", tmp_path / "test.jsonl", "--report-dir", tmp_path
    )
    assert code == 0, err
    assert out.startswith("| metric | base | fine_tuned |") and str(tmp_path / "eval_report.md") in out
    report = json.loads((tmp_path / "eval_report.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    assert tuned["token_f1"] > base["token_f1"]
    assert report["test_rows"] == len(rows) and report["intent_reference"].endswith("banking_train.jsonl")
    markdown = (tmp_path / "eval_report.md").read_text()
    assert "| exact_match |" in markdown and "| query | base answer | fine-tuned answer | reference |" in markdown


# --- several adapters on one base -------------------------------------------------------------------------


def test_a_mixed_query_file_answers_each_row_as_its_adapter_alone(trained_run, random_adapter, tmp_path, capsys):
    queries = ["I lost my card", "What is my savings balance?", "Hello", "When is the branch open?"]
    asked = ["retail", "business", "base", "retail", "business", "retail"]
    rows = [{"query": queries[i % len(queries)], "adapter": name} for i, name in enumerate(asked)]
    file = tmp_path / "queries.jsonl"
    file.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    adapters = ["--adapter", f"retail={trained_run}", "--adapter", f"business={random_adapter}"]
    options = ["--max-new-tokens", "24"]  # a 40-step adapter rambles; later tokens of a ramble flip on rounding
    code, out, err = run_infer(capsys, *adapters, "--file", file, "--json", "--batch-size", "6", *options)
    assert code == 0, err
    answers = [json.loads(line) for line in out.splitlines()]
    assert [a["adapter"] for a in answers] == asked and {a["batch_size"] for a in answers} == {6}
    alone = {
        "retail": infer.Assistant(trained_run),  # merged, as a single adapter is served
        "business": infer.Assistant(random_adapter),
        "base": infer.Assistant(trained_run, merge=False),  # base=True: the adapter disabled, W0 exactly
    }
    for row, got in zip(rows, answers):
        base = row["adapter"] == "base"
        expected = alone[row["adapter"]].generate([row["query"]], max_new_tokens=24, base=base)
        assert got["raw_response"] == expected[0], row
    assert len({a["raw_response"] for a in answers if a["query"] == queries[0]}) == 2  # the adapters differ


def test_several_adapters_one_shot_interactive_and_eval(trained_run, random_adapter, tmp_path, capsys, monkeypatch):
    adapters = ["--adapter", f"retail={trained_run}", "--adapter", f"business={random_adapter}"]
    code, out, err = run_infer(capsys, *adapters, "--use", "retail", "--json", "I lost my card")
    assert code == 0, err
    one_shot = json.loads(out)
    assert one_shot["adapter"] == "retail"
    assert one_shot["raw_response"] == infer.Assistant(trained_run).generate(["I lost my card"])[0]

    monkeypatch.setattr("sys.stdin", io.StringIO("I lost my card\n/use business\nI lost my card\n/use nope\nquit\n"))
    code, out, err = run_infer(capsys, *adapters, "--json")
    answers = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [a["adapter"] for a in answers] == ["retail", "business"]
    assert answers[0]["raw_response"] == one_shot["raw_response"] != answers[1]["raw_response"]
    assert "no adapter named 'nope'" in err

    single_report = tmp_path / "eval_report.json"  # one adapter's report, which the pair's must leave alone
    single_report.write_text(json.dumps({"adapter": str(trained_run)}))
    code, out, err = run_infer(capsys, *adapters, "--eval", "--eval-limit", "6", "--report-dir", tmp_path)
    assert code == 0, err
    assert out.startswith("| metric | base | retail | business |")
    assert json.loads(single_report.read_text()) == {"adapter": str(trained_run)}
    report = json.loads((tmp_path / "eval_report.retail+business.json").read_text())
    assert list(report["metrics"]) == ["base", "retail", "business"]
    assert report["adapter"] == {"retail": str(trained_run), "business": str(random_adapter)}
    markdown = (tmp_path / "eval_report.retail+business.md").read_text()
    assert "| query | base answer | retail answer | business answer | reference |" in markdown

    before = single_report.read_text()  # another adapter's evaluation is refused before any work, naming it
    code, out, err = run_infer(capsys, "--adapter", random_adapter, "--eval", "--report-dir", tmp_path)
    assert code == 2 and f"{single_report} holds the report of another evaluation (of {trained_run})" in err
    assert single_report.read_text() == before


def test_several_adapters_are_refused_clearly(trained_run, random_adapter, tmp_path, capsys, monkeypatch):
    retail, business = f"retail={trained_run}", f"business={random_adapter}"
    file = tmp_path / "queries.jsonl"
    file.write_text('{"query": "Hi", "adapter": "retail"}\n{"query": "Hi", "adapter": "wholesale"}\n')
    monkeypatch.setattr(
        banking.assistant, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded first")
    )
    cases = [
        (["--adapter", retail, "--adapter", business, "--file", file], "line 2 of", "asks for adapter 'wholesale'"),
        (["--adapter", retail, "--adapter", f"retail={random_adapter}", "Hi"], "two --adapter options are named"),
        (["--adapter", retail, "--adapter", str(random_adapter), "Hi"], "name each one"),
        (["--adapter", retail, "--adapter", f"base={random_adapter}", "Hi"], "'base' is reserved"),
        (["--adapter", retail, "--use", "business", "Hi"], "--use business: no adapter has that name"),
    ]
    for args, *messages in cases:
        code, _, err = run_infer(capsys, *args)
        assert code == 2 and all(m in err for m in messages) and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1


def test_an_adapter_for_another_base_size_is_refused(trained_run, tmp_path, capsys):
    recorded = json.loads((trained_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    other = toy_t5(d_model=48, d_kv=12)  # names the same base model, but its shapes differ
    inject_lora(other, r=4, alpha=8)
    save_adapter(other, tmp_path / "other", base_model_name_or_path=recorded)
    code, _, err = run_infer(capsys, "--adapter", f"retail={trained_run}", "--adapter", f"big={tmp_path}/other", "Hi")
    error = err.strip().splitlines()[-1]
    assert code == 1 and error.startswith("error: ") and "has shape" in error and "another model size" in error
    assert "Traceback" not in err


def test_an_unwritable_report_place_is_refused_before_the_evaluation(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(infer, "write_report", lambda *a, **k: pytest.fail("the evaluation ran"))
    (tmp_path / "a_file").write_text("")
    code, _, err = run_infer(capsys, "--adapter", trained_run, "--eval", "--report-dir", tmp_path / "a_file" / "eval")
    assert code == 2 and f"cannot write the evaluation report in {tmp_path / 'a_file' / 'eval'}" in err


def test_the_prompt_s_commands_are_never_sent_to_the_model(trained_run, capsys, monkeypatch):
    asked = []
    monkeypatch.setattr(infer, "answer", lambda assistant, store, queries, *a: asked.extend(queries) or [])
    monkeypatch.setattr("sys.stdin", io.StringIO("/usefoo\n/use nope\n/help\nI lost my card\n/quit\nnever read\n"))
    code, _, err = run_infer(capsys, "--adapter", trained_run)
    assert code == 0 and asked == ["I lost my card"]
    assert "unknown command /usefoo" in err and "no adapter named 'nope'" in err and "unknown command /help" in err


@pytest.mark.parametrize("link", ["eval", "eval/eval_report.json"])
def test_the_report_is_never_written_through_a_link_it_was_not_given(trained_run, tmp_path, capsys, link):
    """The adapter's eval/ (or the report in it) linked to another directory: --eval refuses before it
    evaluates, and the file at the other end stays as it was."""
    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run, adapter, ignore=shutil.ignore_patterns("eval"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "eval_report.json").write_text('{"adapter": "someone else\'s"}\n')
    if link != "eval":
        (adapter / "eval").mkdir()
    target = elsewhere if link == "eval" else elsewhere / "eval_report.json"
    (adapter / link).symlink_to(target, target_is_directory=target.is_dir())
    code, _, err = run_infer(capsys, "--adapter", adapter, "--eval", "--eval-limit", "2")
    assert code == 2 and f"{adapter / link} is a symbolic link (to {target})" in err and err.count("\n") == 1
    assert (elsewhere / "eval_report.json").read_text() == '{"adapter": "someone else\'s"}\n'
    assert sorted(p.name for p in elsewhere.iterdir()) == ["eval_report.json"]


def test_a_reader_that_goes_away_ends_infer_quietly(trained_run, tmp_path):
    """`infer.py --json ... | head -1`: the reader closes the pipe; the answers go nowhere, and the command
    ends as cat does (status 141), without a BrokenPipeError traceback."""
    queries = tmp_path / "queries.txt"
    queries.write_text("What is my checking balance?\nI lost my card\n")
    command = [sys.executable, str(ROOT / "infer.py"), "--adapter", str(trained_run), "--json", "--file", str(queries)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()  # gone before the first answer
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 141 and "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]


def test_sigterm_stops_infer_with_a_word_and_status_130(trained_run, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "infer.py"), "--adapter", str(trained_run)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err = ""
    while "Banking assistant ready" not in err and process.poll() is None:
        err += process.stderr.read(1)
    process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout=60)
    finally:
        process.kill()
    err += process.stderr.read()
    assert code == 130 and "interrupted: SIGTERM" in err and "Traceback" not in err


def test_base_dtype_means_what_it_means_in_training(trained_run, capsys):
    """infer.py's --base-dtype takes train.py's storage dtypes; a dense one and a different --precision are
    refused before the model loads, as is a choice only the other script has."""
    code, _, err = run_infer(capsys, "--adapter", trained_run, "--base-dtype", "fp32", "--precision", "bf16", "Hi")
    assert code == 2 and err.startswith("error: --base-dtype fp32 and --precision bf16 disagree")
    with pytest.raises(SystemExit) as exit_status:
        infer.parse_args(["--adapter", str(trained_run), "--base-dtype", "dense", "Hi"])
    assert exit_status.value.code == 2
    code, out, err = run_infer(capsys, "--adapter", trained_run, "--base-dtype", "fp32", "I lost my card")
    assert code == 0 and out.strip(), err
