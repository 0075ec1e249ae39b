"""Answers grounded in an account store: the model writes placeholders, this code fills them.

A placeholder the store cannot fill, a malformed one, or a number that neither the user nor the store
gave is never shown and never guessed: the whole answer becomes UNAVAILABLE.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from data import DataError
from data.dataset import DATA_DIR

DEFAULT_ACCOUNTS = DATA_DIR / "accounts_demo.json"
UNAVAILABLE = (
    "I'm sorry, I can't give you that figure right now because it isn't available in your account "
    "records. Please check the mobile app or call our support line."
)
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
BRACKETED = re.compile(r"\[([^\[\]]*)\]")
PLACEHOLDER_NAME = re.compile(r"[A-Z0-9_]+")


class AccountsError(DataError):
    """An account store file that cannot be used."""


def money(amount: float) -> str:
    return f"-${-amount:,.2f}" if amount < 0 else f"${amount:,.2f}"


class AccountStore:
    """A customer's accounts and the bank's published figures, as the values of placeholders.

    File layout (see data/accounts_demo.json): {"accounts": {"checking"|"savings"|"credit_card":
    {"balance": number, "recent_transactions": [{"date", "description", "amount"}]}}, "bank":
    {"support_phone", "routing_number", "branch_hours": str, "loan_rates": {kind: percent},
    "fees": {"overdraft"|"monthly"|"atm"|"wire": number}}}. Any part may be left out: its placeholders
    then answer "unavailable".
    """

    def __init__(self, data: dict, source: str = "account store") -> None:
        self.source = source
        self.values: dict[str, str] = {}
        self.numbers: set[float] = set()
        if not isinstance(data, dict):
            self._fail("the file must hold a JSON object")
        accounts = self._section(data, "accounts")
        for kind, account in accounts.items():
            where = f"accounts.{kind}"
            if not isinstance(account, dict):
                self._fail(f"'{where}' must be an object")
            stem = kind.upper()
            if "balance" in account:
                self.values[f"{stem}_BALANCE"] = money(self._number(account["balance"], f"{where}.balance"))
            if "recent_transactions" in account:
                transactions = account["recent_transactions"]
                if not isinstance(transactions, list):
                    self._fail(f"'{where}.recent_transactions' must be a list")
                lines = []
                for i, tx in enumerate(transactions):
                    tx_where = f"{where}.recent_transactions[{i}]"
                    if not isinstance(tx, dict) or not all(isinstance(tx.get(k), str) for k in ("date", "description")):
                        self._fail(f"'{tx_where}' needs string 'date' and 'description' and a number 'amount'")
                    lines.append(
                        f"{tx['date']} {tx['description']} "
                        f"{money(self._number(tx.get('amount'), tx_where + '.amount'))}"
                    )
                    self._strings(tx["date"], tx["description"])
                self.values[f"{stem}_RECENT_TRANSACTIONS"] = "; ".join(lines) if lines else "no recent transactions"
        bank = self._section(data, "bank")
        for key in ("support_phone", "routing_number", "branch_hours"):
            if key in bank:
                if not isinstance(bank[key], str) or not bank[key].strip():
                    self._fail(f"'bank.{key}' must be a non-empty string")
                self.values[key.upper()] = bank[key]
                self._strings(bank[key])
        for kind, rate in self._section(bank, "loan_rates", "bank.").items():
            self.values[f"{kind.upper()}_LOAN_RATE"] = f"{self._number(rate, f'bank.loan_rates.{kind}'):.2f}%"
        for kind, fee in self._section(bank, "fees", "bank.").items():
            self.values[f"{kind.upper()}_FEE"] = money(self._number(fee, f"bank.fees.{kind}"))

    @classmethod
    def load(cls, path: str | Path) -> AccountStore:
        path = Path(path)
        if not path.is_file():
            raise AccountsError(f"accounts file {path} does not exist.")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AccountsError(f"accounts file {path} is not valid JSON ({err}).") from None
        return cls(data, str(path))

    def fill(self, text: str) -> tuple[str, list[str]]:
        """Replace every placeholder; return (answer, problems). Any problem makes the answer UNAVAILABLE."""
        problems = []
        for name in BRACKETED.findall(text):
            if not PLACEHOLDER_NAME.fullmatch(name):
                problems.append(f"malformed placeholder [{name}]")
            elif name not in self.values:
                problems.append(f"no value for [{name}]")
        if BRACKETED.sub("", text).count("[") or BRACKETED.sub("", text).count("]"):
            problems.append("unbalanced bracket")
        if problems:
            return UNAVAILABLE, problems
        return BRACKETED.sub(lambda m: self.values[m.group(1)], text), []

    # validation helpers
    def _fail(self, what: str):
        raise AccountsError(f"{self.source}: {what}.")

    def _section(self, data: dict, key: str, prefix: str = "") -> dict:
        section = data.get(key, {})
        if not isinstance(section, dict):
            self._fail(f"'{prefix}{key}' must be an object")
        return section

    def _number(self, value, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(f"'{where}' must be a number, got {value!r}")
        self.numbers.add(round(float(value), 2))
        return float(value)

    def _strings(self, *texts: str) -> None:
        for text in texts:
            self.numbers |= numbers_in(text)


def numbers_in(text: str) -> set[float]:
    """Every number written in `text`, as a value: "$2,682.00" and "2682" are both 2682.0."""
    found = set()
    for match in NUMBER.findall(text):
        try:
            found.add(round(float(match.replace(",", "").rstrip(".")), 2))
        except ValueError:
            continue
    return found


def invented_numbers(answer: str, query: str, store: AccountStore) -> set[float]:
    """Numbers in an answer that neither the user nor the account store gave."""
    return numbers_in(answer) - numbers_in(query) - store.numbers


def ground(raw: str, query: str, store: AccountStore) -> tuple[str, list[str]]:
    """The answer a user may see for the model's raw output, and why it was withheld (empty if it was not)."""
    response, problems = store.fill(raw)
    invented = invented_numbers(response, query, store)
    if invented:  # a figure neither the user nor the store gave: the model made it up
        return UNAVAILABLE, [f"number(s) {sorted(invented)} found in neither the query nor the store"]
    return response, problems
