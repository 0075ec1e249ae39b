"""Answers grounded in an account store: the model writes placeholders, this code fills them.

What a figure in an answer may be, checked on the model's raw output:
- a placeholder, `[NAME]`, standing alone, that the store can fill: its value is the store's;
- a number the user wrote in the query (same value, same sign, in any spelling: "$500", "five hundred
  dollars", "0.5k"), echoed in an answer that says nothing about the customer's accounts or the bank's
  figures (no balance, savings, rate, fee, "you have"...) to a query that does not ask for one ("Is my
  balance 500?"), as "I can help you send $500 to Mom." does to "Send 500 to Mom";
- a small count in words, "about ten minutes", "one of them": right before a unit that is no amount
  ("minutes", "days", "of", "-time"), or anywhere in an answer that, by the same words, no figure is asked for.
Numbers are read in digits and in English words, with "k", "grand", "million", cents and currency signs
(banking/amounts.py); a numeral outside ASCII's 0-9 ("²", "½", "５") is never shown. Anything else
withholds the whole answer, with a reply that says why: a figure the store lacks, a number nobody gave,
or an answer that came out malformed or cut off. Nothing is guessed. A refusal of an off-topic question ends
with the advice for the question's topic, chosen by this code from the question's words (OFF_TOPIC_ADVICE).

Which answers are grounded: those of an adapter trained on the account store's placeholders ("grounding":
"banking" in its run's training_config.json, which train.py records from the training answers:
grounding_for), and of an adapter without that record (PEFT's, any tool's); an adapter trained on other
data ("grounding": "none") is shown as the model writes it. infer.py --grounding overrides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from data import DataError
from data.dataset import DATA_DIR
from lora.files import loads_json

from .amounts import figures_in, unusual_numerals

DEFAULT_ACCOUNTS = DATA_DIR / "accounts_demo.json"
UNAVAILABLE = (
    "I'm sorry, I can't give you that figure right now because it isn't available in your account "
    "records. Please check the mobile app or call our support line."
)
GARBLED = "I'm sorry, my answer came out garbled, so I won't show it. Please ask again or rephrase your question."
CUT_OFF = (
    "I'm sorry, my answer was cut off before it ended, so I won't show it. Please ask again, or ask a shorter question."
)
REPEATING = (
    "I'm sorry, my answer went round in circles, so I won't show it. Please rephrase your question, or ask our "
    "support line."
)
EMPTY = "I'm sorry, I have no answer to that. Please rephrase your question, or ask our support line."
# The placeholders the account store fills: an adapter whose training answers hold them is grounded.
ACCOUNT_PLACEHOLDER = re.compile(
    r"\[(?:[A-Z0-9_]+_(?:BALANCE|RECENT_TRANSACTIONS|LOAN_RATE|FEE)|SUPPORT_PHONE|ROUTING_NUMBER|BRANCH_HOURS)\]"
)
# The bundled data's advice after "I'm sorry, I can only help with banking questions...", by topic, each with
# the words that mark a question of it (checked in this order; a question of none gets the general advice).
OFF_TOPIC_ADVICE = {
    "medical": (
        "please ask a doctor or pharmacist",
        r"doctor|medic|symptom|fever|flu\b|cold\b|cough|headache|migraine|pain|ache\b|ankle|rash|sick|ill\b|"
        r"ibuprofen|aspirin|paracetamol|pill|dose|sleep|diagnos|allerg|injur|vaccin|blood|pregnan|disease|"
        r"infect|sprain|hospital|dentist|tooth|teeth",
    ),
    "legal": (
        "please ask a qualified lawyer",
        r"lawyer|attorney|legal|law\b|laws\b|sue\b|court|divorce|custody|(?:a|my) will\b|contract|rights\b|"
        r"landlord|evict|tenant|lease|fired\b|lawsuit|arrest|patent|copyright|visa\b",
    ),
    "cooking": (
        "please ask a recipe site or cookbook",
        r"cook|bake|baking|recipe|bread|sourdough|cake|pancake|oven|boil|fry|roast|pasta|lasagna|curry|rice\b|"
        r"soup|egg|wine|ingredient|dinner|vegan|dessert|cookie|grill|salmon|chicken",
    ),
    "coding": (
        "please ask a programming forum or documentation",
        r"code\b|coding|python|javascript|java\b|css|html|sql|program|bug\b|function|recursion|compile|null "
        r"pointer|api\b|git\b|linux|\bdiv\b|algorithm|debug|segfault|exception",
    ),
    "sports": (
        "please ask a sports news site",
        r"football|soccer|basketball|baseball|cricket|tennis|golf|hockey|rugby|score|match\b|team|player|league|"
        r"world cup|olympic|lakers|nba\b|nfl\b|fantasy|tournament",
    ),
}
GENERAL_ADVICE = ("general knowledge", "please ask a search engine or encyclopedia")
ADVICE = re.compile(r"For [a-z ]+ questions, please ask [^.]*\.")
MAX_AMOUNT = Decimal(10) ** 15  # larger is no account figure: a typo, or a file that is not an account store
PLACEHOLDER = re.compile(r"\[([^\[\]]*)\]")
PLACEHOLDER_NAME = re.compile(r"[A-Z0-9_]+")
BARE_PLACEHOLDER = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+\b")  # CHECKING_BALANCE without its brackets
# Words of an answer about the customer's accounts or the bank's figures: a number in it must be the store's.
ABOUT_ACCOUNTS = re.compile(
    r"\b(balances?|rates?|apr|apy|interest|fees?|charges?|charged|routing|account numbers?|transactions?|savings"
    r"|checking|credit|debt|owe[ds]?|owing|available|total|spent|remaining|have|has|had)\b",
    re.IGNORECASE,
)
# Words of a query that asks for a figure: an answer echoing the user's number to it would confirm it.
ASKS_FOR_FIGURE = re.compile(
    r"\b(balances?|rates?|apr|apy|interest|fees?|charges?|routing|account numbers?|how much|available|do i have"
    r"|left|statements?)\b",
    re.IGNORECASE,
)
CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x1f\x7f-\x9f]")  # ANSI escapes, then control characters


class AccountsError(DataError):
    """An account store file that cannot be used."""


@dataclass
class Grounded:
    """What the user may see for one raw model output."""

    response: str
    reason: str | None = None  # None (shown), "missing_figure", "invented_figure", "malformed", "cut_off",
    # "repeating" or "empty"
    problems: list[str] = field(default_factory=list)


def money(amount: Decimal) -> str:
    return f"-${-amount:,.2f}" if amount < 0 else f"${amount:,.2f}"


class AccountStore:
    """A customer's accounts and the bank's published figures, as the values of placeholders.

    File layout (see data/accounts_demo.json): {"accounts": {"checking"|"savings"|"credit_card":
    {"balance": number, "recent_transactions": [{"date", "description", "amount"}]}}, "bank":
    {"support_phone", "routing_number", "branch_hours": str, "loan_rates": {kind: percent},
    "fees": {"overdraft"|"monthly"|"atm"|"wire": number}}}. Any part may be left out: its placeholders
    then answer "unavailable". Account and fee names may be written as people write them ("Checking
    Account"); amounts are exact decimals; control characters in text are dropped.
    """

    def __init__(self, data: dict, source: str = "account store") -> None:
        self.source = source
        self.values: dict[str, str] = {}
        if not isinstance(data, dict):
            self._fail("the file must hold a JSON object")
        for kind, account in self._section(data, "accounts").items():
            where = f"accounts.{kind}"
            if not isinstance(account, dict):
                self._fail(f"'{where}' must be an object")
            stem = placeholder_stem(kind, drop=("account", "acct"))
            if "balance" in account:
                self.values[f"{stem}_BALANCE"] = money(self._amount(account["balance"], f"{where}.balance"))
            if "recent_transactions" in account:
                self.values[f"{stem}_RECENT_TRANSACTIONS"] = self._transactions(account["recent_transactions"], where)
        bank = self._section(data, "bank")
        for key in ("support_phone", "routing_number", "branch_hours"):
            if key in bank:
                if not isinstance(bank[key], str) or not clean(bank[key]):
                    self._fail(f"'bank.{key}' must be a non-empty string")
                self.values[key.upper()] = clean(bank[key])
        for kind, rate in self._section(bank, "loan_rates", "bank.").items():
            stem = placeholder_stem(kind, drop=("loan",))
            self.values[f"{stem}_LOAN_RATE"] = f"{self._amount(rate, f'bank.loan_rates.{kind}'):.2f}%"
        for kind, fee in self._section(bank, "fees", "bank.").items():
            stem = placeholder_stem(kind, drop=("fee",))
            self.values[f"{stem}_FEE"] = money(self._amount(fee, f"bank.fees.{kind}"))

    @classmethod
    def load(cls, path: str | Path) -> AccountStore:
        path = Path(path)
        if path.is_dir():
            raise AccountsError(f"accounts file {path} is a directory: pass a JSON file (see {DEFAULT_ACCOUNTS}).")
        if not path.is_file():
            raise AccountsError(f"accounts file {path} does not exist.")
        try:
            data = loads_json(path.read_text(encoding="utf-8-sig"), parse_float=Decimal)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AccountsError(f"accounts file {path} is not valid JSON ({err}).") from None
        return cls(data, str(path))

    def fill(self, text: str) -> tuple[str, list[str]]:
        """Replace every placeholder; return (answer, problems). Any problem makes the answer UNAVAILABLE."""
        problems = []
        for name in PLACEHOLDER.findall(text):
            if not PLACEHOLDER_NAME.fullmatch(name):
                problems.append(f"malformed placeholder [{name}]")
            elif name not in self.values:
                problems.append(f"no value for [{name}]")
        if PLACEHOLDER.sub("", text).count("[") or PLACEHOLDER.sub("", text).count("]"):
            problems.append("unbalanced bracket")
        if problems:
            return UNAVAILABLE, problems
        return PLACEHOLDER.sub(lambda m: self.values[m.group(1)], text), []

    # validation helpers
    def _fail(self, what: str):
        raise AccountsError(f"{self.source}: {what}.")

    def _section(self, data: dict, key: str, prefix: str = "") -> dict:
        section = data.get(key, {})
        if not isinstance(section, dict):
            self._fail(f"'{prefix}{key}' must be an object")
        return section

    def _amount(self, value, where: str) -> Decimal:
        if isinstance(value, bool) or not isinstance(value, (int, float, Decimal)):
            self._fail(f"'{where}' must be a number, got {value!r}")
        amount = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
        if not amount.is_finite() or abs(amount) >= MAX_AMOUNT:
            self._fail(f"'{where}' is not a plausible amount: {str(value)[:40]}")
        return amount

    def _transactions(self, transactions, where: str) -> str:
        if not isinstance(transactions, list):
            self._fail(f"'{where}.recent_transactions' must be a list")
        lines = []
        for i, tx in enumerate(transactions):
            tx_where = f"{where}.recent_transactions[{i}]"
            if not isinstance(tx, dict) or not all(isinstance(tx.get(k), str) for k in ("date", "description")):
                self._fail(f"'{tx_where}' needs string 'date' and 'description' and a number 'amount'")
            amount = money(self._amount(tx.get("amount"), tx_where + ".amount"))
            lines.append(f"{clean(tx['date'])} {clean(tx['description'])} {amount}")
        return "; ".join(lines) if lines else "no recent transactions"


def placeholder_stem(name: str, drop: tuple[str, ...] = ()) -> str:
    """ "Checking Account" -> CHECKING, "credit card" -> CREDIT_CARD: the stem the model's placeholders use."""
    words = re.findall(r"[a-z0-9]+", name.lower())
    while len(words) > 1 and words[-1] in drop:
        words.pop()
    return "_".join(words).upper()


def clean(text: str) -> str:
    """Store text as it may reach a terminal: no escape sequences, no control characters."""
    return CONTROL.sub("", text).strip()


def numbers_in(text: str) -> list[Decimal]:
    """Every number written in `text`, as a signed value: "-$42.10" is -42.10, "five grand" is 5000."""
    return [figure.value for figure in figures_in(text)]


def grounding_for(responses) -> str:
    """ "banking" when training answers hold the account store's placeholders (the adapter will write them and
    needs the store to fill them), else "none": what train.py records in training_config.json."""
    return "banking" if any(ACCOUNT_PLACEHOLDER.search(response) for response in responses) else "none"


def shown(raw: str, query: str, store: AccountStore, complete: bool = True, grounded: bool = True) -> Grounded:
    """What the user sees: the banking grounding's answer, or (an adapter of another domain) the model's own
    text, only its control characters dropped."""
    return ground(raw, query, store, complete) if grounded else Grounded(clean(raw))


def repeats_itself(text: str, times: int = 3) -> bool:
    """Whether `text` ends in a run of one to four words said `times` times over ("We We We", "so so so"),
    its last word possibly cut short: what a model that has not learned an answer writes to the token limit."""
    words = text.split()
    for tail in (words, words[:-1]):
        for n in range(1, 5):
            units = {tuple(tail[len(tail) - n * (k + 1) : len(tail) - n * k]) for k in range(times)}
            if len(tail) >= n * times and len(units) == 1:
                return True
    return False


def off_topic_advice(query: str) -> str:
    """The advice sentence for an off-topic question, by its topic (OFF_TOPIC_ADVICE)."""
    for topic, (advice, words) in OFF_TOPIC_ADVICE.items():
        if re.search(rf"\b(?:{words})", query, re.IGNORECASE):
            return f"For {topic} questions, {advice}."
    return f"For {GENERAL_ADVICE[0]} questions, {GENERAL_ADVICE[1]}."


def ground(raw: str, query: str, store: AccountStore, complete: bool = True) -> Grounded:
    """What the user may see for the model's raw output `raw` (see the module's docstring)."""
    if not raw.strip():  # nothing to show, whether it stopped at once or ran to the limit on blank tokens
        return Grounded(EMPTY, "empty", ["the model's answer was empty"])
    if not complete and repeats_itself(raw):
        return Grounded(REPEATING, "repeating", ["the answer repeated itself until the token limit"])
    if not complete:
        return Grounded(CUT_OFF, "cut_off", ["the answer was cut off at the token limit"])
    outside = PLACEHOLDER.sub(" ", raw)  # the text around the placeholders
    glued = [m.group(0) for m in PLACEHOLDER.finditer(raw) if _touches_word(raw, m.start(), m.end())]
    bare = BARE_PLACEHOLDER.findall(outside)
    if glued:
        return Grounded(GARBLED, "malformed", [f"placeholder glued to text: {glued[0]}"])
    if bare:
        return Grounded(GARBLED, "malformed", [f"placeholder without brackets: {bare[0]}"])
    if "[" in outside or "]" in outside:
        return Grounded(GARBLED, "malformed", ["unbalanced bracket"])
    malformed = [name for name in PLACEHOLDER.findall(raw) if not PLACEHOLDER_NAME.fullmatch(name)]
    if malformed:
        return Grounded(GARBLED, "malformed", [f"malformed placeholder [{malformed[0]}]"])
    response, problems = store.fill(raw)
    if problems:  # the placeholders are well formed: what is left is a figure the store lacks
        return Grounded(UNAVAILABLE, "missing_figure", problems)
    unusual = unusual_numerals(outside)
    if unusual:
        return Grounded(UNAVAILABLE, "invented_figure", [f"a number written as {unusual[0]!r}, not by the store"])
    about_accounts = ABOUT_ACCOUNTS.search(outside)
    confirms = about_accounts or ASKS_FOR_FIGURE.search(query)
    user_numbers = set(numbers_in(query))
    for figure in figures_in(outside):
        if figure.small_count and (figure.before_count_noun or not confirms):
            continue  # "about ten minutes", "one of them": a count, no amount
        if figure.value not in user_numbers:
            return Grounded(UNAVAILABLE, "invented_figure", [f"{figure.text!r} is in neither the query nor the store"])
        if confirms:
            return Grounded(
                UNAVAILABLE, "invented_figure", [f"the user's {figure.text!r} is presented as a figure of the store"]
            )
    return Grounded(ADVICE.sub(lambda _: off_topic_advice(query), response))


def _touches_word(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start > 0 else " "
    after = text[end] if end < len(text) else " "
    return before.isalnum() or after.isalnum()
