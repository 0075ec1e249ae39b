"""Grounded figures: placeholders filled from the account store, nothing invented ever shown."""

import json
from decimal import Decimal

import pytest

from banking.grounding import (
    CUT_OFF,
    DEFAULT_ACCOUNTS,
    EMPTY,
    GARBLED,
    UNAVAILABLE,
    AccountsError,
    AccountStore,
    ground,
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
    assert money(Decimal(2682)) == "$2,682.00" and money(Decimal("-42.1")) == "-$42.10"
    assert store.fill("Recent: [CHECKING_RECENT_TRANSACTIONS]")[0].startswith(
        "Recent: 2026-11-20 Green Grocer -$42.10;"
    )


def test_every_figure_of_the_demo_store_is_filled_and_shown(store):
    """The README's own store, end to end: debits and negative amounts included, nothing withheld."""
    assert len(store.values) == 3 * 2 + 3 + 4 + 4
    for name, value in store.values.items():
        grounded = ground(f"Here it is: [{name}].", "Tell me my figures", store)
        assert (grounded.reason, grounded.response) == (None, f"Here it is: {value}."), name


@pytest.mark.parametrize(
    "raw, query, reason",
    [
        ("I can help you send $250 to Mom.", "Transfer 500 to Mom", "invented_figure"),
        ("Your balance is $2,026.00.", "What is my balance?", "invented_figure"),  # 2026 is only in a date
        ("Your checking balance is $25.00.", "What is my balance?", "invented_figure"),  # the wire fee's value
        ("Your balance is $10,450.549.", "savings balance?", "invented_figure"),  # rounds to the real one
        ("Your balance is $1,000,000.00.", "My balance is $1,000,000, right?", "invented_figure"),  # user's claim
        ("Your balance is CHECKING_BALANCE.", "balance?", "malformed"),  # a placeholder without brackets
        ("Your balance is [CHECKING_BALANCE]1.", "balance?", "malformed"),  # glued to a digit
        ("Your balance is [MORTGAGE_BALANCE].", "balance?", "missing_figure"),
        ("Your balance is [savings balance].", "balance?", "malformed"),
        ("Your balance is [SAVINGS_BAL", "balance?", "malformed"),
        ("Your balance is ]SAVINGS[.", "balance?", "malformed"),
        ("Call us at [SU", "I lost my card", "malformed"),
    ],
)
def test_a_figure_nobody_gave_is_never_shown(store, raw, query, reason):
    grounded = ground(raw, query, store)
    assert grounded.reason == reason and grounded.problems
    assert grounded.response in (UNAVAILABLE, GARBLED) and "[" not in grounded.response
    assert not numbers_in(grounded.response)


@pytest.mark.parametrize(
    "raw, query",
    [
        ("I can help you send $500 to Mom.", "Transfer 500 to Mom"),
        ("I can help you send $1,250.50 to Priya.", "send USD 1,250.50 to Priya"),
        ("The current balance of your savings account is [SAVINGS_BALANCE].", "savings balance?"),
    ],
)
def test_a_number_the_user_wrote_or_a_filled_placeholder_is_shown(store, raw, query):
    grounded = ground(raw, query, store)
    assert grounded.reason is None and "[" not in grounded.response


def test_an_answer_cut_off_at_the_token_limit_says_so(store):
    grounded = ground("I'm sorry to hear that. Please call us at [SU", "I lost my card", store, complete=False)
    assert grounded.reason == "cut_off" and grounded.response == CUT_OFF and "figure" not in CUT_OFF


def test_numbers_keep_their_sign():
    assert numbers_in("paid -$42.10 and got $1,850.00, -3 and 5") == [
        Decimal("-42.10"),
        Decimal("1850.00"),
        Decimal(-3),
        Decimal(5),
    ]


def test_a_store_without_a_figure_says_unavailable():
    empty = AccountStore({"accounts": {"checking": {}}})
    assert empty.fill("It is [CHECKING_BALANCE].")[0] == UNAVAILABLE


def test_store_values_are_exact_named_as_people_write_them_and_free_of_control_characters(tmp_path):
    path = tmp_path / "accounts.json"
    data = {
        "accounts": {
            "Checking Account": {
                "balance": 12345678901234.57,
                "recent_transactions": [
                    {"date": "2026-11-20", "description": "\x1b[31mEvil\x1b[0m Shop\x07", "amount": -5}
                ],
            },
            "credit card": {"balance": 1},
        },
        "bank": {"fees": {"Wire Fee": 25}},
    }
    path.write_text("\ufeff" + json.dumps(data))  # a byte-order mark is fine
    store = AccountStore.load(path)
    assert store.values["CHECKING_BALANCE"] == "$12,345,678,901,234.57"  # a float would print ...234.56
    assert store.values["CHECKING_RECENT_TRANSACTIONS"] == "2026-11-20 Evil Shop -$5.00"
    assert store.values["CREDIT_CARD_BALANCE"] == "$1.00" and store.values["WIRE_FEE"] == "$25.00"


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not valid JSON"),
        ("[]", "must hold a JSON object"),
        ('{"accounts": {"checking": {"balance": "lots"}}}', "'accounts.checking.balance' must be a number"),
        ('{"accounts": {"savings": {"recent_transactions": [{"date": "x"}]}}}', "recent_transactions[0]"),
        ('{"bank": {"fees": {"wire": null}}}', "'bank.fees.wire' must be a number"),
        ('{"accounts": {"checking": {"balance": 1' + "0" * 400 + "}}}", "not a plausible amount"),
        ('{"accounts": {"checking": {"balance": 12345678901234567890}}}', "not a plausible amount"),
    ],
)
def test_malformed_accounts_file_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "accounts.json"
    path.write_text(content)
    with pytest.raises(AccountsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        AccountStore.load(path)


def test_an_accounts_path_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(AccountsError, match="is a directory"):
        AccountStore.load(tmp_path)


@pytest.mark.parametrize("complete", [True, False])
def test_an_empty_answer_is_called_empty_not_cut_off(store, complete):
    for raw in ("", "  \n "):
        grounded = ground(raw, "What is my savings balance?", store, complete)
        assert grounded.reason == "empty" and grounded.response == EMPTY and "cut off" not in EMPTY


# Amounts in every spelling a model might use: none may be shown unless the store's placeholder wrote it.
ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen \
seventeen eighteen nineteen".split()
TENS_WORDS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def in_words(n: int, joiner: str = " ") -> str:
    """English words for 0 <= n < 10**9, written independently of banking.amounts' reader."""
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS_WORDS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    for size, name in ((10**6, "million"), (1000, "thousand"), (100, "hundred")):
        if n >= size:
            head = f"{in_words(n // size, joiner)} {name}"
            return head if n % size == 0 else f"{head}{joiner}{in_words(n % size, joiner)}"
    raise AssertionError(n)


SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
FULL_WIDTH = str.maketrans("0123456789", "０１２３４５６７８９")
ARABIC_INDIC = str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩")
DEVANAGARI = str.maketrans("0123456789", "०१२३४५६७८९")


def spellings(amount: Decimal) -> list[str]:
    """Ways to write `amount` (dollars and cents) in an answer."""
    whole, cents = int(amount), int((amount % 1) * 100)
    digits = f"{amount:.2f}" if cents else str(whole)
    grouped = f"{amount:,.2f}" if cents else f"{whole:,}"
    european = grouped.replace(",", " ").replace(".", ",")
    words = in_words(whole)
    found = [
        digits,
        grouped,
        f"${grouped}",
        f"-${grouped}",
        f"$ {digits}",
        f"USD {grouped}",
        f"{grouped} USD",
        f"€{grouped}",
        f"£{digits}",
        f"{digits} dollars",
        european,
        grouped.replace(",", "."),
        f"{words} dollars",
        in_words(whole, " and ") + " dollars",
        words.replace("-", " "),
        digits.translate(SUPERSCRIPT),
        digits.translate(FULL_WIDTH),
        digits.translate(ARABIC_INDIC),
        digits.translate(DEVANAGARI),
        f"{whole}½",
        f"{whole}.{cents:02d}".translate(SUPERSCRIPT),
    ]
    if cents:
        found += [
            f"{words} dollars and {in_words(cents)} cents",
            f"{words} point {' '.join(ONES[int(d)] for d in f'{cents:02d}')}",
        ]
    if whole >= 1000:
        found += [f"{whole / 1000:g}k", f"{whole / 1000:g}K", f"${whole / 1000:g}k", f"{in_words(whole // 1000)} grand"]
        found += [f"{whole // 1000} grand", f"{whole / 10**6:g} million"]
    return found


ANSWERS = [
    "Your savings balance is {}.",
    "You have {} in your checking account.",
    "Your balance! {} is what you have.",
    "Yes, {} is what you have in savings.",
    "The wire fee is {}. Call [SUPPORT_PHONE] for details.",
    "Sure. {}. Is there anything else I can help with?",
]
AMOUNTS = [Decimal("10450.55"), Decimal("2682"), Decimal("5000"), Decimal("10400"), Decimal("42.10"), Decimal("250")]


def test_no_amount_in_any_spelling_is_shown_unless_the_store_gave_it(store):
    """Over a thousand spellings in otherwise-correct answers, asked for or echoed back: all withheld."""
    cases = []
    for amount in AMOUNTS:
        for spelling in spellings(amount):
            for answer in ANSWERS:
                cases.append((answer.format(spelling), "What is my savings balance?"))
                cases.append((answer.format(spelling), f"Is my savings balance {spelling}?"))  # confirming it
    assert len(cases) >= 1000
    shown = [(raw, query) for raw, query in cases if ground(raw, query, store).reason is None]
    assert shown == [], f"{len(shown)} of {len(cases)} shown, e.g. {shown[:3]}"


@pytest.mark.parametrize(
    "raw, query",
    [
        ("Your savings balance is ten thousand four hundred dollars.", "savings balance?"),
        ("You have five grand in savings.", "savings?"),
        ("Yes, 10450.55 is what you have in savings.", "Is 10450.55 my savings?"),
        ("Your balance! 5000 dollars is what you have.", "Is it 5000 dollars?"),
        ("Your balance is ²³⁴.", "balance?"),
        ("Sure, ten.", "Is my balance ten?"),
        ("Your balance is one.", "What is my balance?"),
        ("I can help you send ten dollars to Mom.", "send 500 to mom"),  # a small number, but money
    ],
)
def test_the_spellings_that_slipped_through_are_withheld(store, raw, query):
    assert ground(raw, query, store).reason == "invented_figure"


@pytest.mark.parametrize(
    "raw, query",
    [
        ("I can help you send five hundred dollars to Mom.", "send $500 to mom"),
        ("I can help you send $500 to Mom.", "send five hundred dollars to mom"),
        ("I can help you send $2,500 to Nina.", "send 2.5k to Nina"),
        ("I can help you send $2,000 to Nina.", "send two grand to Nina"),
        ("Visit any branch and it takes about ten minutes. Your balance is [SAVINGS_BALANCE].", "balance?"),
        ("If you don't recognise one of them, tell me: [CHECKING_RECENT_TRANSACTIONS].", "recent transactions?"),
        ("You can order a new one in the app.", "I lost my card"),
    ],
)
def test_echoes_and_counts_are_still_shown(store, raw, query):
    assert ground(raw, query, store).reason is None


def test_every_reference_answer_of_the_bundled_data_is_shown_with_the_demo_store(store):
    from data.dataset import DATA_DIR, load_examples

    rows = [
        row for split in ("train", "validation", "test") for row in load_examples(DATA_DIR / f"banking_{split}.jsonl")
    ]
    withheld = [
        (row["instruction"], row["response"])
        for row in rows
        if ground(row["response"], row["instruction"], store).reason
    ]
    assert len(rows) > 1800 and withheld == []
