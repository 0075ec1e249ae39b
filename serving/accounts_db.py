"""The customers' accounts in an embedded SQLite database, and the API keys that say which customer a request is.

Tables: customers (id, name), accounts (customer_id, kind, balance), transactions (customer_id, kind, date,
description, amount) and bank (key, value: the bank's published figures, one set for every customer). Amounts
are stored as decimal text, exact. A database that does not exist is built from the demo account store
(data/accounts_demo.json) as customer "demo"; `import_customer` adds or replaces one from a file of the same
layout. Each request's figures are read afresh, for the customer its key names, as an AccountStore
(banking/grounding.py), which checks them as it checks a file.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import sqlite3
from decimal import Decimal
from pathlib import Path

from banking.grounding import DEFAULT_ACCOUNTS, AccountsError, AccountStore
from lora.files import loads_json
from support.cli import UsageError

DEMO_CUSTOMER = "demo"
SCHEMA = """
CREATE TABLE customers (id TEXT PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE accounts (customer_id TEXT NOT NULL REFERENCES customers(id), kind TEXT NOT NULL,
                       balance TEXT, PRIMARY KEY (customer_id, kind));
CREATE TABLE transactions (customer_id TEXT NOT NULL, kind TEXT NOT NULL, date TEXT NOT NULL,
                           description TEXT NOT NULL, amount TEXT NOT NULL,
                           FOREIGN KEY (customer_id, kind) REFERENCES accounts(customer_id, kind));
CREATE TABLE bank (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
MIN_KEY_LENGTH = 16


class AccountsDatabase:
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise UsageError(f"--accounts-db {self.path} is a directory: pass a file path for the SQLite database.")
        if not self.path.exists():
            self._create()
        try:
            self.db = sqlite3.connect(self.path, check_same_thread=False)  # used by the server's one event loop
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.execute("SELECT count(*) FROM customers JOIN accounts JOIN transactions JOIN bank").fetchone()
        except sqlite3.DatabaseError as err:
            raise UsageError(f"--accounts-db {self.path} is no accounts database of this server ({err}).") from None

    def _create(self) -> None:
        """Build the database from the demo store in a file beside it, then rename it into place: a database
        that exists is always complete."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(tmp)
            self.db.executescript(SCHEMA)
            self.import_customer(DEMO_CUSTOMER, DEFAULT_ACCOUNTS)
            self.db.close()
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def import_customer(self, customer: str, path: Path) -> None:
        """Add customer `customer`, or replace its accounts, from an account store file; a "bank" section
        in the file replaces the bank's figures."""
        AccountStore.load(path)  # refuses a file that is not a usable store, naming what is wrong
        data = loads_json(Path(path).read_text(encoding="utf-8-sig"), parse_float=Decimal)
        with self.db:  # one transaction: all of it or none
            self.db.execute("DELETE FROM transactions WHERE customer_id = ?", (customer,))
            self.db.execute("DELETE FROM accounts WHERE customer_id = ?", (customer,))
            self.db.execute("INSERT OR REPLACE INTO customers VALUES (?, ?)", (customer, data.get("customer", "")))
            for kind, account in data.get("accounts", {}).items():
                balance = str(account["balance"]) if "balance" in account else None
                self.db.execute("INSERT INTO accounts VALUES (?, ?, ?)", (customer, kind, balance))
                for tx in account.get("recent_transactions", []):
                    row = (customer, kind, tx["date"], tx["description"], str(tx["amount"]))
                    self.db.execute("INSERT INTO transactions VALUES (?, ?, ?, ?, ?)", row)
            if "bank" in data:
                self.db.execute("DELETE FROM bank")
                for key, value in data["bank"].items():
                    self.db.execute("INSERT INTO bank VALUES (?, ?)", (key, json_text(value)))

    def customers(self) -> set[str]:
        return {row[0] for row in self.db.execute("SELECT id FROM customers")}

    def store(self, customer: str) -> AccountStore:
        """Customer `customer`'s accounts and the bank's figures, read now."""
        accounts = {}
        for kind, balance in self.db.execute("SELECT kind, balance FROM accounts WHERE customer_id = ?", (customer,)):
            accounts[kind] = {} if balance is None else {"balance": Decimal(balance)}
        query = "SELECT kind, date, description, amount FROM transactions WHERE customer_id = ? ORDER BY rowid"
        for kind, date, description, amount in self.db.execute(query, (customer,)):
            accounts[kind].setdefault("recent_transactions", []).append(
                {"date": date, "description": description, "amount": Decimal(amount)}
            )
        bank = {key: loads_json(value, parse_float=Decimal) for key, value in self.db.execute("SELECT * FROM bank")}
        try:
            return AccountStore({"accounts": accounts, "bank": bank}, f"{self.path} (customer {customer})")
        except AccountsError as err:  # a figure edited into the database by hand that no store may hold
            raise RuntimeError(str(err)) from None


def json_text(value) -> str:
    """`value` as JSON text, its Decimals written as the numbers they are (json.dumps cannot)."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(key)}: {json_text(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(json_text(item) for item in value) + "]"
    return json.dumps(value)


class ApiKeys:
    """API keys, each naming a customer, read from a JSON file {"KEY": "CUSTOMER", ...}. Only the keys'
    SHA-256 digests are kept, and a presented key is compared with every one of them in constant time."""

    def __init__(self, path: Path, customers: set[str]) -> None:
        try:
            keys = loads_json(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"--api-keys {path}: could not read it as JSON ({err}).") from None
        if not isinstance(keys, dict) or not keys or not all(isinstance(c, str) for c in keys.values()):
            raise UsageError(
                f'--api-keys {path} must hold a JSON object {{"KEY": "CUSTOMER", ...}} with one key or more.'
            )
        short = [key for key in keys if len(key) < MIN_KEY_LENGTH]
        if short:
            raise UsageError(
                f"--api-keys {path}: a key of {len(short[0])} characters is too easy to guess; use "
                f"{MIN_KEY_LENGTH} or more (python -c 'import secrets; print(secrets.token_urlsafe())')."
            )
        unknown = sorted(set(keys.values()) - customers)
        if unknown:
            raise UsageError(
                f"--api-keys {path} names customer {unknown[0]!r}, who is not in the accounts database; "
                "add them with --import-accounts CUSTOMER=FILE."
            )
        self._digests = [(hashlib.sha256(key.encode()).digest(), customer) for key, customer in keys.items()]

    def customer(self, key: str) -> str | None:
        """The customer `key` belongs to, or None. Every digest is compared, so the time does not say which
        key came close."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = None
        for known, customer in self._digests:
            if hmac.compare_digest(digest, known):
                found = customer
        return found
