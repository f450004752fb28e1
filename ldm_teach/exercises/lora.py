"""Checkers for chapter 09's LoRA exercises: the adapted layer's forward pass and the merged weight
(``base.compare`` does the comparing, in float64, against ``ldm_teach.lora.LoRALinear``)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..lora import LoRALinear
from .base import CheckResult, compare


def adapter(weight, A, alpha, scale, bias: bool = False) -> LoRALinear:
    """The package's ``LoRALinear`` of these sizes, on the meta device: the tensors go in at call time
    (``torch.func.functional_call``), so that gradients reach the caller's W, A and B."""
    base = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, device="meta")
    with torch.device("meta"):
        return LoRALinear(base, A.shape[0], alpha, scale)


class DeltaWeight(nn.Module):
    """A module whose forward is ``LoRALinear.delta_weight``, so ``functional_call`` can run it."""

    def __init__(self, layer: LoRALinear):
        super().__init__()
        self.layer = layer

    def forward(self) -> torch.Tensor:
        return self.layer.delta_weight()


def reference_lora_forward(x, weight, bias, A, B, alpha, scale):
    """y = x Wᵀ + b + scale · (alpha / r) · x Aᵀ Bᵀ, by ``LoRALinear.forward``."""
    tensors = {"weight": weight, "lora_A.weight": A, "lora_B.weight": B, **({} if bias is None else {"bias": bias})}
    return torch.func.functional_call(adapter(weight, A, alpha, scale, bias is not None), tensors, (x,))


def reference_merge_lora_weight(weight, A, B, alpha, scale):
    """W + scale · (alpha / r) · B A, the weight ``LoRALinear.merged`` bakes in."""
    delta = DeltaWeight(adapter(weight, A, alpha, scale))
    return weight + torch.func.functional_call(delta, {"layer.lora_A.weight": A, "layer.lora_B.weight": B}, ())


def lora_cases(seed: int, with_input: bool) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, in_features, out_features, rank, alpha, scale, bias in [
            ((3,), 16, 16, 2, 2.0, 0.5, False), ((2, 5), 12, 10, 4, 8.0, 1.0, True), ((1, 2, 3), 7, 9, 3, 1.0, 1.5, True)]:
        # the square layer first: there a product in the wrong order still has W's shape, and is named
        case = {}
        if with_input:
            case["x"] = torch.randn(*batch, in_features, generator=generator, dtype=torch.float64)
        case["weight"] = torch.randn(out_features, in_features, generator=generator, dtype=torch.float64)
        if with_input:
            case["bias"] = torch.randn(out_features, generator=generator, dtype=torch.float64) if bias else None
        case["A"] = torch.randn(rank, in_features, generator=generator, dtype=torch.float64)
        case["B"] = torch.randn(out_features, rank, generator=generator, dtype=torch.float64)
        case["alpha"], case["scale"] = alpha, scale
        cases.append(case)
    return cases


def check_lora_forward(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 09): ``lora_forward(x, weight, bias, A, B, alpha, scale)`` -> the adapted layer's output
    y (..., out): the frozen layer's x Wᵀ + b plus scale · (alpha / r) times the low-rank path x Aᵀ Bᵀ."""
    mistakes = {
        "forgetting alpha / r: the low-rank path is scaled by scale · alpha / r, r = A.shape[0]":
            lambda x, weight, bias, A, B, alpha, scale: reference_lora_forward(x, weight, bias, A, B, A.shape[0], scale),
        "dividing by alpha / r instead of multiplying by it":
            lambda x, weight, bias, A, B, alpha, scale: reference_lora_forward(
                x, weight, bias, A, B, A.shape[0] ** 2 / alpha, scale),
        "forgetting the caller's scale":
            lambda x, weight, bias, A, B, alpha, scale: reference_lora_forward(x, weight, bias, A, B, alpha, 1.0),
        "leaving out the frozen layer's bias b":
            lambda x, weight, bias, A, B, alpha, scale: reference_lora_forward(x, weight, None, A, B, alpha, scale),
    }
    return compare("lora_forward", learner, reference_lora_forward, lora_cases(seed, with_input=True), mistakes,
                   atol=1e-10, gradients=("x", "A", "B"), seed=seed,
                   shape_hint="y has x's leading dimensions and W's out features: x (..., in) -> (..., out).")


def check_merge_lora_weight(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 09): ``merge_lora_weight(weight, A, B, alpha, scale)`` -> the merged weight (out, in),
    W + scale · (alpha / r) · B A, so that one plain linear layer gives the adapted layer's output."""
    mistakes = {
        "forgetting alpha / r: ΔW = scale · (alpha / r) · B A, r = A.shape[0]":
            lambda weight, A, B, alpha, scale: reference_merge_lora_weight(weight, A, B, A.shape[0], scale),
        "the product in the wrong order: Aᵀ Bᵀ is (B A)ᵀ; B (out, r) comes first, so B A is (out, in)":
            lambda weight, A, B, alpha, scale: weight + scale * alpha / A.shape[0] * (A.T @ B.T),
        "forgetting the caller's scale":
            lambda weight, A, B, alpha, scale: reference_merge_lora_weight(weight, A, B, alpha, 1.0),
    }
    return compare("merge_lora_weight", learner, reference_merge_lora_weight, lora_cases(seed, with_input=False),
                   mistakes, atol=1e-10, gradients=("A", "B"), seed=seed,
                   shape_hint="the merged weight has W's shape (out, in); B (out, r) @ A (r, in) is (out, in).")
