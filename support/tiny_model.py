"""The offline `tiny` model of `--model tiny`, for tests and smoke runs: a SentencePiece tokenizer trained on
the bundled training split and a small randomly initialised T5ForConditionalGeneration whose attention modules
are named as in flan-t5 (q, k, v, o). It is built deterministically in seconds and saved with
`save_pretrained` into a cache directory, which is what adapters record as their base model. Builders take a
lock, so torchrun's ranks build it once, and a damaged directory (a file missing, a build cut short) is
rebuilt."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import string
import tempfile
from pathlib import Path

import torch

from data import TRAIN_FILE, build_prompt, load_examples
from lora.files import current_umask

from .cli import UsageError
from .files import file_lock

TINY = "tiny"
TINY_VOCAB_SIZE = 800
TINY_CONFIG = dict(
    d_model=128,
    d_kv=32,
    d_ff=256,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)
TINY_SEED = 0
TINY_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
BUILT_MARKER = ".complete"  # written last: a directory without it was never finished


class ModelLoadError(UsageError):
    """A --model that could not be loaded (or, for `tiny`, built): refused before any work."""


def cache_dir() -> Path:
    """Where the tiny model lives: $LORA_T5_CACHE, else ~/.cache/lora-t5."""
    return Path(os.environ.get("LORA_T5_CACHE") or Path.home() / ".cache" / "lora-t5")


def tiny_model_dir() -> Path:
    """The tiny model's directory, built on first use. Its name hashes everything it is built from."""
    recipe = json.dumps(
        {
            "config": TINY_CONFIG,
            "vocab": TINY_VOCAB_SIZE,
            "seed": TINY_SEED,
            "data": hashlib.sha256(TRAIN_FILE.read_bytes()).hexdigest(),
            "version": 1,
        },
        sort_keys=True,
    )
    directory = cache_dir() / f"tiny-t5-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    if not _is_built(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(directory.parent / f".{directory.name}.lock"):  # other builders wait here, then reuse
            if not _is_built(directory):
                shutil.rmtree(directory, ignore_errors=True)  # damaged: a build cut short, or files deleted
                _build_in_own_process(directory)
    return directory


def _build_in_own_process(directory: Path) -> None:
    """build_tiny_model in a fresh Python: under torchrun, transformers 5's save_pretrained writes nothing
    on a rank other than 0, and whichever rank takes the lock first is the one that builds."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    code = "import sys; from pathlib import Path; from support.tiny_model import build_tiny_model; "
    code += "build_tiny_model(Path(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True, env=env)
    if result.returncode != 0 or not _is_built(directory):
        reason = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise ModelLoadError(f"could not build the tiny model in {directory} ({reason[:200]}).")


def _is_built(directory: Path) -> bool:
    return all((directory / name).is_file() for name in (*TINY_FILES, BUILT_MARKER))


def train_tiny_sentencepiece() -> list[tuple[str, float]]:
    """Train a unigram SentencePiece model on the training split; return its (piece, score) list."""
    import sentencepiece as spm

    rows = load_examples(TRAIN_FILE)
    sentences = [build_prompt(row["instruction"]) for row in rows] + [row["response"] for row in rows]
    # Every printable ASCII character T5's own vocabulary has, so no user text maps to <unk> for want of one.
    sentences.append("".join(c for c in string.printable[:95] if c not in "{}<"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        vocab_size=TINY_VOCAB_SIZE,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
        character_coverage=1.0,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    return [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]


def build_tiny_tokenizer():
    """A T5Tokenizer from the trained pieces (T5Tokenizer(vocab_file=...) would build a 4-token vocabulary)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=train_tiny_sentencepiece(), extra_ids=0)


def build_tiny_model(directory: Path) -> None:
    """Build the tiny model and tokenizer and save both into `directory`, atomically."""
    from transformers import T5Config, T5ForConditionalGeneration

    tokenizer = build_tiny_tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        **TINY_CONFIG,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = T5ForConditionalGeneration(config)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / BUILT_MARKER).touch()
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700
        staging.rename(directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
