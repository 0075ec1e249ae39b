"""The evaluation's metrics on hand-made cases, and its report rendered from data."""

import pytest

from banking import evaluation as ev
from banking.grounding import DEFAULT_ACCOUNTS, AccountStore


@pytest.fixture(scope="module")
def store():
    return AccountStore.load(DEFAULT_ACCOUNTS)


def test_token_f1_and_exact_match_known_answers():
    assert ev.token_f1("the cat sat", "the cat sat") == 1.0
    # prediction "the cat" vs reference "the cat sat down": precision 1, recall 1/2 -> F1 2/3
    assert ev.token_f1("The cat!", "the cat sat down") == pytest.approx(2 / 3)
    assert ev.token_f1("dogs", "the cat") == 0.0
    assert ev.token_f1("Your balance is [SAVINGS_BALANCE].", "Your balance is [CHECKING_BALANCE].") == pytest.approx(
        0.75
    )
    assert ev.exact_match("Hello  there ", "Hello there")
    assert not ev.exact_match("Hello there.", "Hello there")


def test_intent_matcher_and_refusal():
    rows = [
        {"response": "Your savings balance is [SAVINGS_BALANCE].", "intent": "check_balance"},
        {"response": "I'm sorry, I can only help with banking questions.", "intent": "out_of_domain"},
    ]
    matcher = ev.IntentMatcher(rows)
    assert matcher("Your checking balance is [CHECKING_BALANCE].") == "check_balance"
    assert matcher("Sorry, I can only help with banking questions") == "out_of_domain"
    assert matcher("Bananas are yellow fruit") is None
    assert ev.is_refusal("I'm sorry, I can only help with banking questions, such as cards.")
    assert not ev.is_refusal("Your balance is $5.00.")


def test_score_on_a_known_case(store):
    rows = [
        {"instruction": "Transfer 500 to Mom", "response": "Sending $500 to Mom.", "intent": "transfer_funds"},
        {
            "instruction": "How do I bake bread?",
            "response": "I'm sorry, I can only help with banking questions.",
            "intent": "out_of_domain",
        },
    ]
    matcher = ev.IntentMatcher(rows)
    perfect = ev.score(rows, [r["response"] for r in rows], store, matcher)
    assert perfect["exact_match"] == perfect["intent_accuracy"] == perfect["refusal_rate_out_of_domain"] == 1.0
    assert perfect["invented_figure_rate"] == 0.0
    wrong = ev.score(rows, ["Sending $900 to Mom.", "Bake it at 200 degrees."], store, matcher)
    assert wrong["exact_match"] == 0.0 and wrong["intent_accuracy"] == 0.5
    assert wrong["refusal_rate_out_of_domain"] == 0.0 and wrong["invented_figure_rate"] == 1.0


def test_the_printed_table_and_the_markdown_report_come_from_the_same_data():
    metrics = {"exact_match": 0.5, "refusal_rate_out_of_domain": None}
    report = {
        "adapter": "a",
        "base_model": "b",
        "test_rows": 2,
        "metrics": {"base": dict(metrics, exact_match=0.0), "fine_tuned": metrics},
        "samples": [{"query": "q|x", "base": "b", "fine_tuned": "f", "reference": "r", "intent": None}],
        "notes": {"exact_match": "raw output equals the reference"},
    }
    table = ev.metrics_markdown(report)
    assert table.splitlines() == [
        "| metric | base | fine_tuned |",
        "| --- | --- | --- |",
        "| exact_match | 0.0% | 50.0% |",
        "| refusal_rate_out_of_domain | n/a | n/a |",
    ]
    markdown = ev.report_markdown(report)
    assert table in markdown and "| q\\|x | b | f | r |" in markdown and "- exact_match: raw output" in markdown
