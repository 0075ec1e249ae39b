"""Generate the bundled banking dataset: `python -m data.generate [--seed 0] [--out-dir data]`.

The phrasings, vocabularies and answers are tables in `banking_intents.json` beside this file; this
module only draws from them. Each row is {"instruction", "response", "intent", "template"}. The
response is a function of the intent and the slots the user gave (account, card, amount, recipient...),
never of the phrasing, so one question always has one answer. Customer-specific and bank-specific
figures are placeholders in square brackets ([SAVINGS_BALANCE], [SUPPORT_PHONE]) that infer.py fills
from an account store: the model never learns to make up a balance. The test split holds out whole
phrasing templates. The same seed writes byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

TABLES = json.loads((Path(__file__).parent / "banking_intents.json").read_text(encoding="utf-8"))
VOCABULARY = TABLES["vocabulary"]
INTENTS = TABLES["intents"]
# Out-of-domain questions are their own templates; each knows its topic and whom to ask instead.
QUESTION_TOPIC = {
    question: (topic, spec["ask"])
    for topic, spec in INTENTS["out_of_domain"]["topics"].items()
    for question in spec["questions"]
}
ROWS_PER_INTENT = 110
TEST_TEMPLATE_EVERY = 6  # templates 5, 11, 17... of each intent are seen only in the test split
VALIDATION_FRACTION = 0.1
SPLITS = ("train", "validation", "test")


def templates(intent: str) -> list[str]:
    spec = INTENTS[intent]
    if intent == "out_of_domain":
        return [question for topic in spec["topics"].values() for question in topic["questions"]]
    return spec["templates"]


def respond(intent: str, slots: dict) -> str:
    """The answer: the intent's response for the slots' variant (else its default), filled with the slots."""
    responses = INTENTS[intent]["responses"]
    return responses[slots.get("variant", "default")].format(**slots)


def fill(intent: str, template: str, rng: random.Random) -> tuple[str, dict]:
    """One instruction from a template (what the user says) and the slots its answer depends on.

    The order of the random draws is part of the dataset: changing it changes the bundled files.
    """
    said, slots = {}, {}
    if "{card}" in template:
        phrase = rng.choice(sorted(VOCABULARY["cards"]))
        said["card"], slots["card"] = phrase, VOCABULARY["cards"][phrase]
    if "{account}" in template:
        phrase = rng.choice(sorted(VOCABULARY["accounts"]))
        if intent == "open_account":  # only accounts one can open; the draw above still happens
            phrase = rng.choice(VOCABULARY["open_account_accounts"])
        said["account"] = phrase
        slots["account"], slots["account_stem"] = VOCABULARY["accounts"][phrase]
    if "{amount}" in template:
        said["amount"], slots["amount"] = amount(rng)
    if "{recipient}" in template:
        said["recipient"] = slots["recipient"] = rng.choice(VOCABULARY["names"])
    if "{loan}" in template:
        phrase = rng.choice(sorted(VOCABULARY["loans"]))
        said["loan"], slots["loan_stem"] = phrase, VOCABULARY["loans"][phrase]
        slots["loan"] = VOCABULARY["loan_names"][slots["loan_stem"]]
    if "{city}" in template:
        said["city"] = slots["city"] = rng.choice(VOCABULARY["cities"])
        slots["variant"] = "city"
    if "{fee}" in template:
        phrase = rng.choice(sorted(VOCABULARY["fees"]))
        said["fee"] = phrase
        slots["fee"], slots["fee_placeholder"] = VOCABULARY["fees"][phrase]
    if "{secret}" in template:
        phrase = rng.choice(sorted(VOCABULARY["secrets"]))
        said["secret"], slots["variant"] = phrase, VOCABULARY["secrets"][phrase]
    if "{name}" in template:
        said["name"] = rng.choice([n for n in VOCABULARY["names"] if not n.startswith("my ")])
    if "{action}" in template:
        said["action"] = rng.choice(VOCABULARY["card_actions"])
        slots["variant"] = "unfreeze" if said["action"] in ("unfreeze", "unlock") else "freeze"
    if intent == "out_of_domain":
        slots["topic"], slots["expert"] = QUESTION_TOPIC[template]
    text = template.format(**said)
    if intent == "greeting":
        text += rng.choice(VOCABULARY["greeting_tails"])
    return style(text, rng), slots


def amount(rng: random.Random) -> tuple[str, str]:
    """An amount as a user writes it, and as the answer echoes it."""
    value = rng.choice(VOCABULARY["amounts"])
    cents = rng.random() < 0.15
    number = f"{value:,}.{rng.randint(1, 99):02d}" if cents else f"{value:,}"
    written = rng.choice([f"${number}", f"${number}", number, f"{number} dollars", f"USD {number}"])
    return written, f"${number}"


def style(text: str, rng: random.Random) -> str:
    """Vary the surface: some users type in lower case, drop the full stop, make typos or add context."""
    roll = rng.random()
    if roll < 0.15:
        text = text.lower()
    elif roll < 0.25:
        text = text.rstrip(".!?")
    if rng.random() < 0.12:
        text = typo(text, rng)
    if rng.random() < 0.08:
        text = rng.choice(VOCABULARY["openers"]) + text[:1].lower() + text[1:]
    return re.sub(r"\s+", " ", text).strip()


def typo(text: str, rng: random.Random) -> str:
    """Swap two neighbouring letters inside one word, as fast typists do."""
    spots = [i for i in range(1, len(text) - 1) if text[i].isalpha() and text[i + 1].isalpha()]
    if not spots:
        return text
    i = rng.choice(spots)
    return text[:i] + text[i + 1] + text[i] + text[i + 2 :]


def generate(seed: int = 0) -> dict[str, list[dict]]:
    """ROWS_PER_INTENT distinct instructions per intent, cycling through its templates, split three ways."""
    rng = random.Random(seed)
    seen: set[str] = set()
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for intent in INTENTS:
        phrasings = templates(intent)
        made, attempts = 0, 0
        while made < ROWS_PER_INTENT:
            attempts += 1
            if attempts > 50 * ROWS_PER_INTENT:
                raise RuntimeError(f"intent {intent}: too few distinct phrasings for {ROWS_PER_INTENT} rows")
            index = attempts % len(phrasings)
            instruction, slots = fill(intent, phrasings[index], rng)
            if instruction.lower() in seen:
                continue
            seen.add(instruction.lower())
            made += 1
            held_out = index % TEST_TEMPLATE_EVERY == TEST_TEMPLATE_EVERY - 1
            split = "test" if held_out else ("validation" if rng.random() < VALIDATION_FRACTION else "train")
            row = {
                "instruction": instruction,
                "response": respond(intent, slots),
                "intent": intent,
                "template": f"{intent}/{index}",
            }
            splits[split].append(row)
    return splits


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0, the bundled files)")
    parser.add_argument(
        "--out-dir", type=Path, default=Path(__file__).parent, help="where to write banking_<split>.jsonl"
    )
    args = parser.parse_args(argv)
    splits = generate(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        write_jsonl(args.out_dir / f"banking_{name}.jsonl", rows)
        print(f"{name}: {len(rows)} rows -> {args.out_dir / f'banking_{name}.jsonl'}")


if __name__ == "__main__":
    main()
