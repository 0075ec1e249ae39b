"""The worked example's product, apart from the LoRA and training machinery: a banking assistant.

- assistant: a base model with its adapters loaded, answering grounded queries
- grounding: the account store that fills the model's placeholders, and the invented-figure check
- amounts: every number a text writes, in digits or in English words, with its value
- evaluation: base against fine-tuned: metrics and intent matching
- report: `infer.py --eval`'s report, where it goes and what it may replace
"""
