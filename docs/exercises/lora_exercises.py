"""Four exercises: write one piece of a LoRA layer, then let lora.testing check it against the formula.

Replace the body of the method marked EXERCISE in one class, then run, from the repository root:

    python -m lora.testing docs/exercises/lora_exercises.py:exercise_1_forward
    python -m lora.testing docs/exercises/lora_exercises.py:exercise_2_init
    python -m lora.testing docs/exercises/lora_exercises.py:exercise_3_merge
    python -m lora.testing docs/exercises/lora_exercises.py:exercise_4_dora_norm --dora

Until a method is written the kit stops with its hint; a wrong one fails the rows that name the mistake
(alpha instead of alpha / r, dropout on the base, a merge without the scaling...). Each class is the
project's own layer with one method taken out: the solutions are lora/layer.py and lora/dora.py.
"""

import torch
from torch import nn

from lora import DoRALinear, LoRALinear


class Exercise1Forward(LoRALinear):
    def lora_update(self, x: torch.Tensor) -> torch.Tensor:
        """EXERCISE 1: the update LoRA adds to W0 x + b, of shape (..., out_features)."""
        raise NotImplementedError(
            "Exercise 1, the forward: return scaling · B (A (dropout x)), computed in A's dtype: drop out x, "
            "multiply by lora_A (r, in), then by lora_B (out, r), then by self.scaling (alpha / r)."
        )


class Exercise2Init(LoRALinear):
    def reset_lora_parameters(self) -> None:
        """EXERCISE 2: initialise lora_A and lora_B in place."""
        raise NotImplementedError(
            "Exercise 2, the init: A as nn.Linear initialises its weight (kaiming-uniform, a=sqrt(5)), B to zeros, "
            "so that B A = 0 and the adapted layer computes exactly its base at step 0."
        )


class Exercise3Merge(LoRALinear):
    @torch.no_grad()
    def merge(self) -> None:
        """EXERCISE 3: fold the update into self.weight (once, however often it is called); set self.merged."""
        raise NotImplementedError(
            "Exercise 3, merge: if not merged yet, add scaling · B @ A (computed in fp32, rounded once into the "
            "weight's dtype) to self.weight and set self.merged; unmerge() takes exactly that back out."
        )


class Exercise4DoRANorm(DoRALinear):
    def weight_norm(self) -> torch.Tensor:
        """EXERCISE 4: DoRA's n = ‖W0 + s·B A‖_c, one value per output row, in fp32."""
        raise NotImplementedError(
            "Exercise 4, DoRA's norm: the L2 norm of each output row of W0 + scaling · B @ A (shape (out,)); the "
            "magnitude m starts at it, and the forward scales each row by m / n."
        )


def exercise_1_forward(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    return Exercise1Forward.from_linear(base, r, alpha, dropout=0.1)


def exercise_2_init(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    return Exercise2Init.from_linear(base, r, alpha, dropout=0.1)


def exercise_3_merge(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    return Exercise3Merge.from_linear(base, r, alpha, dropout=0.1)


def exercise_4_dora_norm(base: nn.Linear, r: int, alpha: float) -> nn.Module:
    return Exercise4DoRANorm.from_linear(base, r, alpha, dropout=0.1)
