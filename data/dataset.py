"""Loading, the prompt format, tokenisation and collation; which rows each step trains on is in batches.py."""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lora.files import loads_json

from .batches import LengthBucketSampler, StepPlan

DATA_DIR = Path(__file__).resolve().parent
TRAIN_FILE = DATA_DIR / "banking_train.jsonl"
VALIDATION_FILE = DATA_DIR / "banking_validation.jsonl"
TEST_FILE = DATA_DIR / "banking_test.jsonl"
IGNORE_INDEX = -100  # label value cross-entropy skips: padding never enters the loss
MAX_SOURCE_LEN = 128  # both cover the longest bundled row with room to spare (flan-t5 and tiny tokenizers)
MAX_TARGET_LEN = 128


class DataError(ValueError):
    """A data file that cannot be used as it is; the message names the file and the row."""


def check_text(value: str, where: str, error: type[Exception] = ValueError) -> None:
    """Refuse, raising `error`, a string that is not text: a lone surrogate (JSON's "\\ud800", or bytes that
    are not UTF-8 in a command line) cannot be encoded, and the tokenizer would fail on it deep inside."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise error(
            f"{where} holds {value[err.start : err.end].encode('unicode_escape').decode()}, which is not a "
            "character (a lone surrogate, or bytes that are not UTF-8): fix the text."
        ) from None


def build_prompt(instruction: str, context: str | None = None) -> str:
    """The encoder input for a request, the one format used by training and inference alike: the instruction,
    then its context when a row has one (Alpaca's `input`, Dolly's `context`)."""
    prompt = f"Instruction: {instruction.strip()}"
    return f"{prompt} Context: {context.strip()}" if context and context.strip() else prompt


# A row's fields: what becomes the prompt, what the target, and the labels the project reads but never trains on.
# Alpaca's {"instruction", "input", "output"} and Dolly's {"instruction", "context", "response", "category"}
# are read as they are: `input` is the context, `output` the response.
TARGET_FIELDS = ("response", "output")
CONTEXT_FIELDS = ("context", "input")
LABEL_FIELDS = ("intent", "template")  # the evaluation's intent, the bundled data's phrasing template
NEAR_MISSES = {  # a field users name otherwise, and the one it is read as once renamed
    "instruction": ("question", "prompt", "query", "text", "user"),
    "response": ("answer", "completion", "target", "reply", "assistant"),
}


def load_examples(path: str | Path) -> list[dict]:
    """Read rows from JSONL or from a JSON array: ours {"instruction", "response"}, Alpaca's {"instruction",
    "input", "output"} or Dolly's {"instruction", "context", "response"}, each as read_row puts it.

    Every row is checked; a bad one is a DataError naming the file and the line (JSONL) or index (array). A
    field no row format reads is named in a warning, never dropped in silence.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"data file {path} is a directory: pass a JSONL file or a JSON array of rows.")
    if not path.is_file():
        raise DataError(f"data file {path} does not exist.")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is allowed
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    if text.lstrip().startswith("["):
        try:
            array = loads_json(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}.") from None
        rows = [(f"index {i}", row) for i, row in enumerate(array)]
    else:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((f"line {number}", loads_json(line)))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {number}: invalid JSON ({err.msg}, column {err.colno}).") from None
    if not rows:
        raise DataError(
            f'{path} holds no rows: expected JSONL or a JSON array of {{"instruction": ..., "response": ...}} objects.'
        )
    examples, unused = [], {}
    for where, row in rows:
        examples.append({**read_row(row, f"{path}, {where}"), "row": where})  # "line 12": for the warnings
        for field in row.keys() - {"instruction", *TARGET_FIELDS, *CONTEXT_FIELDS, *LABEL_FIELDS}:
            unused[field] = unused.get(field, 0) + 1
    if unused:
        named = ", ".join(f"'{field}' ({count} rows)" for field, count in sorted(unused.items()))
        warnings.warn(
            f"{path}: field(s) {named} are not read: only 'instruction', 'input' or 'context', 'response' or "
            "'output', and the labels 'intent' and 'template' are (see docs/your-data.md).",
            stacklevel=2,
        )
    return examples


def read_row(row, where: str) -> dict:
    """One row in the project's own form, {"instruction", "context"?, "response", "intent"?, "template"?}, from
    ours, Alpaca's or Dolly's; a field missing, of the wrong type, empty, or given twice is a DataError.
    (load_examples adds "row", where the row is in its file: "line 12" or "index 11".)"""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with 'instruction' and 'response', got {type(row).__name__}.")
    targets = [field for field in TARGET_FIELDS if field in row]
    contexts = [field for field in CONTEXT_FIELDS if field in row]
    for given, what in ((targets, "answer"), (contexts, "context")):
        if len(given) > 1:
            raise DataError(f"{where}: '{given[0]}' and '{given[1]}' both give the {what}: keep one of them.")
    example = {}
    for field, name in (("instruction", "instruction"), (targets[0] if targets else "response", "response")):
        value = row.get(field)
        if not isinstance(value, str):
            if field not in row:
                near = [other for other in NEAR_MISSES[name] if other in row]
                hint = f"; '{near[0]}' found: rename it to '{field}'" if near else ""
                problem = f"is missing{hint}" if name == "instruction" else f"is missing (nor is 'output'){hint}"
                raise DataError(f"{where}: '{field}' {problem}.")
            raise DataError(f"{where}: '{field}' must be a string, got {type(value).__name__}.")
        if not value.strip():
            raise DataError(f"{where}: '{field}' is empty.")
        check_text(value, f"{where}: '{field}'", DataError)
        example[name] = value
    if contexts:
        context = row[contexts[0]]
        if not isinstance(context, str):
            raise DataError(f"{where}: '{contexts[0]}' must be a string, got {type(context).__name__}.")
        check_text(context, f"{where}: '{contexts[0]}'", DataError)
        if context.strip():  # Alpaca's rows without one carry "input": ""
            example["context"] = context
    for label in LABEL_FIELDS:
        if label in row:
            if not isinstance(row[label], str):
                raise DataError(f"{where}: '{label}' must be a string, got {type(row[label]).__name__}.")
            example[label] = row[label]
    return example


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]


def encode_examples(
    examples: Sequence[dict], tokenizer, max_source_len: int = MAX_SOURCE_LEN, max_target_len: int = MAX_TARGET_LEN
) -> tuple[list[EncodedExample], int]:
    """Tokenise prompts and responses; return the encoded rows and how many rows were truncated.

    A truncated sequence keeps its final </s> so the model still learns where an answer ends.
    """
    if not examples:
        return [], 0
    sources = tokenizer([build_prompt(ex["instruction"], ex.get("context")) for ex in examples]).input_ids
    targets = tokenizer([ex["response"] for ex in examples]).input_ids
    encoded, truncated = [], 0
    for source, target in zip(sources, targets):
        cut_source, cut_target = _truncate(source, max_source_len), _truncate(target, max_target_len)
        truncated += cut_source is not source or cut_target is not target
        encoded.append(EncodedExample(cut_source, cut_target))
    return encoded, truncated


def _truncate(ids: list[int], max_len: int) -> list[int]:
    return ids if len(ids) <= max_len else ids[: max_len - 1] + ids[-1:]


def collate(batch: Sequence[EncodedExample], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Pad a batch to its own longest row (rounded up to `pad_to_multiple_of`).

    input_ids (B, S) padded with pad_token_id, attention_mask (B, S), labels (B, T) padded with -100,
    decoder_input_ids (B, T): the labels shifted right behind T5's start token, which is its pad token
    (what T5 builds from labels itself; passing them means the model computes no loss of its own).
    """

    def padded_length(lengths):
        longest = max(lengths)
        return longest if not pad_to_multiple_of else math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of

    source_len = padded_length([len(ex.input_ids) for ex in batch])
    target_len = padded_length([len(ex.labels) for ex in batch])
    input_ids = torch.full((len(batch), source_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), source_len), dtype=torch.long)
    labels = torch.full((len(batch), target_len), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        input_ids[row, : len(ex.input_ids)] = torch.tensor(ex.input_ids)
        attention_mask[row, : len(ex.input_ids)] = 1
        labels[row, : len(ex.labels)] = torch.tensor(ex.labels)
    decoder_input_ids = torch.cat([torch.full_like(labels[:, :1], pad_token_id), labels[:, :-1]], dim=1)
    decoder_input_ids.masked_fill_(decoder_input_ids == IGNORE_INDEX, pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "decoder_input_ids": decoder_input_ids,
    }


def hold_out(rows: Sequence, share: float, seed: int) -> tuple[list, list]:
    """Split off int(share * len(rows)) rows chosen by `seed`; both parts keep the file's order."""
    count = int(share * len(rows))
    held = set(random.Random(seed).sample(range(len(rows)), count))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


VALIDATION_SHARE = 0.1  # of the user's own rows held out for validation, when no validation file is given


def training_splits(
    data: str | Path, val_data: str, seed: int, world_size: int = 1
) -> tuple[list[dict], list[dict], str]:
    """The training rows of `data`, the validation rows, and a line that says where the latter come from.

    `val_data` is a file, "none", or "auto": the bundled validation split beside the bundled training data,
    else a tenth of `data`'s rows held out by `seed` (none when that tenth is empty)."""
    rows = load_examples(data)
    if len(rows) < world_size:
        raise DataError(f"{data} has {len(rows)} rows, fewer than the {world_size} processes to share them.")
    if val_data.lower() == "none":
        return rows, [], "validation: none (--val-data none)"
    if val_data != "auto":
        return rows, load_examples(val_data), f"validation: {val_data}"
    if Path(data).resolve() == TRAIN_FILE.resolve():
        return rows, load_examples(VALIDATION_FILE), f"validation: the bundled split {VALIDATION_FILE}"
    train_rows, held_out = hold_out(rows, VALIDATION_SHARE, seed)
    if not held_out:
        return rows, [], f"validation: none ({len(rows)} rows are too few to hold out a tenth; pass --val-data FILE)"
    note = (
        f"validation: {len(held_out)} of the {len(rows)} rows of {data} held out (seed {seed}); "
        "pass --val-data FILE or none to choose"
    )
    return train_rows, held_out, note


def sequential_batches(
    rows: Sequence[EncodedExample], batch_size: int, pad_token_id: int, pad_to_multiple_of=None, rank=0, world_size=1
) -> list[dict]:
    """Collated batches in file order (for validation); rank r takes batches r, r + world_size, ..., and a
    rank short of one in the last round an empty_batch(), so that all run as many (under FSDP every forward
    is a collective)."""
    starts = range(rank * batch_size, len(rows), world_size * batch_size)
    batches = [collate(rows[i : i + batch_size], pad_token_id, pad_to_multiple_of) for i in starts]
    rounds = math.ceil(math.ceil(len(rows) / batch_size) / world_size)
    return batches + [empty_batch() for _ in range(rounds - len(batches))]


def bucket_key(example: EncodedExample) -> int:
    """What batches are grouped by: source plus target length.

    Sorting by target length alone would pad less, but makes batches of a single intent, since one intent's
    answers have nearly equal lengths, and a model learns more slowly from such batches.
    """
    return len(example.input_ids) + len(example.labels)


@dataclass
class TrainingData:
    """A run's tokenised rows and batches: training rows batched by length, validation rows in order."""

    train_set: list[EncodedExample]
    plan: StepPlan  # this process's training batches of each step, as indices into train_set
    val_batches: list[dict]  # this process's share, collated
    pad: tuple[int, int | None]  # collate's pad token and the multiple lengths are padded up to
    truncated: tuple[int, int]  # training and validation rows cut to the max lengths

    def batch(self, indices: Sequence[int]) -> dict:
        """The collated rows; no indices (a rank short of a batch) give empty_batch()."""
        return collate([self.train_set[i] for i in indices], *self.pad) if indices else empty_batch()


def empty_batch() -> dict:
    """One row of one pad token, unattended and unsupervised: a forward and backward that read and teach
    nothing, for a rank that has no batch while the others have one (DDP and FSDP step together)."""
    batch = {key: torch.zeros((1, 1), dtype=torch.long) for key in ("input_ids", "attention_mask", "decoder_input_ids")}
    return {**batch, "labels": torch.full((1, 1), IGNORE_INDEX)}


def training_data(
    train_rows,
    val_rows,
    tokenizer,
    max_lengths: tuple[int, int],
    batch_size: int,
    pad_multiple,
    seed: int,
    grad_accum: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> TrainingData:
    """Tokenise both splits (prompts and answers cut to `max_lengths`); process `rank` of `world_size`
    takes its share of each, `grad_accum` training batches a step."""
    train_set, train_cut = encode_examples(train_rows, tokenizer, *max_lengths)
    val_set, val_cut = encode_examples(val_rows, tokenizer, *max_lengths)
    sampler = LengthBucketSampler([bucket_key(e) for e in train_set], batch_size, seed=seed)
    pad = (tokenizer.pad_token_id, pad_multiple)
    val_batches = sequential_batches(val_set, batch_size, *pad, rank, world_size)
    plan = StepPlan(sampler, grad_accum, rank, world_size)
    return TrainingData(train_set, plan, val_batches, pad, (train_cut, val_cut))


UNREADABLE_ROW = 0.25  # a row whose answer has more <unk> tokens than this is in a script the tokenizer cannot read


def unreadable_rows(rows: Sequence[dict], encoded: Sequence[EncodedExample], unk_token_id: int | None) -> list[str]:
    """Where the rows whose answer is mostly the tokenizer's <unk> are ("line 12", ...), `encoded` being `rows`."""
    if unk_token_id is None:
        return []
    return [
        row.get("row", f"row {i + 1}")
        for i, (row, example) in enumerate(zip(rows, encoded))
        if sum(token == unk_token_id for token in example.labels) > UNREADABLE_ROW * len(example.labels)
    ]


def warn_if_unreadable(
    rows: Sequence[dict], encoded: Sequence[EncodedExample], unk_token_id: int | None, source
) -> None:
    """Warn of training rows whose answers are mostly <unk> (a script the tokenizer does not cover), naming a few:
    the model would learn to write <unk> for them."""
    unreadable = unreadable_rows(rows, encoded, unk_token_id)
    if unreadable:
        more = f" and {len(unreadable) - 3} more" if len(unreadable) > 3 else ""
        warnings.warn(
            f"{len(unreadable)} of {len(rows)} training rows ({len(unreadable) / len(rows):.0%}) have answers the "
            f"tokenizer mostly cannot read (<unk>): {', '.join(unreadable[:3])}{more} of {source}; the model would "
            "learn to write <unk> for them: fix or drop those rows, or use a model whose tokenizer covers the script.",
            stacklevel=2,
        )


def leaking_validation(
    data: str | Path, val_data: str, train_rows: Sequence[dict], val_rows: Sequence[dict]
) -> str | None:
    """Why the validation rows would measure the training rows, if they would: the same file, a byte-identical
    copy, or a large share of rows found in the training rows too (the same instruction, context and answer)."""
    if val_data.lower() in ("auto", "none") or not val_rows:
        return None
    if Path(val_data).resolve() == Path(data).resolve():
        return f"--val-data {val_data} is the training data itself"
    if Path(val_data).read_bytes() == Path(data).read_bytes():
        return f"--val-data {val_data} is a byte-identical copy of the training data"
    seen = {(row["instruction"], row.get("context"), row["response"]) for row in train_rows}
    shared = sum((row["instruction"], row.get("context"), row["response"]) in seen for row in val_rows)
    if shared >= LEAKING_SHARE * len(val_rows):
        return f"{shared} of the {len(val_rows)} rows of --val-data {val_data} are training rows too"
    return None


LEAKING_SHARE = 0.2  # of validation rows also in the training rows: val_loss and best/ then reward memorising


def warn_if_leaking(data: str | Path, val_data: str, train_rows: Sequence[dict], val_rows: Sequence[dict]) -> None:
    """Warn when the validation rows would measure the training rows (leaking_validation)."""
    leak = leaking_validation(data, val_data, train_rows, val_rows)
    if leak:
        warnings.warn(
            f"{leak}: the validation loss and best/ would measure memorised rows; pass another --val-data, or "
            "--val-data auto to hold out a tenth of --data.",
            stacklevel=2,
        )
