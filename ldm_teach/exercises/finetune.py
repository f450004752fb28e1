"""Checkers for chapter 09's exercises (teaching a new concept): textual inversion's update of the embedding
table and DreamBooth's prior-preservation loss (``base.compare`` does the comparing)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..finetune import prior_preservation_loss, textual_inversion_update
from .base import CheckResult, compare


def check_ti_update(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 09): ``textual_inversion_update(table, frozen_table, new_ids)`` -> the table (V, D) after
    an optimizer step, with every row put back to ``frozen_table`` except the new tokens' rows."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for vocab, width, new_ids in [(10, 4, [9]), (12, 3, [10, 11]), (8, 5, [3])]:  # a new row need not be the last
        frozen = torch.randn(vocab, width, generator=generator)
        moved = frozen + 0.1 * torch.randn(vocab, width, generator=generator)  # the optimizer moved every row
        cases.append(dict(table=moved, frozen_table=frozen, new_ids=new_ids))
    mistakes = {
        "every row put back, the new ones too: the new tokens' rows must keep what the optimizer made of them":
            lambda table, frozen_table, new_ids: frozen_table.clone(),
        "nothing put back: weight decay (and a shared batch) moves the old rows, which must stay as they were":
            lambda table, frozen_table, new_ids: table.clone(),
        "the mask inverted: the new rows were put back and the old ones kept as the optimizer left them":
            lambda table, frozen_table, new_ids: textual_inversion_update(frozen_table, table, new_ids),
        "only the last row treated as new: use new_ids, a new token's row need not be the last":
            lambda table, frozen_table, new_ids: textual_inversion_update(table, frozen_table, [len(table) - 1]),
    }
    return compare("textual_inversion_update", learner, textual_inversion_update, cases, mistakes, atol=0.0,
                   rtol=0.0, gradients=("table",), seed=seed)


def check_prior_loss(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 09): ``prior_preservation_loss(concept_prediction, concept_target, class_prediction,
    class_target, prior_weight)`` -> DreamBooth's loss, a 0-dimensional tensor."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for concept, classes, weight in [(2, 2, 1.0), (3, 1, 0.5), (1, 4, 2.0)]:  # the halves need not be the same size
        shape = (4, 6, 6)
        cases.append(dict(concept_prediction=torch.randn(concept, *shape, generator=generator),
                          concept_target=torch.randn(concept, *shape, generator=generator),
                          class_prediction=torch.randn(classes, *shape, generator=generator),
                          class_target=torch.randn(classes, *shape, generator=generator), prior_weight=weight))
    mistakes = {
        "λ on the concept's loss instead of the class images' one":
            lambda concept_prediction, concept_target, class_prediction, class_target, prior_weight:
                prior_weight * F.mse_loss(concept_prediction, concept_target)
                + F.mse_loss(class_prediction, class_target),
        "λ left out: the class images' loss is weighted by prior_weight":
            lambda concept_prediction, concept_target, class_prediction, class_target, prior_weight:
                prior_preservation_loss(concept_prediction, concept_target, class_prediction, class_target, 1.0),
        "one mean over both batches: each loss is a mean over its own batch, then they are added":
            lambda concept_prediction, concept_target, class_prediction, class_target, prior_weight:
                F.mse_loss(torch.cat([concept_prediction, prior_weight ** 0.5 * class_prediction]),
                           torch.cat([concept_target, prior_weight ** 0.5 * class_target])),
        "squared errors summed rather than averaged (F.mse_loss's default is the mean)":
            lambda concept_prediction, concept_target, class_prediction, class_target, prior_weight:
                F.mse_loss(concept_prediction, concept_target, reduction="sum")
                + prior_weight * F.mse_loss(class_prediction, class_target, reduction="sum"),
    }
    return compare("prior_preservation_loss", learner, prior_preservation_loss, cases, mistakes,
                   gradients=("concept_prediction", "class_prediction"), seed=seed)
