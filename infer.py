"""Answer banking questions with a fine-tuned adapter, and evaluate it against its base model.

    python infer.py --adapter banking_assistant_lora "I lost my card"    # one answer
    python infer.py --adapter banking_assistant_lora                      # interactive prompt (quit or Ctrl-D ends)
    python infer.py --adapter banking_assistant_lora --file queries.txt   # one query per line, batched
    python infer.py --adapter banking_assistant_lora --eval               # base vs fine-tuned on the test split

The model writes placeholders such as [SAVINGS_BALANCE]; this script fills them from an account store
(--accounts, a bundled demo customer by default). A figure the store cannot give is never shown raw and
never made up: the answer becomes a reply saying that figure is unavailable. So does an answer holding a
number that neither the query nor the store contains.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data import (
    MAX_SOURCE_LEN,
    TEST_FILE,
    TRAIN_FILE,
    DataError,
    ModelLoadError,
    build_prompt,
    load_examples,
    load_model_and_tokenizer,
)
from data.dataset import DATA_DIR
from lora import AdapterError, load_adapter, lora_disabled, merge_lora
from lora.adapter_io import atomic_write_text, read_adapter_config

DEFAULT_ACCOUNTS = DATA_DIR / "accounts_demo.json"
UNAVAILABLE = (
    "I'm sorry, I can't give you that figure right now because it isn't available in your account "
    "records. Please check the mobile app or call our support line."
)
REFUSAL_MARKER = "i can only help with banking"  # every out-of-domain answer in the dataset says this
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
BRACKETED = re.compile(r"\[([^\[\]]*)\]")
PLACEHOLDER_NAME = re.compile(r"[A-Z0-9_]+")


class UsageError(ValueError):
    """A command line or query we refuse before generating."""


class AccountsError(ValueError):
    """An account store file that cannot be used."""


# ---------------------------------------------------------------------------------------------------------
# Grounded figures: placeholders in, account-store values out.


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


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


# ---------------------------------------------------------------------------------------------------------
# The assistant: base model + adapter, merged.


def resolve_device_and_dtype(precision: str) -> tuple[torch.device, torch.dtype]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return device, {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


class Assistant:
    """A base model with an adapter loaded (and merged unless merge=False), ready to answer queries."""

    def __init__(
        self, adapter_dir: str | Path, model: str | None = None, merge: bool = True, precision: str = "auto"
    ) -> None:
        config = read_adapter_config(adapter_dir)
        recorded = config.get("base_model_name_or_path")
        name = model or recorded
        if not name:
            raise UsageError(f"{adapter_dir}/adapter_config.json names no base model: pass --model.")
        if model and recorded and model != recorded and not (model == "tiny" and "tiny-t5-" in recorded):
            warn(f"the adapter was trained on {recorded}; loading it into {model} as --model asks.")
        self.model, self.tokenizer, self.base_path = load_model_and_tokenizer(name)
        self.adapted = load_adapter(self.model, adapter_dir)  # strict: refuses an adapter of another model
        self.device, dtype = resolve_device_and_dtype(precision)
        if merge:
            merge_lora(self.model)  # in fp32, before any cast: an answer then costs what the base model costs
        self.model.to(self.device, dtype=dtype).eval()

    @torch.inference_mode()
    def generate(self, queries: list[str], max_new_tokens: int = 64, base: bool = False, **generation) -> list[str]:
        """Raw model outputs (placeholders unfilled) for a batch of queries; base=True bypasses the adapter."""
        prompts = [build_prompt(q) for q in queries]
        lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
        for query, length in zip(queries, lengths):
            if length > MAX_SOURCE_LEN:
                warn(f"the query is {length} tokens long; only its first {MAX_SOURCE_LEN} are read: {query[:40]!r}...")
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=MAX_SOURCE_LEN
        ).to(self.device)
        with lora_disabled(self.model) if base else nullcontext():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **generation)
        return [text.strip() for text in self.tokenizer.batch_decode(output, skip_special_tokens=True)]


def generation_options(args: argparse.Namespace) -> dict:
    options = {"num_beams": args.num_beams, "do_sample": args.sample}
    if args.sample:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return options


def answer(assistant: Assistant, store: AccountStore, queries: list[str], args: argparse.Namespace) -> list[dict]:
    if args.sample:
        torch.manual_seed(args.seed)
    start = time.perf_counter()
    raw = assistant.generate(queries, args.max_new_tokens, **generation_options(args))
    if assistant.device.type == "cuda":
        torch.cuda.synchronize()
    latency = (time.perf_counter() - start) / len(queries)
    results = []
    for query, output in zip(queries, raw):
        response, problems = store.fill(output)
        invented = invented_numbers(response, query, store)
        if invented:  # a figure neither the user nor the store gave: the model made it up
            response, problems = UNAVAILABLE, [f"number(s) {sorted(invented)} found in neither the query nor the store"]
        results.append(
            {
                "query": query,
                "response": response,
                "raw_response": output,
                "latency_s": round(latency, 4),
                **({"withheld_because": problems} if problems else {}),
            }
        )
    return results


def show(results: list[dict], as_json: bool) -> None:
    for result in results:
        print(json.dumps(result, ensure_ascii=False) if as_json else result["response"], flush=True)


# ---------------------------------------------------------------------------------------------------------
# Evaluation: base (adapter disabled) against fine-tuned, on the held-out test split.


def normalize(text: str) -> list[str]:
    return re.sub(r"[^\w\[\]\s]", " ", text.lower()).split()


def exact_match(prediction: str, reference: str) -> bool:
    return " ".join(prediction.split()) == " ".join(reference.split())


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style F1 over lower-cased word tokens (punctuation dropped, placeholders kept whole)."""
    pred, ref = normalize(prediction), normalize(reference)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class IntentMatcher:
    """Recognises a response's intent: the intent of the most similar training response (token F1),
    or None when nothing in the training set is at least `threshold` similar."""

    def __init__(self, rows: list[dict], threshold: float = 0.5) -> None:
        self.responses = sorted({(row["response"], row["intent"]) for row in rows if row.get("intent")})
        self.threshold = threshold

    def __call__(self, response: str) -> str | None:
        score, intent = max(
            ((token_f1(response, known), intent) for known, intent in self.responses), default=(0.0, None)
        )
        return intent if score >= self.threshold else None


def is_refusal(response: str) -> bool:
    return REFUSAL_MARKER in response.lower()


def score(rows: list[dict], outputs: list[str], store: AccountStore, matcher: IntentMatcher) -> dict:
    """The metrics of one model's raw outputs against the reference rows."""
    n = len(rows)
    out_of_domain = [i for i, row in enumerate(rows) if row.get("intent") == "out_of_domain"]
    in_domain = sorted(set(range(n)) - set(out_of_domain))
    answers = [store.fill(output)[0] for output in outputs]
    return {
        "exact_match": sum(exact_match(o, r["response"]) for o, r in zip(outputs, rows)) / n,
        "token_f1": sum(token_f1(o, r["response"]) for o, r in zip(outputs, rows)) / n,
        "intent_accuracy": sum(matcher(o) == r.get("intent") for o, r in zip(outputs, rows)) / n,
        "refusal_rate_out_of_domain": (
            sum(is_refusal(outputs[i]) for i in out_of_domain) / len(out_of_domain) if out_of_domain else None
        ),
        "refusal_rate_in_domain": sum(is_refusal(outputs[i]) for i in in_domain) / len(in_domain)
        if in_domain
        else None,
        "invented_figure_rate": sum(bool(invented_numbers(a, r["instruction"], store)) for a, r in zip(answers, rows))
        / n,
        "unfillable_placeholder_rate": sum(a == UNAVAILABLE for a in answers) / n,
    }


def evaluate(assistant: Assistant, rows: list[dict], store: AccountStore, args: argparse.Namespace) -> dict:
    matcher = IntentMatcher(load_examples(TRAIN_FILE))
    outputs = {"base": [], "fine_tuned": []}
    batches = [rows[i : i + args.batch_size] for i in range(0, len(rows), args.batch_size)]
    for batch in tqdm(batches, desc="evaluating", unit="batch", file=sys.stderr):
        queries = [row["instruction"] for row in batch]
        outputs["fine_tuned"] += assistant.generate(queries, args.max_new_tokens, **generation_options(args))
        outputs["base"] += assistant.generate(queries, args.max_new_tokens, base=True, **generation_options(args))
    metrics = {name: score(rows, outs, store, matcher) for name, outs in outputs.items()}
    samples = [
        {
            "query": rows[i]["instruction"],
            "intent": rows[i].get("intent"),
            "reference": rows[i]["response"],
            "base": store.fill(outputs["base"][i])[0],
            "fine_tuned": store.fill(outputs["fine_tuned"][i])[0],
        }
        for i in _sample_indices(rows, args.samples)
    ]
    return {
        "adapter": str(args.adapter),
        "base_model": assistant.base_path,
        "test_rows": len(rows),
        "metrics": metrics,
        "samples": samples,
        "notes": {
            "exact_match": "raw output equals the reference response, placeholders included",
            "intent_accuracy": "intent of the most similar training response (token F1 >= 0.5)",
            "refusal": f"the answer contains '{REFUSAL_MARKER}'",
            "invented_figure_rate": "answers holding a number found neither in the query nor the account store",
        },
    }


def _sample_indices(rows: list[dict], count: int) -> list[int]:
    """One row per intent first, so the sample table shows the range of the data."""
    first_of_intent = {}
    for i, row in enumerate(rows):
        first_of_intent.setdefault(row.get("intent"), i)
    chosen = list(first_of_intent.values())[:count]
    return chosen + [i for i in range(len(rows)) if i not in chosen][: count - len(chosen)]


def report_markdown(report: dict) -> str:
    m = report["metrics"]

    def cell(value):
        return "n/a" if value is None else f"{value:.1%}"

    lines = [
        "# Evaluation: base vs fine-tuned\n",
        f"Adapter `{report['adapter']}` on base `{report['base_model']}`, {report['test_rows']} held-out test rows.\n",
        "| metric | base | fine_tuned |",
        "| --- | --- | --- |",
    ]
    for key in m["base"]:
        lines.append(f"| {key} | {cell(m['base'][key])} | {cell(m['fine_tuned'][key])} |")
    lines += ["", "| query | base answer | fine-tuned answer | reference |", "| --- | --- | --- | --- |"]
    for s in report["samples"]:
        lines.append(
            "| " + " | ".join(s[k].replace("|", "\\|") for k in ("query", "base", "fine_tuned", "reference")) + " |"
        )
    lines += ["", *(f"- {k}: {v}" for k, v in report["notes"].items())]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="infer.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("query", nargs="?", help="the question; leave out for an interactive prompt")
    p.add_argument(
        "--adapter",
        type=Path,
        default=Path("banking_assistant_lora"),
        help="adapter directory from train.py or PEFT (default: banking_assistant_lora)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="base model: 'tiny', a directory or a hub name (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument("--file", type=Path, help="answer each non-empty line of this file")
    p.add_argument(
        "--json", action="store_true", help="one JSON object per answer: query, response, raw_response, latency_s"
    )
    p.add_argument(
        "--accounts", type=Path, default=DEFAULT_ACCOUNTS, help="account store JSON (default: bundled demo customer)"
    )
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="keep the adapter apart from the weights (slower; --eval always does, to compare with the exact base)",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 on a CUDA GPU that has it, else fp32",
    )
    p.add_argument("--batch-size", type=int, default=16, help="queries per batch for --file and --eval (default: 16)")
    g = p.add_argument_group("decoding (greedy by default)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest answer in tokens (default: 64)")
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval", action="store_true", help="evaluate base vs fine-tuned on --eval-data and write a report")
    e.add_argument(
        "--eval-data", type=Path, default=TEST_FILE, help="rows to evaluate on (default: bundled test split)"
    )
    e.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N rows")
    e.add_argument(
        "--report-dir", type=Path, default=None, help="where eval_report.md/.json go (default: <adapter>/eval)"
    )
    e.add_argument("--samples", type=int, default=10, help="rows in the report's sample table (default: 10)")
    return p.parse_args(argv)


def validate_args(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_new_tokens", "num_beams", "top_k"):
        if getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.sample and not (args.temperature > 0 and 0 < args.top_p <= 1):
        raise UsageError("--temperature must be positive and --top-p in (0, 1].")
    if args.query is not None and not args.query.strip():
        raise UsageError('the query is empty: ask a question, e.g. python infer.py "I lost my card".')
    if sum(x is not None and x is not False for x in (args.query, args.file, args.eval or None)) > 1:
        raise UsageError("give one of: a query, --file or --eval.")
    if args.file is not None and not args.file.is_file():
        raise UsageError(f"query file {args.file} does not exist.")
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise UsageError(f"--eval-limit must be positive, got {args.eval_limit}.")


def read_queries(path: Path) -> list[str]:
    """The non-empty lines of a query file, stripped."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UsageError(f"query file {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise UsageError(f"query file {path} holds no non-empty line: write one question per line.")
    return queries


def interactive(assistant: Assistant, store: AccountStore, args: argparse.Namespace) -> None:
    print("Banking assistant ready. Ask a question; 'quit' or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("you> " if sys.stdin.isatty() else "")  # piped input: answers alone on stdout
        except EOFError:
            print(file=sys.stderr)
            return
        if line.strip().lower() in ("quit", "exit"):
            return
        if not line.strip():
            print("(empty question: type something, or 'quit')", file=sys.stderr)
            continue
        show(answer(assistant, store, [line.strip()], args), args.json)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        validate_args(args)
        store = AccountStore.load(args.accounts)
        eval_rows = load_examples(args.eval_data)[: args.eval_limit] if args.eval else None
        file_queries = read_queries(args.file) if args.file is not None else None  # before the model loads
        # Evaluation keeps the adapter apart, so lora_disabled gives the base weights exactly, not W0 + ΔW - ΔW.
        assistant = Assistant(
            args.adapter, args.model, merge=not (args.no_merge or args.eval), precision=args.precision
        )
        if args.eval:
            report = evaluate(assistant, eval_rows, store, args)
            report_dir = args.report_dir or args.adapter / "eval"
            report_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(report_dir / "eval_report.json", json.dumps(report, indent=2) + "\n")
            atomic_write_text(report_dir / "eval_report.md", report_markdown(report))
            print(report_markdown(report).split("\n\n| query")[0])
            print(f"\nreport written to {report_dir / 'eval_report.md'} and {report_dir / 'eval_report.json'}")
        elif file_queries is not None:
            for i in range(0, len(file_queries), args.batch_size):
                show(answer(assistant, store, file_queries[i : i + args.batch_size], args), args.json)
        elif args.query is not None:
            show(answer(assistant, store, [args.query.strip()], args), args.json)
        else:
            interactive(assistant, store, args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (AdapterError, ModelLoadError, DataError, AccountsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    cli()
