"""Chapter 09's checkers: the package's answers pass, common mistakes are named, in-place changes caught."""
import torch
import torch.nn.functional as F

from ldm_teach.exercises import finetune as checks
from ldm_teach.exercises import registry
from ldm_teach.finetune import prior_preservation_loss, textual_inversion_update


def test_correct_answers_pass(capsys):
    assert checks.check_ti_update(textual_inversion_update)
    assert checks.check_prior_loss(prior_preservation_loss)

    def by_hand(concept_prediction, concept_target, class_prediction, class_target, prior_weight):
        return ((concept_prediction - concept_target) ** 2).mean() + prior_weight * (
            (class_prediction - class_target) ** 2).mean()

    assert checks.check_prior_loss(by_hand)
    assert capsys.readouterr().out.count("✅") == 3


def test_ti_update_mistakes():
    result = checks.check_ti_update(lambda table, frozen_table, new_ids: frozen_table.clone())
    assert not result and "the new ones too" in result.message
    result = checks.check_ti_update(lambda table, frozen_table, new_ids: table.clone())
    assert not result and "nothing put back" in result.message

    def last_row(table, frozen_table, new_ids):
        out = frozen_table.clone()
        out[-1] = table[-1]
        return out

    result = checks.check_ti_update(last_row)
    assert not result and "need not be the last" in result.message

    def in_place(table, frozen_table, new_ids):
        frozen_table[new_ids] = table[new_ids].detach()
        return frozen_table

    assert not checks.check_ti_update(in_place)


def test_prior_loss_mistakes():
    result = checks.check_prior_loss(lambda cp, ct, kp, kt, w: w * F.mse_loss(cp, ct) + F.mse_loss(kp, kt))
    assert not result and "λ on the concept's loss" in result.message
    result = checks.check_prior_loss(lambda cp, ct, kp, kt, w: F.mse_loss(cp, ct) + F.mse_loss(kp, kt))
    assert not result and "λ left out" in result.message
    result = checks.check_prior_loss(lambda cp, ct, kp, kt, w: F.mse_loss(torch.cat([cp, kp]), torch.cat([ct, kt])))
    assert not result
    result = checks.check_prior_loss(lambda cp, ct, kp, kt, w: F.mse_loss(cp, ct, reduction="sum")
                                     + w * F.mse_loss(kp, kt, reduction="sum"))
    assert not result and "summed rather than averaged" in result.message
    result = checks.check_prior_loss(lambda cp, ct, kp, kt, w: (F.mse_loss(cp, ct) + w * F.mse_loss(kp, kt)).detach())
    assert not result and "gradient" in result.message


def test_registered_for_chapter_09_with_seeds():
    labels = [exercise.label for exercise in registry.for_chapter("09", auto_graded=True)]
    assert labels == ["ex-lora-forward", "ex-lora-merge", "ex-ti-update", "ex-prior-loss"]  # in the chapter's order
    assert registry.checker(registry.BY_LABEL["ex-prior-loss"]) is checks.check_prior_loss
    assert checks.check_ti_update(textual_inversion_update, seed=5).seed == 5
