"""The CUDA paths (scripts/cuda_checks.py): bf16 autocast, fp16 with the scaler, fused AdamW, --compile.

Skipped without a CUDA GPU (CI has none): scripts/gpu_check.sh runs them where one is at hand.
"""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import cuda_checks  # noqa: E402

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("check", cuda_checks.CHECKS, ids=lambda check: check.__name__)
def test_cuda_path(check, tmp_path):
    check(tmp_path)
