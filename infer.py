"""Answer banking questions with a fine-tuned adapter, and evaluate it against its base model.

    python infer.py --adapter banking_assistant_lora "I lost my card"    # one answer
    python infer.py --adapter banking_assistant_lora                      # interactive prompt (quit or Ctrl-D ends)
    python infer.py --adapter banking_assistant_lora --file queries.txt   # one query per line, batched
    python infer.py --adapter banking_assistant_lora --eval               # base vs fine-tuned on the test split

Several adapters on one base model, each under a name ("base" names the base model alone):

    python infer.py --adapter retail=DIR1 --adapter business=DIR2 --use business "I lost my card"
    python infer.py --adapter retail=DIR1 --adapter business=DIR2 --file queries.jsonl --json
    python infer.py --adapter retail=DIR1 --adapter business=DIR2 --eval  # one column per adapter

A query file is either one question per line or JSON lines {"query": ..., "adapter": ...} (adapter
optional: --use's by default); its rows are batched in file order, whatever adapter each asks for, and
each row is answered by its own adapter. In the interactive prompt, `/use NAME` switches adapter.

The model writes placeholders such as [SAVINGS_BALANCE]; this script fills them from an account store
(--accounts, a bundled demo customer by default). A figure the store cannot give is never shown raw and
never made up: the answer becomes a reply saying that figure is unavailable. So does an answer holding a
number that neither the query nor the store contains.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from banking.assistant import BASE, FINE_TUNED, Assistant, Generation, answer
from banking.grounding import DEFAULT_ACCOUNTS, AccountStore
from banking.report import check_report_place, check_writable, report_paths, write_report
from data import MAX_TARGET_LEN, TEST_FILE, DataError, check_text, load_examples
from lora import AdapterError
from lora.files import loads_json
from support.cli import UsageError, run_cli, terminate_as_interrupt

DEFAULT_ADAPTER = Path("banking_assistant_lora")
MAX_NEW_TOKENS = 1024  # past this an answer is a ramble, and generation runs for minutes


def main(argv: list[str] | None = None) -> int:
    """`python infer.py ...`: answer or evaluate; the errors a user can meet become one line and an exit status.
    SIGTERM stops it as Ctrl-C does: the answers printed so far stand, and it says it was stopped."""
    args = parse_args(argv)
    with terminate_as_interrupt():
        return run_cli(lambda: run(args), failures=(AdapterError,), refusals=(DataError,))  # ModelLoadError: 2


def run(args: argparse.Namespace) -> None:
    validate_args(args)
    # Everything a user hands us is read and checked before the model loads.
    store = AccountStore.load(args.accounts)
    eval_rows = load_examples(args.eval_data)[: args.eval_limit] if args.eval else None
    file_queries = read_queries(args.file, args.use, args.adapters) if args.file is not None else None
    # Merging makes answers as cheap as the base model's, but only while one adapter answers everything.
    # Evaluation keeps the adapter apart, so lora_disabled gives the base weights exactly, not W0 + ΔW - ΔW.
    asked = {name for _, name, _ in file_queries} if file_queries else {args.use}
    merge = len(args.adapters) == 1 and BASE not in asked and not (args.no_merge or args.eval)
    assistant = Assistant(args.adapters, args.model, merge, args.precision, args.base_dtype, args.grounding)
    generation = Generation(
        args.max_new_tokens, args.num_beams, args.sample, args.temperature, args.top_p, args.top_k, args.seed
    )
    if args.eval:
        paths = report_paths(args.report_dir, args.adapters)
        write_report(assistant, eval_rows, store, generation, args.batch_size, args.samples, paths)
    elif file_queries is not None:
        for i in range(0, len(file_queries), args.batch_size):
            queries, names, contexts = zip(*file_queries[i : i + args.batch_size])
            show(answer(assistant, store, list(queries), generation, list(names), list(contexts)), args.json)
    elif args.query is not None:
        show(answer(assistant, store, [args.query.strip()], generation, [args.use], [args.context]), args.json)
    else:
        interactive(assistant, store, generation, args.use, args.json)


def show(results: list[dict], as_json: bool) -> None:
    for result in results:
        print(json.dumps(result, ensure_ascii=False) if as_json else result["response"], flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("query", nargs="?", help="the question; leave out for an interactive prompt")
    p.add_argument(
        "--adapter",
        action="append",
        metavar="[NAME=]DIR",
        help="adapter directory from train.py or PEFT (default: banking_assistant_lora); repeat as NAME=DIR to "
        "serve several adapters on one base model, each query answered by the adapter it names",
    )
    p.add_argument(
        "--use",
        metavar="NAME",
        help=f"the adapter that answers the query, the prompt's questions and the query file's lines that name "
        f"none (default: the first --adapter; '{BASE}': the base model alone)",
    )
    p.add_argument("--model", help="base model: 'tiny', a directory or a hub name (default: the adapter's own)")
    p.add_argument("--context", help="the query's context, as a training row's 'input' or 'context' gives one")
    p.add_argument("--file", type=Path, help='answer each non-empty line: a question, or JSON {"query": ...} lines '
                   '(optional "context" and "adapter")')  # fmt: skip
    p.add_argument("--json", action="store_true", help="one JSON object per answer: query, adapter, grounding, "
                   "response, raw_response, complete, latency_s (the batch's time), batch_size")  # fmt: skip
    p.add_argument(
        "--grounding",
        choices=["auto", "banking", "none"],
        default="auto",
        help="banking: fill account figures from --accounts and withhold invented ones; none: show answers as the "
        "model writes them; auto (default): banking for adapters trained on the account placeholders (their "
        "training_config.json says so) and for adapters without that record, none for the others",
    )
    p.add_argument(
        "--accounts", type=Path, default=DEFAULT_ACCOUNTS, help="account store JSON (default: bundled demo customer)"
    )
    p.add_argument(
        "--no-merge",
        action="store_true",
        help="keep the adapter apart from the weights (slower; --eval always does, to compare with the exact base)",
    )
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 on a CUDA GPU that has it, else fp32")  # fmt: skip
    p.add_argument(
        "--base-dtype",
        choices=["auto", "fp32", "bf16", "nf4"],
        default="auto",
        help="how the frozen base is stored, as in train.py: fp32 or bf16, or nf4, its linear layers in 4 bits "
        "(QLoRA) computing in --precision's dtype, the adapter unmerged; auto (default): nf4 for an adapter "
        "trained with --base-dtype nf4, else --precision's dtype",
    )
    p.add_argument("--batch-size", type=int, default=16, help="queries per batch for --file and --eval (default: 16)")
    g = p.add_argument_group("decoding (greedy by default)")
    g.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="longest answer in tokens (default: the longest answer the adapter's run trained on, else "
        f"{MAX_TARGET_LEN}); an answer cut off at this limit is withheld, with a reply that says so",
    )
    g.add_argument("--num-beams", type=int, default=1, help="beam search width (default: 1, greedy)")
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    g.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (default: 50)")
    g.add_argument("--seed", type=int, default=0, help="seed for sampling (default: 0)")
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval",
        action="store_true",
        help="evaluate base vs fine-tuned (vs each adapter, with several) on --eval-data and write a report",
    )
    e.add_argument(
        "--eval-data", type=Path, default=TEST_FILE, help="rows to evaluate on (default: bundled test split)"
    )
    e.add_argument("--eval-limit", type=int, default=None, help="evaluate only the first N rows")
    e.add_argument(
        "--report-dir",
        type=Path,
        default=None,
        help="where eval_report.md/.json go (default: <adapter>/eval; with several adapters the first one's, the "
        "files named after them: eval_report.retail+business.md); a report of other adapters there is never replaced",
    )
    e.add_argument("--samples", type=int, default=10, help="rows in the report's sample table (default: 10)")
    return p.parse_args(argv)


RESERVED_NAMES = (BASE, "query", "intent", "reference")  # a name a query or the report already gives a meaning


def parse_adapters(values: list[str]) -> dict[str, Path]:
    """--adapter values as {name: directory}: one DIR is the adapter 'fine_tuned'; several are NAME=DIR each."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return {FINE_TUNED: Path(values[0])}
    adapters = {}
    for value in values:
        name, equals, directory = value.partition("=")
        if not equals or not name.isidentifier() or not directory:
            raise UsageError(
                f"--adapter {value}: with several adapters, name each one, as in --adapter retail=DIR "
                "(a name is a Python identifier)."
            )
        if name in RESERVED_NAMES:
            raise UsageError(f"--adapter {value}: '{name}' is reserved ({BASE} is the base model); call it otherwise.")
        if name in adapters:
            raise UsageError(f"two --adapter options are named '{name}': give each adapter its own name.")
        adapters[name] = Path(directory)
    return adapters


def validate_args(args: argparse.Namespace) -> None:
    args.adapters = parse_adapters(args.adapter or [str(DEFAULT_ADAPTER)])
    args.use = args.use or next(iter(args.adapters))
    for name in ("batch_size", "max_new_tokens", "num_beams", "top_k"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.max_new_tokens is not None and args.max_new_tokens > MAX_NEW_TOKENS:
        raise UsageError(
            f"--max-new-tokens must be at most {MAX_NEW_TOKENS}, got {args.max_new_tokens}: a banking answer is "
            f"far shorter (training cuts answers at {MAX_TARGET_LEN} tokens by default)."
        )
    if args.samples < 0:
        raise UsageError(f"--samples must be 0 or more, got {args.samples}.")
    if args.sample and not (0 < args.temperature < float("inf") and 0 < args.top_p <= 1):
        raise UsageError("--temperature must be positive and finite, and --top-p in (0, 1].")
    if args.context is not None and args.query is None:
        raise UsageError('--context goes with a query on the command line (in a --file, give a line its "context").')
    if args.query is not None:
        check_text(args.query + (args.context or ""), "the query", UsageError)
    if args.query is not None and not args.query.strip():
        raise UsageError('the query is empty: ask a question, e.g. python infer.py "I lost my card".')
    if sum(x is not None and x is not False for x in (args.query, args.file, args.eval or None)) > 1:
        raise UsageError("give one of: a query, --file or --eval.")
    if args.file is not None and not args.file.is_file():
        what = "is a directory" if args.file.is_dir() else "does not exist"
        raise UsageError(f"query file {args.file} {what}: pass a text file with one question per line.")
    if args.use not in (*args.adapters, BASE):
        raise UsageError(f"--use {args.use}: no adapter has that name; use {', '.join(args.adapters)} or {BASE}.")
    report_dir = report_paths(args.report_dir, args.adapters)[0].parent
    if args.eval and report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"--report-dir {report_dir} is a file: pass a directory for eval_report.md and .json.")
    if args.eval:
        check_report_place(args.report_dir, args.adapters)
        check_writable(report_dir)  # before the evaluation's minutes, not after
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise UsageError(f"--eval-limit must be positive, got {args.eval_limit}.")


def read_queries(path: Path, default_adapter: str, adapters: dict[str, Path]) -> list[tuple[str, str, str | None]]:
    """(query, adapter name, context) for each non-empty line of a query file: a question (answered by
    `default_adapter`), or, when the first line is a JSON object, JSON lines {"query", "context"?, "adapter"?}."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UsageError(f"query file {path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"query file {path} holds no non-empty line: write one question per line.")
    if not lines[0][1].startswith("{"):  # T5's vocabulary has no "{": no question starts with one
        for number, line in lines:
            check_text(line, f"line {number} of {path}", UsageError)
        return [(line, default_adapter, None) for _, line in lines]
    queries = []
    for number, line in lines:
        where = f"line {number} of {path}"
        try:
            record = loads_json(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where} is not JSON ({err.msg}), as the file's first line is.") from None
        if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not record["query"].strip():
            raise UsageError(f'{where} is not an object with a non-empty "query" string, as in {{"query": "Hi"}}.')
        if record.keys() - {"query", "context", "adapter"}:
            raise UsageError(f'{where} has a key other than "query", "context" and "adapter": {sorted(record)}.')
        if not isinstance(record.get("context", ""), str):
            raise UsageError(f'{where}: "context" must be a string.')
        check_text(record["query"] + record.get("context", ""), f"the query on {where}", UsageError)
        adapter = record.get("adapter", default_adapter)
        if adapter not in (*adapters, BASE):
            raise UsageError(f"{where} asks for adapter {adapter!r}; use {', '.join(adapters)} or {BASE}.")
        queries.append((record["query"].strip(), adapter, record.get("context") or None))
    return queries


def interactive(assistant: Assistant, store: AccountStore, generation: Generation, adapter: str, as_json: bool) -> None:
    several = len(assistant.names) > 1
    hint = f" '/use NAME' picks the adapter ({', '.join(assistant.names)} or {BASE})." if several else ""
    print(f"Banking assistant ready. Ask a question; 'quit' or Ctrl-D ends.{hint}", file=sys.stderr)
    while True:
        try:
            prompt = (f"you ({adapter})> " if several or adapter == BASE else "you> ") if sys.stdin.isatty() else ""
            line = input(prompt).strip()  # piped input: answers alone on stdout
        except EOFError:
            print(file=sys.stderr)
            return
        if line.lower() in ("quit", "exit", "/quit", "/exit"):
            return
        if not line:
            print("(empty question: type something, or 'quit')", file=sys.stderr)
            continue
        command, _, choice = line.partition(" ")
        if command == "/use":
            choice = choice.strip()
            if choice in (*assistant.names, BASE):
                adapter = choice
                print(f"(answering with {adapter})", file=sys.stderr)
            else:
                print(f"(no adapter named {choice!r}: use {', '.join(assistant.names)} or {BASE})", file=sys.stderr)
            continue
        if command.startswith("/"):  # T5's questions never start with "/": a mistyped command, not a question
            print(f"(unknown command {command}: the commands are /use NAME and /quit)", file=sys.stderr)
            continue
        show(answer(assistant, store, [line], generation, [adapter]), as_json)


if __name__ == "__main__":
    raise SystemExit(main())
