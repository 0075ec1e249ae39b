"""Evaluation of base against fine-tuned on held-out rows: the metrics, intent matching and the report.

The report is data (eval_report.json); its markdown (eval_report.md) and the table printed by
`infer.py --eval` are both rendered from that data.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence

from tqdm.auto import tqdm

from .grounding import AccountStore, ground, shown

REFUSAL_MARKER = "i can only help with banking"  # every out-of-domain answer in the dataset says this
NOTES = {
    "exact_match": "raw output equals the reference response, placeholders included",
    "intent_accuracy": "intent of the most similar training response (token F1 >= 0.5)",
    "refusal": f"the answer contains '{REFUSAL_MARKER}'",
    "invented_figure_rate": "answers holding a number the user did not write (or one the user wrote, presented as "
    "a figure of the store), outside the store's placeholders",
    "unfillable_placeholder_rate": "answers withheld for a placeholder the store cannot fill, or malformed",
}


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
    answers = [ground(output, row["instruction"], store) for output, row in zip(outputs, rows)]
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
        "invented_figure_rate": sum(a.reason == "invented_figure" for a in answers) / n,
        "unfillable_placeholder_rate": sum(a.reason in ("missing_figure", "malformed") for a in answers) / n,
    }


def evaluate(
    generate: Callable[[list[dict], str], list[str]],
    rows: list[dict],
    store: AccountStore,
    matcher: IntentMatcher,
    batch_size: int,
    sample_count: int,
    models: Sequence[str],
    grounded: dict[str, bool] | None = None,
) -> dict:
    """Generate with each of `models` (generate(rows, model)) and score each; the report's data. The samples
    show each model's answers as a user sees them: grounded where `grounded` says so (by default, all)."""
    outputs = {name: [] for name in models}
    batches = [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
    for batch in tqdm(batches, desc="evaluating", unit="batch", file=sys.stderr):
        for name in models:
            outputs[name] += generate(batch, name)
    samples = [
        {
            "query": rows[i]["instruction"],
            "intent": rows[i].get("intent"),
            "reference": rows[i]["response"],
            **{
                name: shown(
                    outputs[name][i], rows[i]["instruction"], store, grounded=(grounded or {}).get(name, True)
                ).response
                for name in models
            },
        }
        for i in _sample_indices(rows, sample_count)
    ]
    metrics = {name: score(rows, outputs[name], store, matcher) for name in models}
    return {"test_rows": len(rows), "metrics": metrics, "samples": samples, "notes": NOTES}


def _sample_indices(rows: list[dict], count: int) -> list[int]:
    """One row per intent first, so the sample table shows the range of the data."""
    first_of_intent = {}
    for i, row in enumerate(rows):
        first_of_intent.setdefault(row.get("intent"), i)
    chosen = list(first_of_intent.values())[:count]
    return chosen + [i for i in range(len(rows)) if i not in chosen][: count - len(chosen)]


def metrics_markdown(report: dict) -> str:
    """The metrics table: one row per metric, one column per model (base, then the fine-tuned ones)."""
    metrics = report["metrics"]
    models = list(metrics)

    def cell(value):
        return "n/a" if value is None else f"{value:.1%}"

    lines = ["| metric | " + " | ".join(models) + " |", "| --- |" + " --- |" * len(models)]
    for key in metrics[models[0]]:
        lines.append(f"| {key} | " + " | ".join(cell(metrics[name][key]) for name in models) + " |")
    return "\n".join(lines)


def report_markdown(report: dict) -> str:
    """eval_report.md: the heading, the metrics table, sample answers and what each metric means."""
    models = list(report["metrics"])
    several = isinstance(report["adapter"], dict)
    adapters = ", ".join(f"`{name}` ({path})" for name, path in report["adapter"].items()) if several else None
    lines = [
        "# Evaluation: base vs " + (", ".join(models[1:]) if several else "fine-tuned") + "\n",
        (f"Adapters {adapters}" if several else f"Adapter `{report['adapter']}`")
        + f" on base `{report['base_model']}`, {report['test_rows']} held-out test rows.\n",
        metrics_markdown(report),
        "",
        "| query | " + " | ".join(f"{name.replace('_', '-')} answer" for name in models) + " | reference |",
        "| --- |" + " --- |" * (len(models) + 1),
    ]
    for s in report["samples"]:
        lines.append("| " + " | ".join(s[k].replace("|", "\\|") for k in ("query", *models, "reference")) + " |")
    lines += ["", *(f"- {k}: {v}" for k, v in report["notes"].items())]
    return "\n".join(lines) + "\n"
