"""Chapter 09's LoRA checkers: right answers pass (written differently too), common mistakes are named."""
import torch

from ldm_teach import exercises
from ldm_teach.exercises import lora as checks
from ldm_teach.exercises import registry


def lora_forward(x, weight, bias, A, B, alpha, scale):
    y = x @ weight.T + (0 if bias is None else bias)
    return y + scale * (alpha / A.shape[0]) * (x @ A.T @ B.T)


def merge_lora_weight(weight, A, B, alpha, scale):
    return weight + scale * alpha / A.shape[0] * B @ A


def test_correct_answers_pass(capsys):
    assert checks.check_lora_forward(lora_forward)
    assert checks.check_lora_forward(lambda x, W, b, A, B, alpha, scale: torch.nn.functional.linear(x, W + scale * alpha / len(A) * B @ A, b))
    assert exercises.check_merge_lora_weight(merge_lora_weight, seed=7)
    assert checks.check_merge_lora_weight(checks.reference_merge_lora_weight)
    assert capsys.readouterr().out.count("✅") == 4


def test_forward_mistakes_are_named():
    result = checks.check_lora_forward(lambda x, W, b, A, B, alpha, scale:
                                       lora_forward(x, W, b, A, B, A.shape[0], scale))
    assert not result and "forgetting alpha / r" in result.message
    result = checks.check_lora_forward(lambda x, W, b, A, B, alpha, scale: lora_forward(x, W, b, A, B, alpha, 1.0))
    assert not result and "the caller's scale" in result.message
    result = checks.check_lora_forward(lambda x, W, b, A, B, alpha, scale: lora_forward(x, W, None, A, B, alpha, scale))
    assert not result and "bias" in result.message and "case 2" in result.message  # case 1 has no bias
    result = checks.check_lora_forward(lambda x, W, b, A, B, alpha, scale:
                                       lora_forward(x, W, b, A.detach(), B, alpha, scale))
    assert not result and "gradient" in result.message and "`A`" in result.message


def test_merge_mistakes_are_named():
    result = checks.check_merge_lora_weight(lambda W, A, B, alpha, scale: W + scale * B @ A)
    assert not result and "forgetting alpha / r" in result.message
    result = checks.check_merge_lora_weight(lambda W, A, B, alpha, scale: W + scale * alpha / len(A) * A.T @ B.T)
    assert not result and "wrong order" in result.message
    result = checks.check_merge_lora_weight(lambda W, A, B, alpha, scale: W + alpha / len(A) * B @ A)
    assert not result and "the caller's scale" in result.message
    result = checks.check_merge_lora_weight(lambda W, A, B, alpha, scale: (scale * alpha / len(A) * B @ A)[:, :3])
    assert not result and "expected shape" in result.message and "(out, in)" in result.message


def test_registered_under_chapter_09():
    labels = {exercise.label for exercise in registry.for_chapter("09", auto_graded=True)}
    assert {"ex-lora-forward", "ex-lora-merge"} <= labels
    assert registry.checker(registry.BY_LABEL["ex-lora-merge"]) is exercises.check_merge_lora_weight
