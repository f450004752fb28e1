"""Checkers for chapter 03's exercises: a BPE merge step, causal attention, CLIP's loss, zero-shot classification."""
from __future__ import annotations

from typing import Callable

import torch

from .base import CheckResult, clone, compare, describe, verdict


def _merge_first_only(parts, bpe_ranks):
    best = min(zip(parts, parts[1:]), key=lambda pair: bpe_ranks.get(pair, float("inf")), default=None)
    if best not in bpe_ranks:
        return None
    i = next(i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) == best)
    return parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def _merge_worst_rank(parts, bpe_ranks):
    known = [pair for pair in zip(parts, parts[1:]) if pair in bpe_ranks]
    if not known:
        return None
    best = max(known, key=bpe_ranks.get)
    return _merge_first_only(parts, {best: 0})


WORDS = ["photograph", "mississippi", "lowest", "astronaut", "banana", "zzzzzz", "a", "aaaa", "reproduction",
         "tokenizer", "bookkeeper", "hummingbird", "sunflower", "watercolour", "nonononono", "cathedral",
         "pepperoni", "illustration", "lollipop", "moonlight"]


def check_bpe_merge(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``merge_step(parts, bpe_ranks)``, one BPE step, or None when no pair is a merge.

    It replays the whole merge sequence of several words (always some with a repeated pair, and a
    random choice of others) and compares every step with ``clip.merge_best_pair``.
    """
    from .. import clip

    bpe_ranks = clip.Tokenizer().bpe_ranks
    mistakes = {
        "only the first occurrence of the best pair was merged; merge every non-overlapping occurrence, "
        "scanning left to right": _merge_first_only,
        "the pair with the *largest* rank was merged; rank 0 is the merge learnt first, the best one":
            _merge_worst_rank,
    }
    generator = torch.Generator().manual_seed(seed)
    others = [WORDS[i] for i in torch.randperm(len(WORDS) - 4, generator=generator)[:4].add(4).tolist()]
    words = ["mississippi", "banana", "zzzzzz", "a"] + others
    steps = 0
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while True:
            expected = clip.merge_best_pair(parts, bpe_ranks)
            try:
                got = learner(list(parts), bpe_ranks)
            except Exception as error:  # the learner's code may fail in any way; report it, don't crash
                return verdict(False, f"merge_step: your function raised {type(error).__name__}: {error}\n"
                                      f"  on parts={parts}.", "merge_step", steps + 1, seed)
            steps += 1
            if isinstance(got, tuple) and expected is not None and list(got) == expected:
                return verdict(False, f"merge_step: on parts={parts} you returned the right symbols as a tuple; "
                                      f"return a list.", "merge_step", steps, seed)
            if got != expected:
                message = f"merge_step: on parts={parts}\n  expected {expected}, got {got}."
                if expected is None:
                    message += "\n  Hint: no adjacent pair of these is in bpe_ranks: the word is finished, return None."
                else:
                    for mistake, wrong in mistakes.items():
                        if got == wrong(parts, bpe_ranks):
                            message += f"\n  Hint: {mistake}."
                            break
                return verdict(False, message, "merge_step", steps, seed)
            if expected is None:
                break
            parts = expected
    return verdict(True, f"merge_step: correct at all {steps} steps of {len(words)} words.", "merge_step", None, seed)


def reference_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v, where the mask hides every later position (what ``is_causal=True`` does)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def check_causal_attention(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``causal_attention(q, k, v)`` on (B, heads, L, d) tensors, written out by hand;
    differentiable in q, k and v."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(q=torch.randn(shape, generator=generator), k=torch.randn(shape, generator=generator),
                  v=torch.randn(shape, generator=generator)) for shape in [(2, 4, 7, 16), (1, 1, 77, 8), (3, 2, 1, 4)]]

    def later_only(q, k, v):
        L = q.shape[-2]
        return sdpa(q, k, v, attn_mask=torch.ones(L, L, dtype=torch.bool).triu())

    mistakes = {
        "no mask: every position attends to later ones too": lambda q, k, v: sdpa(q, k, v),
        "the mask is the wrong way round: position i sees i and the positions *after* it": later_only,
        "the scores were not divided by √d": lambda q, k, v: sdpa(q, k, v, is_causal=True, scale=1.0),
        "the scores divided by d instead of √d": lambda q, k, v: sdpa(q, k, v, is_causal=True, scale=1 / q.shape[-1]),
    }
    return compare("causal_attention", learner, reference_causal_attention, cases, mistakes, gradients=("q", "k", "v"),
                   rtol=1e-5, atol=1e-5, seed=seed)


def check_contrastive_loss(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``clip_loss(logits_per_text)``, CLIP's symmetric cross-entropy, a scalar;
    differentiable in the logits."""
    from .. import clip

    F = torch.nn.functional
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(logits_per_text=torch.randn(n, n, generator=generator) * scale) for n, scale in [(8, 3.0), (5, 10.0), (32, 1.0)]]

    def targets(logits):
        return torch.arange(len(logits))

    mistakes = {
        "only texts pick images; add the loss of images picking texts (the transposed logits) and average":
            lambda logits_per_text: F.cross_entropy(logits_per_text, targets(logits_per_text)),
        "only images pick texts; add the loss of texts picking images and average":
            lambda logits_per_text: F.cross_entropy(logits_per_text.T, targets(logits_per_text)),
        "the two directions were added, not averaged": lambda logits_per_text: 2 * clip.contrastive_loss(logits_per_text),
    }
    return compare("clip_loss", learner, clip.contrastive_loss, cases, mistakes, gradients=("logits_per_text",),
                   rtol=1e-5, atol=1e-5, shape_hint="return one number, the mean over the batch: a 0-d tensor.",
                   seed=seed)


def reference_zero_shot(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Class ids (N,): each image's nearest class by cosine similarity, the class being its prompts' mean direction."""
    from .. import clip

    image_features = torch.nn.functional.normalize(image_features, dim=-1)  # (N, D)
    return (image_features @ clip.zero_shot_weights(text_features).T).argmax(dim=1)  # (N,)


def _zero_shot_scores(image_features, text_features):
    F = torch.nn.functional
    directions = F.normalize(F.normalize(text_features, dim=-1).mean(dim=1), dim=-1)  # (C, D)
    return F.normalize(image_features, dim=-1) @ directions.T  # (N, C) cosine similarities


def check_zero_shot(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``zero_shot_classify(image_features, text_features)`` with (N, D) and (C, T, D)
    inputs -> (N,) int64 class ids. The reference scores in float64; an image whose two best classes
    score within 1e-5 of each other accepts either."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for n, classes, templates, width in [(200, 10, 3, 16), (300, 24, 5, 32), (50, 4, 1, 8)]:
        # lengths that vary a lot, so that leaving out a normalisation changes the answer
        lengths = torch.rand(classes, templates, 1, generator=generator) * 20 + 0.1
        cases.append(dict(image_features=torch.randn(n, width, generator=generator) * 5,
                          text_features=torch.randn(classes, templates, width, generator=generator) * lengths))
    mistakes = {
        "dot products without normalising: scale every text embedding to unit length first":
            lambda image_features, text_features: (image_features @ text_features.mean(dim=1).T).argmax(dim=1),
        "the templates were averaged before each was scaled to unit length, so the longest dominates":
            lambda image_features, text_features: (image_features @ torch.nn.functional.normalize(
                text_features.mean(dim=1), dim=-1).T).argmax(dim=1),
    }
    name = "zero_shot_classify"
    for number, case in enumerate(cases, start=1):
        inputs = ", ".join(f"{key}: {describe(value)}" for key, value in case.items())
        learner_inputs = {key: clone(value) for key, value in case.items()}
        try:
            got = learner(*learner_inputs.values())
        except Exception as error:  # the learner's code may fail in any way; report it, don't crash
            return verdict(False, f"{name}: your function raised {type(error).__name__}: {error}\n"
                                  f"  on case {number} ({inputs}).", name, number, seed)
        changed = [key for key in case if not torch.equal(learner_inputs[key], case[key])]
        if changed:
            return verdict(False, f"{name}: your function changed its input `{changed[0]}` in place; "
                                  f"normalise into new tensors.", name, number, seed)
        n = len(case["image_features"])
        if not isinstance(got, torch.Tensor):
            return verdict(False, f"{name}: expected a torch.Tensor of class ids, your function returned "
                                  f"{describe(got)}.", name, number, seed)
        if got.shape != (n,):
            return verdict(False, f"{name}: expected shape ({n},), one class id per image, got {tuple(got.shape)}. "
                                  f"Hint: take the argmax over the classes (dim=1).", name, number, seed)
        if got.dtype != torch.int64:
            return verdict(False, f"{name}: expected dtype torch.int64 (class ids, as argmax returns them), "
                                  f"got {got.dtype}.", name, number, seed)
        scores = _zero_shot_scores(case["image_features"].double(), case["text_features"].double())  # (N, C)
        best = scores.max(dim=1).values
        chosen = scores.gather(1, got.clamp(0, scores.shape[1] - 1)[:, None])[:, 0]
        wrong = (got < 0) | (got >= scores.shape[1]) | (chosen < best - 1e-5)
        if wrong.any():
            expected = scores.argmax(dim=1)
            first = int(wrong.nonzero()[0])
            message = (f"{name}: {int(wrong.sum())} of {n} predictions differ on case {number} ({inputs}); "
                       f"the first at image {first}: got class {int(got[first])}, expected {int(expected[first])}.")
            for mistake, mistaken in mistakes.items():
                if torch.equal(got, mistaken(**case)):
                    message += f"\n  Hint: your predictions match a common mistake: {mistake}."
                    break
            return verdict(False, message, name, number, seed)
    return verdict(True, f"{name}: correct on {len(cases)} random cases (ties within 1e-5 accept either class).",
                   name, None, seed)
