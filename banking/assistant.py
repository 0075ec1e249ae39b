"""The banking assistant as a library: a base model with its adapters loaded, answering queries whose
account figures are filled in from an account store (banking/grounding.py), never made up."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data import MAX_SOURCE_LEN, MAX_TARGET_LEN, build_prompt
from lora import lora_disabled, lora_layers, merge_lora, unmerge_lora
from lora.adapters import active_adapter, mixed_adapters
from lora.load import read_adapter
from lora.named_adapter_io import load_named_adapter
from lora.nf4 import quantize_base
from lora.save import AdapterError
from support.cli import UsageError
from support.models import load_model_and_tokenizer, same_base_model
from support.precision import default_device, resolve_dtype
from support.run_dir import training_config_for

from .grounding import AccountStore, shown

BASE = "base"  # the name a query gives to be answered by the base model alone, never an adapter's
FINE_TUNED = "fine_tuned"  # the name of the one adapter, when the assistant is given one directory


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
        base_dtype: str = "auto",
        grounding: str = "auto",
    ) -> None:
        self.adapters = (
            {k: Path(v) for k, v in adapters.items()} if isinstance(adapters, dict) else {FINE_TUNED: Path(adapters)}
        )
        name = self._base_model_name(model)
        if (Path(name) / "adapter_config.json").is_file() and not (Path(name) / "config.json").is_file():
            raise UsageError(f"{name} is an adapter directory, not a base model: pass it as --adapter.")
        self.device = default_device()
        if base_dtype in ("fp32", "bf16"):  # a dense base computes in the dtype it is stored in
            if precision not in ("auto", base_dtype):
                raise UsageError(
                    f"--base-dtype {base_dtype} and --precision {precision} disagree: a dense base computes in the "
                    "dtype it is stored in; give one of them."
                )
            precision = base_dtype
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
        # The banking grounding for adapters trained on the account store's placeholders (train.py records
        # "grounding" in training_config.json), and for adapters without such a record; `grounding` overrides.
        self.grounding = {
            name: (config.get("grounding", "banking") if grounding == "auto" else grounding) == "banking"
            for name, config in zip(self.adapters, configs)
        }
        # Long enough for the longest answer an adapter was trained on (plus its </s>).
        self.max_new_tokens = max(config.get("longest_target_tokens") or MAX_TARGET_LEN for config in configs)
        # NF4 (QLoRA): the base the adapters were trained on, when their runs say so; it stays unmerged,
        # since merging would round the adapter into 4 bits. Plain LoRA only: DoRA and PiSSA read W0.
        self.nf4 = base_dtype == "nf4" or (base_dtype == "auto" and any(c.get("base_dtype") == "nf4" for c in configs))
        if self.nf4:
            for directory in self.adapters.values():
                config = read_adapter(directory)[0]
                if config.get("use_dora") or config.get("init", "lora") != "lora":
                    raise UsageError(
                        f"{directory} is a DoRA or PiSSA adapter, which reads the base's dense weights: an NF4 base "
                        "takes plain LoRA; drop --base-dtype nf4 (or pass --base-dtype fp32 or bf16)."
                    )
        self.model, self.tokenizer, self.base_path = load_model_and_tokenizer(name)
        for adapter_name, directory in self.adapters.items():
            # strict: refuses an adapter of another model size, and leaves nothing of it behind
            load_named_adapter(self.model, directory, adapter_name)
        self.names = list(self.adapters)  # in --adapter order: the first answers by default
        if self.nf4:
            quantize_base(self.model, dtype)
        elif merge and len(self.adapters) == 1:
            merge_lora(self.model)  # in fp32, before any cast: an answer then costs what the base model costs
        self.model.to(self.device, dtype=dtype).eval()

    def _base_model_name(self, model: str | None) -> str:
        """`model`, else the base model the adapters' configs name (refused if they name different ones).
        Each adapter's config is read and checked here, before any model loads."""
        try:  # a directory that is no usable adapter is refused before any work
            recorded = {name: read_adapter(d)[0].get("base_model_name_or_path") for name, d in self.adapters.items()}
        except AdapterError as err:
            raise UsageError(str(err)) from None
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

    def grounded(self, name: str) -> bool:
        """Whether the answers of adapter `name` go through the banking grounding (`grounding`'s rule)."""
        return self.grounding[self.names[0] if name == BASE else name]

    def generate_with_ends(
        self, queries, max_new_tokens=None, base=False, adapters: list[str] | None = None, contexts=None, **generation
    ) -> list[tuple[str, bool]]:
        """(raw output, whether it ended by itself rather than at the token limit) for each query.

        adapters[i] names the adapter that answers query i ("base": the base model); by default the
        first adapter answers every query, or none with base=True. contexts[i], if given, is query i's context.
        """
        names = [BASE] * len(queries) if base else adapters or [self.names[0]] * len(queries)
        contexts = contexts or [None] * len(queries)
        for query, length in zip(queries, self.prompt_lengths(queries, contexts)):
            if length > self.max_source_len:
                warn(
                    f"the query is {length} tokens long; only its first {self.max_source_len} are read: "
                    f"{query[:40]!r}..."
                )
        limits = [max_new_tokens or self.max_new_tokens] * len(queries)
        rows = self.generate_rows(queries, names, contexts, limits, **generation)
        return [(row.text, row.complete) for row in rows]

    def prompt_lengths(self, queries: list[str], contexts: list[str | None]) -> list[int]:
        """Each query's prompt in tokens, </s> included: what max_source_len is compared with."""
        return [len(ids) for ids in self.tokenizer([build_prompt(q, c) for q, c in zip(queries, contexts)]).input_ids]

    @torch.inference_mode()
    def generate_rows(self, queries, adapters, contexts, limits, **generation) -> list[GeneratedRow]:
        """One batch, row i answered by adapter adapters[i] within limits[i] new tokens. The batch runs to the
        largest limit and each row is cut at its own: a row's tokens do not depend on how long the batch runs,
        so each equals what generating it with its own limit gives (the server batches rows of other limits)."""
        prompts = [build_prompt(q, c) for q, c in zip(queries, contexts)]
        inputs = self.tokenizer(
            prompts, return_tensors="pt", padding=True, truncation=True, max_length=self.max_source_len
        ).to(self.device)
        with self._answering_with(adapters):
            output = self.model.generate(**inputs, max_new_tokens=max(limits), **generation)
        rows = []
        for ids, limit in zip(output[:, 1:].tolist(), limits):  # [:, 1:]: past the decoder's start token
            ids = ids[:limit]
            complete = self.tokenizer.eos_token_id in ids
            tokens = ids.index(self.tokenizer.eos_token_id) + 1 if complete else len(ids)
            text = self.tokenizer.decode(ids[:tokens], skip_special_tokens=True).strip()
            rows.append(GeneratedRow(text, complete, tokens))
        return rows

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


@dataclass(frozen=True)
class GeneratedRow:
    """One row of a generated batch: its raw text, whether it ended by itself (</s>) before its token limit,
    and the tokens it generated (</s> included)."""

    text: str
    complete: bool
    tokens: int


@dataclass(frozen=True)
class Generation:
    """How answers are generated (infer.py's options of the same names): greedy, beam search, or sampling."""

    max_new_tokens: int | None = None  # None: the Assistant's own limit
    num_beams: int = 1
    sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    seed: int = 0  # sampling's

    def options(self) -> dict:
        """generate()'s keyword arguments (the sampling ones only when sampling)."""
        options = {"num_beams": self.num_beams, "do_sample": self.sample}
        if self.sample:
            options.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return options


def answer(
    assistant: Assistant,
    store: AccountStore,
    queries: list[str],
    generation: Generation,
    adapters=None,
    contexts=None,
) -> list[dict]:
    """Answers for one batch of queries, each grounded in the store where its adapter is (Assistant.grounded);
    adapters[i] answers query i (default: the first), with contexts[i] as its context if given.

    latency_s is the time until the answer was ready: the whole batch's generation, since a batch's
    answers arrive together (batch_size says how many shared it).
    """
    adapters = adapters or [assistant.names[0]] * len(queries)
    contexts = contexts or [None] * len(queries)
    if generation.sample:
        torch.manual_seed(generation.seed)
    start = time.perf_counter()
    options = generation.options()
    raw = assistant.generate_with_ends(
        queries, generation.max_new_tokens, adapters=adapters, contexts=contexts, **options
    )
    if assistant.device.type == "cuda":
        torch.cuda.synchronize()
    latency = time.perf_counter() - start
    results = []
    for query, context, adapter, (output, complete) in zip(queries, contexts, adapters, raw):
        grounding = assistant.grounded(adapter)
        grounded = shown(output, query, store, complete, grounding)
        results.append(
            {
                "query": query,
                **({"context": context} if context else {}),
                "adapter": adapter,
                "grounding": "banking" if grounding else "none",
                "response": grounded.response,
                "raw_response": output,
                "complete": complete,
                "latency_s": round(latency, 4),
                "batch_size": len(queries),
                **({"withheld_because": grounded.problems} if grounded.problems else {}),
            }
        )
    return results
