import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infer
import train
from data import TEST_FILE, load_examples
from lora import save_adapter

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store():
    return infer.AccountStore.load(infer.DEFAULT_ACCOUNTS)


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory):
    """An adapter trained on the tiny model long enough to beat its randomly initialised base."""
    out = tmp_path_factory.mktemp("trained") / "adapter"
    summary = train.train(
        train.parse_args(
            [
                "--model",
                "tiny",
                "--max-steps",
                "350",
                "--val-data",
                "none",
                "--log-every",
                "25",
                "--output-dir",
                str(out),
            ]
        )
    )
    assert summary["final_train_loss"] < summary["first_train_loss"] / 2
    return out


def run_infer(*args, stdin=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "infer.py"), *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=300,
    )


# --- metrics on hand-made cases ---------------------------------------------------------------------------


def test_token_f1_and_exact_match_known_answers():
    assert infer.token_f1("the cat sat", "the cat sat") == 1.0
    # prediction "the cat" vs reference "the cat sat down": precision 1, recall 1/2 -> F1 2/3
    assert infer.token_f1("The cat!", "the cat sat down") == pytest.approx(2 / 3)
    assert infer.token_f1("dogs", "the cat") == 0.0
    assert infer.token_f1("Your balance is [SAVINGS_BALANCE].", "Your balance is [CHECKING_BALANCE].") == pytest.approx(
        0.75
    )
    assert infer.exact_match("Hello  there ", "Hello there")
    assert not infer.exact_match("Hello there.", "Hello there")


def test_intent_matcher_and_refusal():
    rows = [
        {"response": "Your savings balance is [SAVINGS_BALANCE].", "intent": "check_balance"},
        {"response": "I'm sorry, I can only help with banking questions.", "intent": "out_of_domain"},
    ]
    matcher = infer.IntentMatcher(rows)
    assert matcher("Your checking balance is [CHECKING_BALANCE].") == "check_balance"
    assert matcher("Sorry, I can only help with banking questions") == "out_of_domain"
    assert matcher("Bananas are yellow fruit") is None
    assert infer.is_refusal("I'm sorry, I can only help with banking questions, such as cards.")
    assert not infer.is_refusal("Your balance is $5.00.")


def test_score_on_a_known_case(store):
    rows = [
        {"instruction": "Transfer 500 to Mom", "response": "Sending $500 to Mom.", "intent": "transfer_funds"},
        {
            "instruction": "How do I bake bread?",
            "response": "I'm sorry, I can only help with banking questions.",
            "intent": "out_of_domain",
        },
    ]
    matcher = infer.IntentMatcher(rows)
    perfect = infer.score(rows, [r["response"] for r in rows], store, matcher)
    assert perfect["exact_match"] == perfect["intent_accuracy"] == perfect["refusal_rate_out_of_domain"] == 1.0
    assert perfect["invented_figure_rate"] == 0.0
    wrong = infer.score(rows, ["Sending $900 to Mom.", "Bake it at 200 degrees."], store, matcher)
    assert wrong["exact_match"] == 0.0 and wrong["intent_accuracy"] == 0.5
    assert wrong["refusal_rate_out_of_domain"] == 0.0 and wrong["invented_figure_rate"] == 1.0


# --- grounded figures -------------------------------------------------------------------------------------


def test_placeholders_are_filled_from_the_store(store):
    answer, problems = store.fill("Savings: [SAVINGS_BALANCE]. Call [SUPPORT_PHONE]. Car loans from [CAR_LOAN_RATE].")
    assert problems == []
    assert answer == "Savings: $10,450.55. Call 1-800-555-0199. Car loans from 6.49%."
    assert infer.money(2682) == "$2,682.00" and infer.money(-42.1) == "-$42.10"
    assert store.fill("Recent: [CHECKING_RECENT_TRANSACTIONS]")[0].startswith(
        "Recent: 2026-11-20 Green Grocer -$42.10;"
    )


@pytest.mark.parametrize(
    "raw, problem",
    [
        ("Your balance is [MORTGAGE_BALANCE].", "no value for [MORTGAGE_BALANCE]"),
        ("Your balance is [savings balance].", "malformed placeholder"),
        ("Your balance is [SAVINGS_BAL", "unbalanced bracket"),
    ],
)
def test_an_unfillable_placeholder_is_never_shown_or_invented(store, raw, problem):
    answer, problems = store.fill(raw)
    assert answer == infer.UNAVAILABLE and any(problem in p for p in problems)
    assert "[" not in answer and not infer.numbers_in(answer)


def test_a_store_without_a_figure_says_unavailable():
    empty = infer.AccountStore({"accounts": {"checking": {}}})
    assert empty.fill("It is [CHECKING_BALANCE].")[0] == infer.UNAVAILABLE


def test_invented_numbers(store):
    assert infer.invented_numbers("I will send $500.00 to Mom.", "Transfer 500 to Mom", store) == set()
    assert infer.invented_numbers("Your balance is $10,450.55.", "balance?", store) == set()
    assert infer.invented_numbers("Your balance is $1,234.00.", "balance?", store) == {1234.0}


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('{"accounts": {"checking": {"balance": "lots"}}}', "'accounts.checking.balance' must be a number"),
        ('{"accounts": {"savings": {"recent_transactions": [{"date": "x"}]}}}', "recent_transactions[0]"),
        ('{"bank": {"fees": {"wire": null}}}', "'bank.fees.wire' must be a number"),
    ],
)
def test_malformed_accounts_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "accounts.json"
    path.write_text(content)
    with pytest.raises(infer.AccountsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        infer.AccountStore.load(path)


def test_answers_never_show_an_invented_figure(store):
    class FakeAssistant:
        device = torch.device("cpu")

        def generate(self, queries, max_new_tokens, **options):
            return [
                "I can help you send $250 to Mom.",
                "I can help you send $500 to Mom.",
                "Your balance is [SAVINGS_BALANCE].",
            ]

    args = infer.parse_args([])
    results = infer.answer(FakeAssistant(), store, ["Transfer 500 to Mom"] * 2 + ["savings balance?"], args)
    assert results[0]["response"] == infer.UNAVAILABLE and results[0]["raw_response"].startswith("I can help")
    assert "250" in results[0]["withheld_because"][0]
    assert results[1]["response"] == "I can help you send $500 to Mom." and "withheld_because" not in results[1]
    assert results[2]["response"] == "Your balance is $10,450.55."


# --- the command line -------------------------------------------------------------------------------------


def test_empty_query_is_refused_without_generating(tmp_path):
    result = run_infer("--adapter", tmp_path / "missing", "   ")
    assert result.returncode == 2 and "the query is empty" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content, message", [(b"\n  \n", "holds no non-empty line"), (b"caf\xe9?\n", "is not UTF-8 text")]
)
def test_unusable_query_file_is_refused_before_the_model_loads(tmp_path, content, message):
    queries = tmp_path / "queries.txt"
    queries.write_bytes(content)
    result = run_infer("--adapter", tmp_path / "missing", "--file", queries)  # no adapter: refused before loading
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_missing_or_incomplete_adapter_is_a_clear_error(tmp_path):
    result = run_infer("--adapter", tmp_path / "missing", "hi")
    assert result.returncode == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": 4,
                "lora_alpha": 8,
                "target_modules": ["q", "v"],
                "base_model_name_or_path": "tiny",
            }
        )
    )
    result = run_infer("--adapter", tmp_path / "half", "hi")
    assert result.returncode == 1 and "adapter_model.safetensors is missing" in result.stderr


def test_adapter_of_another_base_model_is_refused(tmp_path):
    from conftest import tiny_t5

    from lora import inject_lora

    other = tiny_t5()  # d_model 32, not the tiny model's 128
    inject_lora(other, r=4, alpha=8)
    save_adapter(other, tmp_path / "other", base_model_name_or_path="tiny")
    result = run_infer("--adapter", tmp_path / "other", "hi")
    assert result.returncode == 1 and "shape" in result.stderr and "Traceback" not in result.stderr


def test_answers_single_json_file_and_interactive(trained_adapter, tmp_path):
    result = run_infer("--adapter", trained_adapter, "--json", "What is my savings balance?")
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert {"query", "response", "raw_response", "latency_s"} <= answer.keys()
    assert "[" not in answer["response"]

    queries = tmp_path / "queries.txt"
    queries.write_text("I lost my card\n\nHello\nWhat is my checking balance?\n")
    result = run_infer("--adapter", trained_adapter, "--file", queries, "--json", "--batch-size", "2")
    assert [json.loads(line)["query"] for line in result.stdout.splitlines()] == [
        "I lost my card",
        "Hello",
        "What is my checking balance?",
    ]

    result = run_infer("--adapter", trained_adapter, "--model", "tiny", stdin="I lost my card\n\nquit\nnever read\n")
    assert result.returncode == 0 and len(result.stdout.strip().splitlines()) == 1


def test_merged_answers_equal_unmerged(trained_adapter):
    queries = [row["instruction"] for row in load_examples(TEST_FILE)[:12]]
    merged = infer.Assistant(trained_adapter).generate(queries)
    unmerged = infer.Assistant(trained_adapter, merge=False).generate(queries)
    assert merged == unmerged


def test_fine_tuned_beats_base_on_held_out_templates(trained_adapter, tmp_path):
    result = run_infer("--adapter", trained_adapter, "--eval", "--report-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    assert str(tmp_path / "eval_report.md") in result.stdout
    report = json.loads((tmp_path / "eval_report.json").read_text())
    base, tuned = report["metrics"]["base"], report["metrics"]["fine_tuned"]
    print(f"\ntiny smoke eval: base {base}\nfine-tuned {tuned}")
    assert tuned["exact_match"] > base["exact_match"]
    assert tuned["intent_accuracy"] > base["intent_accuracy"]
    assert report["test_rows"] == len(load_examples(TEST_FILE))
    markdown = (tmp_path / "eval_report.md").read_text()
    assert "| exact_match |" in markdown and "| query | base answer | fine-tuned answer | reference |" in markdown
