"""The banking dataset: its rows, the one prompt format, tokenisation, padding and length-bucketed batches."""

from .dataset import (
    IGNORE_INDEX,
    MAX_SOURCE_LEN,
    MAX_TARGET_LEN,
    TEST_FILE,
    TRAIN_FILE,
    VALIDATION_FILE,
    DataError,
    EncodedExample,
    LengthBucketSampler,
    bucket_key,
    build_prompt,
    collate,
    encode_examples,
    hold_out,
    load_examples,
    sequential_batches,
)

__all__ = [
    "IGNORE_INDEX",
    "MAX_SOURCE_LEN",
    "MAX_TARGET_LEN",
    "TEST_FILE",
    "TRAIN_FILE",
    "VALIDATION_FILE",
    "DataError",
    "EncodedExample",
    "LengthBucketSampler",
    "bucket_key",
    "build_prompt",
    "collate",
    "encode_examples",
    "hold_out",
    "load_examples",
    "sequential_batches",
]
