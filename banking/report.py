"""The evaluation report of `infer.py --eval`: base against fine-tuned (or against each adapter), where it
is written, and the checks that keep it from taking another evaluation's place."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from data import TRAIN_FILE, load_examples
from lora.files import atomic_write_all, loads_json
from support.cli import UsageError
from support.run_dir import EVAL

from . import evaluation
from .assistant import BASE, Assistant, Generation
from .grounding import AccountStore


def write_report(
    assistant: Assistant,
    rows: list[dict],
    store: AccountStore,
    generation: Generation,
    batch_size: int,
    samples: int,
    paths: tuple[Path, Path],
) -> dict:
    """Base (adapter disabled) against fine-tuned on `rows`, or against each adapter when there are several,
    `batch_size` rows at a time; writes the report as JSON and markdown to `paths` (`report_paths`), with
    `samples` example answers, and prints the table.

    A response's intent is that of the most similar response in the data the adapters were trained on
    (their runs' --data), or in the bundled training split for an adapter that did not come from train.py.
    """
    intent_data = list(dict.fromkeys(config.get("data") or str(TRAIN_FILE) for config in assistant.training_configs))
    matcher = evaluation.IntentMatcher([row for path in intent_data for row in load_examples(path)])
    options = generation.options()
    models = [BASE, *assistant.names]  # one adapter is "fine_tuned"; several are named by --adapter NAME=DIR

    def generate(rows: list[dict], model: str) -> list[str]:
        queries, contexts = [row["instruction"] for row in rows], [row.get("context") for row in rows]
        return assistant.generate(queries, generation.max_new_tokens, adapters=[model] * len(rows), contexts=contexts,
                                  **options)  # fmt: skip

    report = {
        "adapter": evaluated_adapters(assistant.adapters),
        "base_model": assistant.base_path,
        "intent_reference": ", ".join(intent_data),
        **evaluation.evaluate(
            generate, rows, store, matcher, batch_size, samples, models, {m: assistant.grounded(m) for m in models}
        ),
    }
    json_path, markdown_path = paths
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


def report_paths(report_dir: Path | None, adapters: dict[str, Path]) -> tuple[Path, Path]:
    """Where --eval writes: eval_report.json and .md in `report_dir` (default: the first adapter's eval/);
    with several adapters, named after them (eval_report.retail+business.json), so that they never take
    the place of the first adapter's own report."""
    directory = report_dir or next(iter(adapters.values())) / EVAL
    stem = "eval_report" if len(adapters) == 1 else "eval_report." + "+".join(adapters)
    return directory / f"{stem}.json", directory / f"{stem}.md"


def check_report_place(report_dir: Path | None, adapters: dict[str, Path]) -> None:
    """The report is never written through a symbolic link the user did not choose (the default eval/, or a
    report file); one there already is replaced only by a new evaluation of the same adapters."""
    json_path, markdown_path = report_paths(report_dir, adapters)
    chosen = [] if report_dir is None else [report_dir]
    for path in (json_path.parent, json_path, markdown_path):
        if path.is_symlink() and path not in chosen:
            raise UsageError(
                f"{path} is a symbolic link (to {os.readlink(path)}); infer.py never writes through one: remove "
                "the link, or pass --report-dir with the directory the report should go to."
            )
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

    if resolved(previous) != resolved(evaluated_adapters(adapters)):
        raise UsageError(
            f"{json_path} holds the report of another evaluation (of {previous or 'unknown adapters'}); pass "
            "--report-dir to write this one elsewhere, or move that report away."
        )
