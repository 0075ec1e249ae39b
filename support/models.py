"""The one place that builds a model from `--model`: `tiny`, a local directory, a hub name, or
flan-t5-base's architecture with random weights (for offline timings and parameter counts).

`tiny` is an offline T5 for tests and smoke runs: a SentencePiece tokenizer trained on the bundled
training split and a small randomly initialised T5ForConditionalGeneration whose attention modules are
named as in flan-t5 (q, k, v, o). It is built deterministically in seconds and saved with
`save_pretrained` into a cache directory, which is what adapters record as their base model. Builders
take a lock, so torchrun's ranks build it once, and a damaged directory (a file missing, a build cut
short) is rebuilt.
"""

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

# The flan-t5 family's architectures, from their published configs (vocabulary 32128, gated-GELU, heads of 64).
FLAN_T5_SIZES = {
    "small": dict(d_model=512, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8),
    "base": dict(d_model=768, num_heads=12, d_ff=2048, num_layers=12, num_decoder_layers=12),
    "large": dict(d_model=1024, num_heads=16, d_ff=2816, num_layers=24, num_decoder_layers=24),
    "xl": dict(d_model=2048, num_heads=32, d_ff=5120, num_layers=24, num_decoder_layers=24),
    "xxl": dict(d_model=4096, num_heads=64, d_ff=10240, num_layers=24, num_decoder_layers=24),
}
FLAN_T5_COMMON = dict(
    d_kv=64, vocab_size=32128, feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1
)
FLAN_T5_BASE_CONFIG = {**FLAN_T5_COMMON, **FLAN_T5_SIZES["base"]}


class ModelLoadError(RuntimeError):
    """A --model that could not be loaded."""


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
    code = "import sys; from pathlib import Path; from support.models import build_tiny_model; "
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


def flan_t5_architecture(size: str = "base", device: torch.device | str | None = None):
    """A flan-t5 size built from its config with random weights and the real checkpoints' layout.

    transformers 5 ties lm_head to the input embeddings when building from a config (222.9M parameters
    for base); the real checkpoints have their own lm_head (base: 247,577,856). Timings don't depend on
    weight values. device="meta" gives shapes only, for counting parameters and FLOPs without memory.
    """
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device(device or "cpu"):
        model = T5ForConditionalGeneration(T5Config(**FLAN_T5_COMMON, **FLAN_T5_SIZES[size]))
        model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return model


def flan_t5_base_architecture(device: torch.device | str | None = None):
    return flan_t5_architecture("base", device)


def enable_activation_checkpointing(model, reentrant: bool = False) -> None:
    """Recompute each T5 block's activations in the backward pass instead of keeping them.

    Non-reentrant by default: with reentrant checkpointing and a frozen embedding, the blocks' inputs do not
    require grad, and the LoRA weights inside the blocks get no gradient at all. transformers renamed the
    switch in 5.x (gradient_ -> activation_checkpointing_enable); both spellings are handled.
    """
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def resolve_model_path(name: str) -> str:
    """`tiny` becomes the tiny model's cache directory; anything else is returned as it is."""
    return str(tiny_model_dir()) if name == TINY else name


def same_base_model(name: str, recorded: str) -> bool:
    """Whether --model `name` and an adapter's recorded base are the same model (as paths, when both are)."""
    if name == recorded:
        return True
    resolved = Path(resolve_model_path(name)).expanduser()
    return resolved.is_dir() and Path(recorded).expanduser().is_dir() and resolved.resolve() == Path(recorded).resolve()


def load_model_and_tokenizer(name: str, dtype: torch.dtype | None = None, qlora_inject=None, on_meta: bool = False):
    """Load a T5 model and its tokenizer from `tiny`, a local directory or a hub name.

    Returns (model, tokenizer, path) where path is what an adapter should record as its base model.
    A hub name is read from the local cache when it is there; otherwise the hub must be reachable,
    which is checked once, quickly, instead of waiting through the hub client's retries.

    With `qlora_inject` (QLoRA): the model is built on the meta device, `qlora_inject(model)` injects LoRA
    there, and the checkpoint's safetensors files are read tensor by tensor, each frozen linear layer's
    weight quantised to NF4 as it comes and the rest stored in `dtype` (lora/nf4.py,
    quantize_while_loading): neither the fp32 nor a bf16 copy of the model is ever in memory.
    With `on_meta`: the model is built on the meta device and its weights are not read (train.py --fsdp
    then reads each rank's shards of them: load_base_shards).
    """
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lora.model import missing_tensors_error

    path = resolve_model_path(name)
    local_only = Path(path).expanduser().is_dir() or _in_hub_cache(path)
    if not local_only:
        if path.startswith((".", "/", "~")) or path.count("/") > 1:  # a path, not an "org/name" hub id
            raise ModelLoadError(
                f"model directory {name!r} does not exist; pass a directory saved with "
                "save_pretrained, a hub name, or --model tiny for the offline test model."
            )
        if not _hub_reachable():
            raise ModelLoadError(
                f"could not load model {name!r}: it is not in the local cache and the Hugging Face "
                "hub cannot be reached; pass a local directory saved with save_pretrained, or "
                "--model tiny for the offline test model."
            )
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # one clear message below instead of transformers' warnings
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
        _refuse_a_quantized_checkpoint(name, AutoConfig.from_pretrained(path, local_files_only=local_only))
        # safetensors only: a pytorch_model.bin is a pickle, and nothing is unpickled from a file a user hands us
        if qlora_inject is not None:
            model = _load_quantized(path, local_only, dtype, qlora_inject)
        elif on_meta:
            _checkpoint_files(path, local_only)  # there (or downloaded) before any rank reads its shards
            model = _build_on_meta(path)
        else:
            model, loading = AutoModelForSeq2SeqLM.from_pretrained(
                path, dtype=dtype, local_files_only=local_only, use_safetensors=True, output_loading_info=True
            )
            if loading["missing_keys"]:  # transformers would fill them with random values, and only warn
                raise missing_tensors_error(sorted(loading["missing_keys"]))
    except UsageError:  # from qlora_inject: the LoRA settings, not the model
        raise
    except (OSError, ValueError, ImportError) as err:
        if Path(path).expanduser().is_dir() and not list(Path(path).expanduser().glob("*.safetensors")):
            raise ModelLoadError(
                f"model directory {name!r} holds no .safetensors weights (a pytorch_model.bin is a pickle, which "
                "this project never loads); save the model with save_pretrained (safetensors by default)."
            ) from None
        raise _could_not_load(name, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    return model, tokenizer, path


def _refuse_a_quantized_checkpoint(name: str, config) -> None:
    """A checkpoint saved quantised (bitsandbytes' 4 or 8 bits, GPTQ, AWQ...) holds no full-precision weights
    to train on or merge into, and loading it would need the quantiser's own library at run time."""
    quantization = getattr(config, "quantization_config", None)
    if quantization:
        method = quantization.get("quant_method", "a quantiser") if isinstance(quantization, dict) else "a quantiser"
        raise ModelLoadError(
            f"model {name!r} was saved quantised by {method} (its config.json has a quantization_config); pass "
            "the full-precision checkpoint instead: --base-dtype nf4 quantises it to NF4 as it loads, bit-equal "
            "to bitsandbytes."
        )


def load_with_lora(name: str, base_dtype: str, device: torch.device, inject, on_meta: bool = False):
    """(model, tokenizer, path) of load_model_and_tokenizer with LoRA injected by `inject(model)` (A and B in
    fp32) and the frozen weights stored as --base-dtype asks: fp32, bf16 or fp16, each tensor cast as it
    loads, or NF4 (QLoRA) quantised as it loads, computing in support.precision.nf4_dtype's dtype.
    With `on_meta` (plain LoRA only): the frozen weights stay on the meta device, in that dtype, unread;
    A and B are real, initialised as on a loaded model."""
    from lora import allocate_adapters, set_base_dtype

    from .precision import nf4_dtype, resolve_dtype

    if base_dtype == "nf4":
        return load_model_and_tokenizer(name, nf4_dtype(device), qlora_inject=inject)
    dtype = resolve_dtype(base_dtype, device, "--base-dtype")
    model, tokenizer, path = load_model_and_tokenizer(name, dtype, on_meta=on_meta)  # in that dtype: no fp32 copy
    inject(model)
    set_base_dtype(model, dtype)  # what the load kept in fp32 too (transformers keeps T5's wo there)
    if on_meta:
        allocate_adapters(model)
    return model, tokenizer, path


def load_base_shards(model, name: str, device: torch.device) -> None:
    """After support.fsdp.shard_model on a model load_with_lora built on the meta device: this rank's shards
    of the frozen weights, read tensor by tensor from the checkpoint of `name` (each full tensor only while
    its shard is cut from it), and A and B as they were."""
    from .fsdp import materialize

    try:
        materialize(model, _checkpoint_tensors(_checkpoint_files(name, local_only=True)), device)
    except (OSError, ValueError) as err:
        raise _could_not_load(name, err) from None


def _could_not_load(name: str, err: Exception) -> ModelLoadError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ModelLoadError(
        f"could not load model {name!r} ({reason[:200]}); pass a local directory saved with save_pretrained, "
        "or --model tiny for the offline test model."
    )


def _checkpoint_files(path: str, local_only: bool) -> list[Path]:
    """The checkpoint's .safetensors files: a directory's, or a hub name's cached (or downloaded) snapshot's."""
    from huggingface_hub import snapshot_download

    directory = Path(path).expanduser()
    if not directory.is_dir():
        patterns = ["*.json", "*.safetensors"]
        directory = Path(snapshot_download(path, allow_patterns=patterns, local_files_only=local_only))
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise OSError(f"no .safetensors weights in {directory}")
    return files


def _checkpoint_tensors(files: list[Path]):
    """(name, tensor) for every tensor of the files, one at a time: each file is opened for each tensor, so
    its mapped pages are let go before the next one."""
    from safetensors import safe_open

    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            keys = list(weights.keys())  # noqa: SIM118 (safe_open has keys(), not iteration)
        for key in keys:
            with safe_open(str(file), framework="pt") as weights:
                tensor = weights.get_tensor(key)
            yield key, tensor


def _build_on_meta(path: str):
    """The model of `path`'s config on the meta device: shapes, dtypes and tied weights; no memory."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    with torch.device("meta"):
        return AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(path, local_files_only=True))


def _load_quantized(path: str, local_only: bool, dtype: torch.dtype, inject):
    from transformers import GenerationConfig

    from lora.nf4 import quantize_while_loading

    files = _checkpoint_files(path, local_only)
    model = _build_on_meta(path)
    inject(model)
    quantize_while_loading(model, _checkpoint_tensors(files), dtype)
    if (files[0].parent / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(files[0].parent)
    return model.eval()


def _in_hub_cache(name: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def _hub_reachable(timeout_s: float = 5.0) -> bool:
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False
