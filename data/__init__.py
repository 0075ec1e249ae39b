"""The banking dataset, its prompt format and batching, and the offline tiny model."""

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
    load_examples,
)
from .models import TINY, ModelLoadError, load_model_and_tokenizer, resolve_model_path

__all__ = [
    "IGNORE_INDEX",
    "MAX_SOURCE_LEN",
    "MAX_TARGET_LEN",
    "TEST_FILE",
    "TRAIN_FILE",
    "VALIDATION_FILE",
    "TINY",
    "DataError",
    "EncodedExample",
    "LengthBucketSampler",
    "ModelLoadError",
    "bucket_key",
    "build_prompt",
    "collate",
    "encode_examples",
    "load_examples",
    "load_model_and_tokenizer",
    "resolve_model_path",
]
