"""Grounded figures: placeholders filled from the account store, nothing invented ever shown."""

import pytest

from support.grounding import (
    DEFAULT_ACCOUNTS,
    UNAVAILABLE,
    AccountsError,
    AccountStore,
    ground,
    invented_numbers,
    money,
    numbers_in,
)


@pytest.fixture(scope="module")
def store():
    return AccountStore.load(DEFAULT_ACCOUNTS)


def test_placeholders_are_filled_from_the_store(store):
    answer, problems = store.fill("Savings: [SAVINGS_BALANCE]. Call [SUPPORT_PHONE]. Car loans from [CAR_LOAN_RATE].")
    assert problems == []
    assert answer == "Savings: $10,450.55. Call 1-800-555-0199. Car loans from 6.49%."
    assert money(2682) == "$2,682.00" and money(-42.1) == "-$42.10"
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
    assert answer == UNAVAILABLE and any(problem in p for p in problems)
    assert "[" not in answer and not numbers_in(answer)


def test_a_store_without_a_figure_says_unavailable():
    empty = AccountStore({"accounts": {"checking": {}}})
    assert empty.fill("It is [CHECKING_BALANCE].")[0] == UNAVAILABLE


def test_invented_numbers(store):
    assert invented_numbers("I will send $500.00 to Mom.", "Transfer 500 to Mom", store) == set()
    assert invented_numbers("Your balance is $10,450.55.", "balance?", store) == set()
    assert invented_numbers("Your balance is $1,234.00.", "balance?", store) == {1234.0}


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
    with pytest.raises(AccountsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AccountStore.load(path)


def test_ground_withholds_an_answer_with_an_invented_figure(store):
    assert ground("I can help you send $500 to Mom.", "Transfer 500 to Mom", store) == (
        "I can help you send $500 to Mom.",
        [],
    )
    response, problems = ground("I can help you send $250 to Mom.", "Transfer 500 to Mom", store)
    assert response == UNAVAILABLE and "250" in problems[0]
    assert ground("Your balance is [SAVINGS_BALANCE].", "savings?", store) == ("Your balance is $10,450.55.", [])
