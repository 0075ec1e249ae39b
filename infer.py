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
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from data import MAX_SOURCE_LEN, MAX_TARGET_LEN, TEST_FILE, TRAIN_FILE, DataError, build_prompt, load_examples
from lora import AdapterError, load_adapter, lora_disabled, merge_lora
from lora.adapter_io import read_adapter
from support import evaluation
from support.cli import UsageError, run_cli
from support.files import atomic_write_text
from support.grounding import DEFAULT_ACCOUNTS, AccountStore, ground
from support.models import ModelLoadError, load_model_and_tokenizer, same_base_model
from support.precision import default_device, resolve_dtype
from support.run_dir import EVAL, training_config_for


def main(argv: list[str] | None = None) -> int:
    """`python infer.py ...`: answer or evaluate; the errors a user can meet become one line and an exit status."""
    args = parse_args(argv)
    return run_cli(lambda: run(args), failures=(AdapterError, ModelLoadError, DataError))


def run(args: argparse.Namespace) -> None:
    validate_args(args)
    # Everything a user hands us is read and checked before the model loads.
    store = AccountStore.load(args.accounts)
    eval_rows = load_examples(args.eval_data)[: args.eval_limit] if args.eval else None
    file_queries = read_queries(args.file) if args.file is not None else None
    # Evaluation keeps the adapter apart, so lora_disabled gives the base weights exactly, not W0 + ΔW - ΔW.
    assistant = Assistant(args.adapter, args.model, merge=not (args.no_merge or args.eval), precision=args.precision)
    if args.eval:
        evaluate(assistant, eval_rows, store, args)
    elif file_queries is not None:
        for i in range(0, len(file_queries), args.batch_size):
            show(answer(assistant, store, file_queries[i : i + args.batch_size], args), args.json)
    elif args.query is not None:
        show(answer(assistant, store, [args.query.strip()], args), args.json)
    else:
        interactive(assistant, store, args)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Assistant:
    """A base model with an adapter loaded (and merged unless merge=False), ready to answer queries.

    The base model is the one the adapter's config names, unless `model` says otherwise. Prompts are
    truncated to the length the adapter was trained with, read from its run's training_config.json.
    """

    def __init__(
        self, adapter_dir: str | Path, model: str | None = None, merge: bool = True, precision: str = "auto"
    ) -> None:
        config, _ = read_adapter(adapter_dir)  # a damaged adapter is refused before the base model loads
        recorded = config.get("base_model_name_or_path")
        name = model or recorded
        if not name:
            raise UsageError(f"{adapter_dir}/adapter_config.json names no base model: pass --model.")
        if (Path(name) / "adapter_config.json").is_file() and not (Path(name) / "config.json").is_file():
            raise UsageError(f"{name} is an adapter directory, not a base model: pass it as --adapter.")
        if model and recorded and not same_base_model(model, recorded):
            warn(f"the adapter was trained on {recorded}; loading it into {model} as --model asks.")
        self.device = default_device()
        dtype = resolve_dtype(precision, self.device)
        self.training_config = training_config_for(Path(adapter_dir))
        self.max_source_len = (self.training_config or {}).get("max_source_len")
        if self.max_source_len is None:
            self.max_source_len = MAX_SOURCE_LEN
            warn(
                f"{adapter_dir} does not record the prompt length it was trained with (no training_config.json "
                f"from train.py); prompts are cut at {MAX_SOURCE_LEN} tokens."
            )
        # Long enough for the longest answer the adapter was trained on (plus its </s>).
        self.max_new_tokens = (self.training_config or {}).get("longest_target_tokens") or MAX_TARGET_LEN
        self.model, self.tokenizer, self.base_path = load_model_and_tokenizer(name)
        self.adapted = load_adapter(self.model, adapter_dir)  # strict: refuses an adapter of another model
        if merge:
            merge_lora(self.model)  # in fp32, before any cast: an answer then costs what the base model costs
        self.model.to(self.device, dtype=dtype).eval()

    def generate(
        self, queries: list[str], max_new_tokens: int | None = None, base: bool = False, **options
    ) -> list[str]:
        """Raw model outputs (placeholders unfilled) for a batch of queries; base=True bypasses the adapter."""
        return [text for text, _ in self.generate_with_ends(queries, max_new_tokens, base, **options)]

    @torch.inference_mode()
    def generate_with_ends(self, queries, max_new_tokens=None, base=False, **generation) -> list[tuple[str, bool]]:
        """(raw output, whether it ended by itself rather than at the token limit) for each query."""
        prompts = [build_prompt(q) for q in queries]
        lengths = [len(ids) for ids in self.tokenizer(prompts).input_ids]
        for query, length in zip(queries, lengths):
            if length > self.max_source_len:
                warn(
                    f"the query is {length} tokens long; only its first {self.max_source_len} are read: "
                    f"{query[:40]!r}..."
                )
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_source_len
        ).to(self.device)
        with lora_disabled(self.model) if base else nullcontext():
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, **generation)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        ended = [bool((row[1:] == self.tokenizer.eos_token_id).any()) for row in output]
        return [(text.strip(), end) for text, end in zip(texts, ended)]


def generation_options(args: argparse.Namespace) -> dict:
    options = {"num_beams": args.num_beams, "do_sample": args.sample}
    if args.sample:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return options


def answer(assistant: Assistant, store: AccountStore, queries: list[str], args: argparse.Namespace) -> list[dict]:
    """Answers for one batch of queries, grounded in the store.

    latency_s is the time until the answer was ready: the whole batch's generation, since a batch's
    answers arrive together (batch_size says how many shared it).
    """
    if args.sample:
        torch.manual_seed(args.seed)
    start = time.perf_counter()
    raw = assistant.generate_with_ends(queries, args.max_new_tokens, **generation_options(args))
    if assistant.device.type == "cuda":
        torch.cuda.synchronize()
    latency = time.perf_counter() - start
    results = []
    for query, (output, complete) in zip(queries, raw):
        grounded = ground(output, query, store, complete)
        results.append(
            {
                "query": query,
                "response": grounded.response,
                "raw_response": output,
                "latency_s": round(latency, 4),
                "batch_size": len(queries),
                **({"withheld_because": grounded.problems} if grounded.problems else {}),
            }
        )
    return results


def show(results: list[dict], as_json: bool) -> None:
    for result in results:
        print(json.dumps(result, ensure_ascii=False) if as_json else result["response"], flush=True)


def evaluate(assistant: Assistant, rows: list[dict], store: AccountStore, args: argparse.Namespace) -> dict:
    """Base (adapter disabled) against fine-tuned on `rows`; writes eval_report.json and .md, prints the table.

    A response's intent is that of the most similar response in the data the adapter was trained on
    (its run's --data), or in the bundled training split when the adapter did not come from train.py.
    """
    intent_data = (assistant.training_config or {}).get("data") or str(TRAIN_FILE)
    matcher = evaluation.IntentMatcher(load_examples(intent_data))
    options = generation_options(args)
    report = {
        "adapter": str(args.adapter),
        "base_model": assistant.base_path,
        "intent_reference": intent_data,
        **evaluation.evaluate(
            lambda queries, base: assistant.generate(queries, args.max_new_tokens, base=base, **options),
            rows,
            store,
            matcher,
            args.batch_size,
            args.samples,
        ),
    }
    report_dir = args.report_dir or args.adapter / EVAL
    report_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(report_dir / "eval_report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(report_dir / "eval_report.md", evaluation.report_markdown(report))
    print(evaluation.metrics_markdown(report))
    print(f"\nreport written to {report_dir / 'eval_report.md'} and {report_dir / 'eval_report.json'}")
    return report


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
        "--json",
        action="store_true",
        help="one JSON object per answer: query, response, raw_response, latency_s (the batch's time), batch_size",
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
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}.")
    if args.samples < 0:
        raise UsageError(f"--samples must be 0 or more, got {args.samples}.")
    if args.sample and not (0 < args.temperature < float("inf") and 0 < args.top_p <= 1):
        raise UsageError("--temperature must be positive and finite, and --top-p in (0, 1].")
    if args.query is not None and not args.query.strip():
        raise UsageError('the query is empty: ask a question, e.g. python infer.py "I lost my card".')
    if sum(x is not None and x is not False for x in (args.query, args.file, args.eval or None)) > 1:
        raise UsageError("give one of: a query, --file or --eval.")
    if args.file is not None and not args.file.is_file():
        what = "is a directory" if args.file.is_dir() else "does not exist"
        raise UsageError(f"query file {args.file} {what}: pass a text file with one question per line.")
    report_dir = args.report_dir or args.adapter / EVAL
    if args.eval and report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"--report-dir {report_dir} is a file: pass a directory for eval_report.md and .json.")
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise UsageError(f"--eval-limit must be positive, got {args.eval_limit}.")


def read_queries(path: Path) -> list[str]:
    """The non-empty lines of a query file, stripped."""
    try:
        text = path.read_text(encoding="utf-8-sig")
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


if __name__ == "__main__":
    raise SystemExit(main())
