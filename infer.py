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
import tempfile
import time
from pathlib import Path

import torch

from data import MAX_SOURCE_LEN, MAX_TARGET_LEN, TEST_FILE, TRAIN_FILE, DataError, build_prompt, load_examples
from lora import AdapterError, load_adapter, lora_disabled, lora_layers, merge_lora, unmerge_lora
from lora.adapter_io import read_adapter
from lora.adapters import active_adapter, mixed_adapters
from support import evaluation
from support.cli import UsageError, run_cli, terminate_as_interrupt
from support.files import atomic_write_all, check_text, loads_json
from support.grounding import DEFAULT_ACCOUNTS, AccountStore, ground
from support.models import ModelLoadError, load_model_and_tokenizer, same_base_model
from support.precision import default_device, resolve_dtype
from support.run_dir import EVAL, training_config_for

BASE = "base"  # the name a query gives to be answered by the base model alone, never an adapter's
DEFAULT_ADAPTER = Path("banking_assistant_lora")
MAX_NEW_TOKENS = 1024  # past this an answer is a ramble, and generation runs for minutes


def main(argv: list[str] | None = None) -> int:
    """`python infer.py ...`: answer or evaluate; the errors a user can meet become one line and an exit status.
    SIGTERM stops it as Ctrl-C does: the answers printed so far stand, and it says it was stopped."""
    args = parse_args(argv)
    with terminate_as_interrupt():
        return run_cli(lambda: run(args), failures=(AdapterError, ModelLoadError, DataError))


def run(args: argparse.Namespace) -> None:
    validate_args(args)
    # Everything a user hands us is read and checked before the model loads.
    store = AccountStore.load(args.accounts)
    eval_rows = load_examples(args.eval_data)[: args.eval_limit] if args.eval else None
    file_queries = read_queries(args.file, args.use, args.adapters) if args.file is not None else None
    # Merging makes answers as cheap as the base model's, but only while one adapter answers everything.
    # Evaluation keeps the adapter apart, so lora_disabled gives the base weights exactly, not W0 + ΔW - ΔW.
    asked = {name for _, name in file_queries} if file_queries else {args.use}
    merge = len(args.adapters) == 1 and BASE not in asked and not (args.no_merge or args.eval)
    assistant = Assistant(args.adapters, args.model, merge=merge, precision=args.precision)
    if args.eval:
        evaluate(assistant, eval_rows, store, args)
    elif file_queries is not None:
        for i in range(0, len(file_queries), args.batch_size):
            queries, names = zip(*file_queries[i : i + args.batch_size])
            show(answer(assistant, store, list(queries), args, list(names)), args.json)
    elif args.query is not None:
        show(answer(assistant, store, [args.query.strip()], args, [args.use]), args.json)
    else:
        interactive(assistant, store, args)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class Assistant:
    """A base model with its adapters loaded, ready to answer queries.

    `adapters` is one adapter directory, or {name: directory} for several on one base model; a single
    one is merged into the weights unless merge=False. The base model is the one the adapters' configs
    name, unless `model` says otherwise. Prompts are truncated to the length the adapters were trained
    with, read from their runs' training_config.json.
    """

    def __init__(
        self,
        adapters: str | Path | dict[str, Path],
        model: str | None = None,
        merge: bool = True,
        precision: str = "auto",
    ) -> None:
        self.adapters = (
            {k: Path(v) for k, v in adapters.items()} if isinstance(adapters, dict) else {"default": Path(adapters)}
        )
        name = self._base_model_name(model)
        if (Path(name) / "adapter_config.json").is_file() and not (Path(name) / "config.json").is_file():
            raise UsageError(f"{name} is an adapter directory, not a base model: pass it as --adapter.")
        self.device = default_device()
        dtype = resolve_dtype(precision, self.device)
        configs = [training_config_for(directory) or {} for directory in self.adapters.values()]
        self.training_configs = configs
        for config, directory in zip(configs, self.adapters.values()):
            if config.get("max_source_len") is None:
                warn(
                    f"{directory} does not record the prompt length it was trained with (no training_config.json "
                    f"from train.py); prompts are cut at {MAX_SOURCE_LEN} tokens."
                )
        self.max_source_len = max(config.get("max_source_len") or MAX_SOURCE_LEN for config in configs)
        # Long enough for the longest answer an adapter was trained on (plus its </s>).
        self.max_new_tokens = max(config.get("longest_target_tokens") or MAX_TARGET_LEN for config in configs)
        self.model, self.tokenizer, self.base_path = load_model_and_tokenizer(name)
        for adapter_name, directory in self.adapters.items():
            # strict: refuses an adapter of another model size, and leaves nothing of it behind
            load_adapter(self.model, directory, name=adapter_name)
        self.names = list(self.adapters)  # in --adapter order: the first answers by default
        if merge and len(self.adapters) == 1:
            merge_lora(self.model)  # in fp32, before any cast: an answer then costs what the base model costs
        self.model.to(self.device, dtype=dtype).eval()

    def _base_model_name(self, model: str | None) -> str:
        """`model`, else the base model the adapters' configs name (refused if they name different ones).
        Each adapter's config is read and checked here, before any model loads."""
        recorded = {name: read_adapter(d)[0].get("base_model_name_or_path") for name, d in self.adapters.items()}
        if model:
            for name, base in recorded.items():
                if base and not same_base_model(model, base):
                    warn(
                        f"the adapter {self.adapters[name]} was trained on {base}; "
                        f"loading it into {model} as --model asks."
                    )
            return model
        for name, base in recorded.items():
            if not base:
                raise UsageError(f"{self.adapters[name]}/adapter_config.json names no base model: pass --model.")
        (first, base), *others = recorded.items()
        for name, other in others:
            if not same_base_model(base, other):
                raise UsageError(
                    f"adapter '{name}' was trained on {other} but '{first}' on {base}: one base model serves "
                    "every adapter; pass adapters trained on the same base model (or --model to force one)."
                )
        return base

    def generate(
        self, queries: list[str], max_new_tokens: int | None = None, base: bool = False, **options
    ) -> list[str]:
        """Raw model outputs (placeholders unfilled) for a batch of queries; base=True bypasses the adapter."""
        return [text for text, _ in self.generate_with_ends(queries, max_new_tokens, base, **options)]

    @torch.inference_mode()
    def generate_with_ends(
        self, queries, max_new_tokens=None, base=False, adapters: list[str] | None = None, **generation
    ) -> list[tuple[str, bool]]:
        """(raw output, whether it ended by itself rather than at the token limit) for each query.

        adapters[i] names the adapter that answers query i ("base": the base model); by default the
        first adapter answers every query, or none with base=True.
        """
        names = [BASE] * len(queries) if base else adapters or [self.names[0]] * len(queries)
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
        with self._answering_with(names):
            output = self.model.generate(**inputs, max_new_tokens=max_new_tokens or self.max_new_tokens, **generation)
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        ended = [bool((row[1:] == self.tokenizer.eos_token_id).any()) for row in output]
        return [(text.strip(), end) for text, end in zip(texts, ended)]

    def _answering_with(self, names: list[str]):
        """The context in which row i is answered by adapter names[i]: one adapter for the whole batch
        (merged or not), the base alone, or a mixed batch, each row's update from its own adapter."""
        unknown = sorted(set(names) - {BASE, *self.names})
        if unknown:
            raise UsageError(f"no adapter named {unknown[0]!r} is loaded: use {', '.join(self.names)} or {BASE}.")
        merged = self.names[0] if any(layer.merged for layer in lora_layers(self.model).values()) else None
        if merged and set(names) != {merged}:
            # Anything but the merged adapter needs W0 back; from here on the adapters stay apart.
            unmerge_lora(self.model)
        if set(names) == {BASE}:
            return lora_disabled(self.model)
        if len(set(names)) == 1:
            return active_adapter(self.model, names[0])
        return mixed_adapters(self.model, [None if name == BASE else name for name in names])


def generation_options(args: argparse.Namespace) -> dict:
    options = {"num_beams": args.num_beams, "do_sample": args.sample}
    if args.sample:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    return options


def answer(
    assistant: Assistant, store: AccountStore, queries: list[str], args: argparse.Namespace, adapters=None
) -> list[dict]:
    """Answers for one batch of queries, grounded in the store; adapters[i] answers query i (default: the first).

    latency_s is the time until the answer was ready: the whole batch's generation, since a batch's
    answers arrive together (batch_size says how many shared it).
    """
    adapters = adapters or [assistant.names[0]] * len(queries)
    if args.sample:
        torch.manual_seed(args.seed)
    start = time.perf_counter()
    raw = assistant.generate_with_ends(queries, args.max_new_tokens, adapters=adapters, **generation_options(args))
    if assistant.device.type == "cuda":
        torch.cuda.synchronize()
    latency = time.perf_counter() - start
    results = []
    for query, adapter, (output, complete) in zip(queries, adapters, raw):
        grounded = ground(output, query, store, complete)
        results.append(
            {
                "query": query,
                "adapter": adapter,
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
    """Base (adapter disabled) against fine-tuned on `rows`, or against each adapter when there are several;
    writes the report as JSON and markdown (`report_paths`), prints the table.

    A response's intent is that of the most similar response in the data the adapters were trained on
    (their runs' --data), or in the bundled training split for an adapter that did not come from train.py.
    """
    intent_data = list(dict.fromkeys(config.get("data") or str(TRAIN_FILE) for config in assistant.training_configs))
    matcher = evaluation.IntentMatcher([row for path in intent_data for row in load_examples(path)])
    options = generation_options(args)
    several = len(assistant.names) > 1
    models = [BASE, *assistant.names] if several else list(evaluation.MODELS)  # MODELS: base, fine_tuned

    def generate(queries: list[str], model: str) -> list[str]:
        adapter = model if several else {BASE: BASE, "fine_tuned": assistant.names[0]}[model]
        return assistant.generate(queries, args.max_new_tokens, adapters=[adapter] * len(queries), **options)

    report = {
        "adapter": evaluated_adapters(assistant.adapters),
        "base_model": assistant.base_path,
        "intent_reference": ", ".join(intent_data),
        **evaluation.evaluate(generate, rows, store, matcher, args.batch_size, args.samples, models),
    }
    json_path, markdown_path = report_paths(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    print(evaluation.metrics_markdown(report))  # shown before the write, which a full disk can fail
    atomic_write_all(
        {json_path: json.dumps(report, indent=2) + "\n", markdown_path: evaluation.report_markdown(report)}
    )
    print(f"\nreport written to {markdown_path} and {json_path}")
    return report


def check_writable(directory: Path) -> None:
    """Refuse a report directory that cannot be created or written to, before the evaluation runs."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as err:
        raise UsageError(
            f"cannot write the evaluation report in {directory} ({err.strerror or err}); pass --report-dir with "
            "a directory you can write to."
        ) from None


def evaluated_adapters(adapters: dict[str, Path]) -> str | dict[str, str]:
    """What a report records of the adapters it evaluated: the directory, or {name: directory} for several."""
    paths = {name: str(path) for name, path in adapters.items()}
    return paths if len(paths) > 1 else next(iter(paths.values()))


def report_paths(args: argparse.Namespace) -> tuple[Path, Path]:
    """Where --eval writes: eval_report.json and .md in --report-dir (default: the first adapter's eval/);
    with several adapters, named after them (eval_report.retail+business.json), so that they never take
    the place of the first adapter's own report."""
    directory = args.report_dir or next(iter(args.adapters.values())) / EVAL
    stem = "eval_report" if len(args.adapters) == 1 else "eval_report." + "+".join(args.adapters)
    return directory / f"{stem}.json", directory / f"{stem}.md"


def check_report_place(args: argparse.Namespace) -> None:
    """A report there already is replaced only by a new evaluation of the same adapters."""
    json_path, _ = report_paths(args)
    if not json_path.is_file():
        return
    try:
        previous = loads_json(json_path.read_text(encoding="utf-8")).get("adapter")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        previous = None

    def resolved(adapters):
        if isinstance(adapters, dict):
            return {name: str(Path(path).resolve()) for name, path in adapters.items()}
        return str(Path(adapters).resolve()) if isinstance(adapters, str) else adapters

    if resolved(previous) != resolved(evaluated_adapters(args.adapters)):
        raise UsageError(
            f"{json_path} holds the report of another evaluation (of {previous or 'unknown adapters'}); pass "
            "--report-dir to write this one elsewhere, or move that report away."
        )


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
    p.add_argument(
        "--model",
        default=None,
        help="base model: 'tiny', a directory or a hub name (default: the adapter's base_model_name_or_path)",
    )
    p.add_argument(
        "--file",
        type=Path,
        help='answer each non-empty line of this file: a question, or JSON {"query": ..., "adapter": ...}',
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per answer: query, adapter, response, raw_response, latency_s (the batch's time), "
        "batch_size",
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
    """--adapter values as {name: directory}: one DIR is the adapter 'default'; several are NAME=DIR each."""
    if len(values) == 1 and ("=" not in values[0] or Path(values[0]).exists()):
        return {"default": Path(values[0])}
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
    if args.query is not None:
        check_text(args.query, "the query", UsageError)
    if args.query is not None and not args.query.strip():
        raise UsageError('the query is empty: ask a question, e.g. python infer.py "I lost my card".')
    if sum(x is not None and x is not False for x in (args.query, args.file, args.eval or None)) > 1:
        raise UsageError("give one of: a query, --file or --eval.")
    if args.file is not None and not args.file.is_file():
        what = "is a directory" if args.file.is_dir() else "does not exist"
        raise UsageError(f"query file {args.file} {what}: pass a text file with one question per line.")
    if args.use not in (*args.adapters, BASE):
        raise UsageError(f"--use {args.use}: no adapter has that name; use {', '.join(args.adapters)} or {BASE}.")
    report_dir = report_paths(args)[0].parent
    if args.eval and report_dir.exists() and not report_dir.is_dir():
        raise UsageError(f"--report-dir {report_dir} is a file: pass a directory for eval_report.md and .json.")
    if args.eval:
        check_report_place(args)
        check_writable(report_dir)  # before the evaluation's minutes, not after
    if args.eval_limit is not None and args.eval_limit <= 0:
        raise UsageError(f"--eval-limit must be positive, got {args.eval_limit}.")


def read_queries(path: Path, default_adapter: str, adapters: dict[str, Path]) -> list[tuple[str, str]]:
    """(query, adapter name) for each non-empty line of a query file: a question (answered by
    `default_adapter`), or, when the first line is a JSON object, JSON lines {"query": ..., "adapter": ...}."""
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
        return [(line, default_adapter) for _, line in lines]
    queries = []
    for number, line in lines:
        where = f"line {number} of {path}"
        try:
            record = loads_json(line)
        except json.JSONDecodeError as err:
            raise UsageError(f"{where} is not JSON ({err.msg}), as the file's first line is.") from None
        if not isinstance(record, dict) or not isinstance(record.get("query"), str) or not record["query"].strip():
            raise UsageError(f'{where} is not an object with a non-empty "query" string, as in {{"query": "Hi"}}.')
        if record.keys() - {"query", "adapter"}:
            raise UsageError(f'{where} has a key other than "query" and "adapter": {sorted(record.keys())}.')
        check_text(record["query"], f"the query on {where}", UsageError)
        adapter = record.get("adapter", default_adapter)
        if adapter not in (*adapters, BASE):
            raise UsageError(f"{where} asks for adapter {adapter!r}; use {', '.join(adapters)} or {BASE}.")
        queries.append((record["query"].strip(), adapter))
    return queries


def interactive(assistant: Assistant, store: AccountStore, args: argparse.Namespace) -> None:
    several = len(assistant.names) > 1
    hint = f" '/use NAME' picks the adapter ({', '.join(assistant.names)} or {BASE})." if several else ""
    print(f"Banking assistant ready. Ask a question; 'quit' or Ctrl-D ends.{hint}", file=sys.stderr)
    adapter = args.use
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
        show(answer(assistant, store, [line], args, [adapter]), args.json)


if __name__ == "__main__":
    raise SystemExit(main())
