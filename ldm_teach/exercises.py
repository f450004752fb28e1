"""Checkers for the chapters' exercises.

A checker runs the learner's function and the package's own on the same random inputs and
says what is off: an exception, a wrong type, shape or dtype, or the worst value and where
it is. Where a wrong answer matches a common mistake, it names the mistake. It prints its
verdict and returns a ``CheckResult`` that is truthy when the function passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from . import diffusion


@dataclass
class CheckResult:
    passed: bool
    message: str

    def __bool__(self) -> bool:
        return self.passed

    def __repr__(self) -> str:
        return self.message


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of shape {tuple(value.shape)}, dtype {value.dtype}"
    return f"{type(value).__name__}"


def compare(name: str, learner: Callable, reference: Callable, cases: list[dict],
            mistakes: dict[str, Callable] | None = None, atol: float = 1e-5) -> CheckResult:
    """Run ``learner`` and ``reference`` on each case (keyword arguments) and report the first difference."""
    for number, case in enumerate(cases, start=1):
        inputs = ", ".join(f"{key}: {_describe(value)}" for key, value in case.items())
        expected = reference(**case)
        try:
            got = learner(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in case.items()})
        except Exception as error:  # the learner's code may fail in any way; report it, don't crash
            return _verdict(False, f"{name}: your function raised {type(error).__name__}: {error}\n"
                                   f"  on case {number} with {inputs}.")
        if not isinstance(got, torch.Tensor):
            return _verdict(False, f"{name}: expected a torch.Tensor, your function returned {_describe(got)}.")
        if got.shape != expected.shape:
            return _verdict(False, f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)} "
                                   f"on case {number} ({inputs}). Check how t broadcasts against x.")
        if got.dtype != expected.dtype:
            return _verdict(False, f"{name}: expected dtype {expected.dtype}, got {got.dtype}.")
        if not torch.isfinite(got).all():
            return _verdict(False, f"{name}: your result has NaN or inf values on case {number}.")
        difference = (got - expected).abs()
        worst = float(difference.max())
        if worst > atol:
            where = tuple(int(i) for i in torch.unravel_index(difference.argmax(), difference.shape))
            message = (f"{name}: values differ on case {number} ({inputs}).\n"
                       f"  worst |difference| {worst:.3g} at index {where}: "
                       f"got {float(got[where]):.6g}, expected {float(expected[where]):.6g}.")
            unchanged = [key for key, value in case.items()
                         if isinstance(value, torch.Tensor) and value.shape == got.shape and torch.equal(value, got)]
            if unchanged:
                message += f"\n  Hint: you returned the input `{unchanged[0]}` unchanged; is the function written yet?"
            for mistake, wrong in (mistakes or {}).items():
                if torch.allclose(got, wrong(**case), atol=atol):
                    message += f"\n  Hint: your result matches a common mistake: {mistake}."
                    break
            return _verdict(False, message)
    return _verdict(True, f"{name}: correct on {len(cases)} random cases (tolerance {atol:g}).")


def _verdict(passed: bool, message: str) -> CheckResult:
    print(("✅ " if passed else "❌ ") + message)
    return CheckResult(passed, message)


def _random_schedule(generator: torch.Generator) -> torch.Tensor:
    schedule = ["linear", "scaled_linear", "squaredcos_cap_v2"][int(torch.randint(3, (), generator=generator))]
    return diffusion.alphas_cumprod_from_betas(diffusion.make_betas(schedule, 1000, 0.00085, 0.012))


def _without_square_roots(x0, t, noise, alphas_cumprod):
    alpha_prod = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))  # (B, 1, ...)
    return alpha_prod * x0 + (1 - alpha_prod) * noise


def check_q_sample(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``q_sample(x0, t, noise, alphas_cumprod)`` -> x_t, for a batch of steps t."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape in [(8, 2), (4, 3, 8, 8), (1, 1)]:
        cases.append(dict(
            x0=torch.randn(shape, generator=generator),
            t=torch.randint(0, 1000, (shape[0],), generator=generator),
            noise=torch.randn(shape, generator=generator),
            alphas_cumprod=_random_schedule(generator),
        ))
    mistakes = {
        "the square roots left out (ᾱ_t and 1 - ᾱ_t where √ᾱ_t and √(1 - ᾱ_t) belong)": _without_square_roots,
        "the two coefficients swapped (noise scaled by √ᾱ_t)": lambda x0, t, noise, alphas_cumprod: diffusion.q_sample(
            noise, t, x0, alphas_cumprod),
        "alphas_cumprod[t - 1] instead of alphas_cumprod[t]": lambda x0, t, noise, alphas_cumprod: diffusion.q_sample(
            x0, (t - 1).clamp(min=0), noise, alphas_cumprod),
    }
    return compare("q_sample", learner, diffusion.q_sample, cases, mistakes)


def check_posterior_mean(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``posterior_mean(x0, x_t, t, alphas_cumprod)``, the mean of q(x_{t-1} | x_t, x_0)."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape, t in [((16, 2), 500), ((2, 3, 4, 4), 1), ((5, 2), 999), ((3, 2), 0)]:
        cases.append(dict(
            x0=torch.randn(shape, generator=generator),
            x_t=torch.randn(shape, generator=generator),
            t=t,
            alphas_cumprod=_random_schedule(generator),
        ))

    def swapped(x0, x_t, t, alphas_cumprod):
        return diffusion.q_posterior_mean(x_t, x0, t, alphas_cumprod)

    return compare("posterior_mean", learner, diffusion.q_posterior_mean, cases, {"x_0 and x_t swapped": swapped})


def reference_ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev):
    """One deterministic DDIM step (η = 0): predict x_0, then re-noise it to the previous level."""
    x0 = (x_t - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5
    return alpha_prod_prev**0.5 * x0 + (1 - alpha_prod_prev) ** 0.5 * eps


def check_ddim_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 01): ``ddim_step(eps, x_t, alpha_prod_t, alpha_prod_prev)`` -> x_{t_prev} with η = 0."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape in [(8, 2), (2, 4, 8, 8)]:
        alphas_cumprod = _random_schedule(generator)
        t, t_prev = sorted(torch.randint(0, 1000, (2,), generator=generator).tolist(), reverse=True)
        cases.append(dict(
            eps=torch.randn(shape, generator=generator),
            x_t=torch.randn(shape, generator=generator),
            alpha_prod_t=alphas_cumprod[t],
            alpha_prod_prev=alphas_cumprod[t_prev],
        ))

    def forgot_renoise(eps, x_t, alpha_prod_t, alpha_prod_prev):
        return (x_t - (1 - alpha_prod_t) ** 0.5 * eps) / alpha_prod_t**0.5

    mistakes = {"returned the predicted x_0 without moving it to the previous noise level": forgot_renoise}
    return compare("ddim_step", learner, reference_ddim_step, cases, mistakes)


# --- chapter 02: the VAE ---------------------------------------------------------------------


def _posterior(mean: torch.Tensor, logvar: torch.Tensor):
    from .vae import DiagonalGaussian  # imported here: each chapter's checkers keep their imports to themselves

    return DiagonalGaussian(torch.cat([mean, logvar], dim=1))  # moments (B, 2C, h, w)


def _latent_moments(generator: torch.Generator) -> list[dict]:
    cases = []
    for shape in [(2, 4, 8, 8), (3, 4, 5, 7), (1, 2, 4, 4)]:
        cases.append(dict(
            mean=2 * torch.randn(shape, generator=generator),
            logvar=torch.empty(shape).uniform_(-8.0, 2.0, generator=generator),
        ))
    return cases


def _wrong_shape(name: str, learner: Callable, case: dict, expected: torch.Tensor, hint: str) -> CheckResult | None:
    """A verdict when the learner's result has the wrong shape, with a hint for this exercise; None otherwise."""
    try:
        got = learner(**{k: v.clone() for k, v in case.items()})
    except Exception:
        return None  # compare() reports the exception with the inputs
    if isinstance(got, torch.Tensor) and got.shape != expected.shape:
        return _verdict(False, f"{name}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}")
    return None


def check_reparameterise(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 02): ``reparameterise(mean, logvar, eps)`` -> z = mean + std * eps, differentiable."""
    generator = torch.Generator().manual_seed(seed)
    cases = [dict(**moments, eps=torch.randn(moments["mean"].shape, generator=generator))
             for moments in _latent_moments(generator)]

    def reference(mean, logvar, eps):
        posterior = _posterior(mean, logvar)
        return posterior.mean + posterior.std * eps

    mistakes = {
        "the log-variance used as the standard deviation (mean + logvar * eps)":
            lambda mean, logvar, eps: mean + logvar * eps,
        "the variance used where the standard deviation belongs (exp(logvar) instead of exp(0.5 * logvar))":
            lambda mean, logvar, eps: mean + logvar.exp() * eps,
        "the square root taken twice (exp(0.25 * logvar))":
            lambda mean, logvar, eps: mean + (0.25 * logvar).exp() * eps,
        "eps left out: that returns the mean, the mode, not a sample": lambda mean, logvar, eps: mean,
    }
    try:  # the point of the trick: gradients reach mean and logvar
        mean, logvar = (cases[0][key].clone().requires_grad_(True) for key in ("mean", "logvar"))
        z = learner(mean, logvar, cases[0]["eps"].clone())
        detached = isinstance(z, torch.Tensor) and not z.requires_grad and torch.allclose(z, reference(**cases[0]), atol=1e-4)
    except Exception:  # fails only when gradients are on (e.g. .numpy())? Otherwise compare() reports it.
        try:
            learner(**{key: value.clone() for key, value in cases[0].items()})
            detached = True
        except Exception:
            detached = False
    if detached:
        return _verdict(False, "reparameterise: the values are right, but no gradient reaches mean and logvar; "
                               "build z from them with torch operations (no .detach(), .item() or NumPy), which is "
                               "the whole point of the trick.")
    return compare("reparameterise", learner, reference, cases, mistakes, atol=1e-4)


def check_kl_divergence(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 02): ``kl_divergence(mean, logvar)`` -> KL(N(mean, exp(logvar)) || N(0, I)) per sample, (B,)."""
    cases = _latent_moments(torch.Generator().manual_seed(seed))

    def reference(mean, logvar):
        return _posterior(mean, logvar).kl()

    wrong = _wrong_shape("kl_divergence", learner, cases[0], reference(**cases[0]),
                         "Return one KL per image: sum over the channel and spatial dimensions (1, 2, 3) only.")
    if wrong is not None:
        return wrong
    mistakes = {
        "the factor 1/2 left out": lambda mean, logvar: 2 * reference(mean, logvar),
        "a mean over the latent entries instead of a sum":
            lambda mean, logvar: reference(mean, logvar) / mean[0].numel(),
        "the sign of the log-variance term flipped (+ logvar instead of - logvar)":
            lambda mean, logvar: 0.5 * torch.sum(mean**2 + logvar.exp() - 1 + logvar, dim=(1, 2, 3)),
        "the standard deviation used where the variance belongs (exp(0.5 * logvar) instead of exp(logvar))":
            lambda mean, logvar: 0.5 * torch.sum(mean**2 + (0.5 * logvar).exp() - 1 - logvar, dim=(1, 2, 3)),
        "the mean's term left out (KL of the spread alone)":
            lambda mean, logvar: 0.5 * torch.sum(logvar.exp() - 1 - logvar, dim=(1, 2, 3)),
    }
    return compare("kl_divergence", learner, reference, cases, mistakes, atol=1e-3)


def reference_scaling_factor(latents: torch.Tensor) -> torch.Tensor:
    """LDM's rule: one number, 1 / (the standard deviation of every latent value in the batch)."""
    return 1.0 / latents.flatten().std()


def check_scaling_factor(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 02): ``scaling_factor(latents)`` -> the one number that gives a batch of latents unit variance."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for shape, spread, offset in [((8, 4, 16, 16), 5.49, 0.8), ((16, 4, 8, 8), 2.5, -0.3), ((4, 4, 32, 16), 4.0, 1.5)]:
        channel_spread = spread * torch.tensor([1.0, 0.6, 1.3, 0.9]).view(1, 4, 1, 1)  # channels differ, as SD's do
        cases.append(dict(latents=offset + channel_spread * torch.randn(shape, generator=generator)))

    def as_tensor(latents):
        value = learner(latents)
        return torch.tensor(float(value)) if isinstance(value, (float, int)) else value

    wrong = _wrong_shape("scaling_factor", as_tensor, cases[0], reference_scaling_factor(**cases[0]),
                         "Return one number for the whole batch: SD multiplies every channel by the same factor.")
    if wrong is not None:
        return wrong
    mistakes = {
        "the standard deviation itself, not its reciprocal": lambda latents: latents.flatten().std(),
        "1 / variance instead of 1 / standard deviation": lambda latents: 1.0 / latents.flatten().var(),
        "1 / root mean square: the mean was not subtracted (std measures the spread about the mean)":
            lambda latents: latents.pow(2).mean().rsqrt(),
        "the average of per-channel factors instead of one factor from all values":
            lambda latents: (1.0 / latents.transpose(0, 1).flatten(1).std(dim=1)).mean(),
    }
    return compare("scaling_factor", as_tensor, reference_scaling_factor, cases, mistakes, atol=1e-4)


# --- chapter 03: CLIP ------------------------------------------------------------------------


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


def check_bpe_merge(learner: Callable) -> CheckResult:
    """Exercise (chapter 03): ``merge_step(parts, bpe_ranks)``, one BPE step, or None when no pair is a merge.

    It replays the whole merge sequence of several words (one with a repeated pair) and compares
    every step with ``clip.merge_best_pair``.
    """
    from . import clip

    bpe_ranks = clip.Tokenizer().bpe_ranks
    mistakes = {
        "only the first occurrence of the best pair was merged; merge every occurrence": _merge_first_only,
        "the pair with the *largest* rank was merged; rank 0 is the merge learnt first, the best one":
            _merge_worst_rank,
    }
    words = ["photograph", "mississippi", "lowest", "astronaut", "banana", "zzzzzz", "a"]
    steps = 0
    for word in words:
        parts = [*word[:-1], word[-1] + "</w>"]
        while True:
            expected = clip.merge_best_pair(parts, bpe_ranks)
            try:
                got = learner(list(parts), bpe_ranks)
            except Exception as error:  # the learner's code may fail in any way; report it, don't crash
                return _verdict(False, f"merge_step: your function raised {type(error).__name__}: {error}\n"
                                       f"  on parts={parts}.")
            steps += 1
            if got != expected:
                message = f"merge_step: on parts={parts}\n  expected {expected}, got {got}."
                if expected is None:
                    message += "\n  No adjacent pair of these is in bpe_ranks: the word is finished, return None."
                for mistake, wrong in mistakes.items():
                    if got == wrong(parts, bpe_ranks):
                        message += f"\n  Hint: {mistake}."
                        break
                return _verdict(False, message)
            if expected is None:
                break
            parts = expected
    return _verdict(True, f"merge_step: correct at all {steps} steps of {len(words)} words.")


def reference_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d + mask) v, where the mask hides every later position (what ``is_causal=True`` does)."""
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def check_causal_attention(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``causal_attention(q, k, v)`` on (B, heads, L, d) tensors, written out by hand."""
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
    }
    return compare("causal_attention", learner, reference_causal_attention, cases, mistakes)


def check_contrastive_loss(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``clip_loss(logits_per_text)``, CLIP's symmetric cross-entropy, a scalar."""
    from . import clip

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
    return compare("clip_loss", learner, clip.contrastive_loss, cases, mistakes)


def reference_zero_shot(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Class ids (N,): each image's nearest class by cosine similarity, the class being its prompts' mean direction."""
    from . import clip

    image_features = torch.nn.functional.normalize(image_features, dim=-1)  # (N, D)
    return (image_features @ clip.zero_shot_weights(text_features).T).argmax(dim=1)  # (N,)


def check_zero_shot(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 03): ``zero_shot_classify(image_features, text_features)`` with (N, D) and (C, T, D) inputs."""
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
    return compare("zero_shot_classify", learner, reference_zero_shot, cases, mistakes, atol=0)


# --- chapter 04: the U-Net -------------------------------------------------------------------


def check_timestep_embedding(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 04): ``timestep_embedding(t, dim)`` -> (B, dim), SD's sinusoidal features
    (cosines first, frequencies exp(-ln(10000) i / (dim/2)) for i = 0 .. dim/2 - 1)."""
    from .unet import timestep_embedding

    generator = torch.Generator().manual_seed(seed)
    cases = [dict(t=torch.randint(0, 1000, (batch,), generator=generator), dim=dim)
             for batch, dim in [(5, 16), (3, 320), (1, 64)]]
    mistakes = {
        "sin and cos in the wrong order (SD puts the cosines first: flip_sin_to_cos=True)":
            lambda t, dim: timestep_embedding(t, dim, flip_sin_to_cos=False),
        "the exponent divided by dim/2 - 1 instead of dim/2 (that is freq_shift=1, DDPM's variant)":
            lambda t, dim: timestep_embedding(t, dim, freq_shift=1),
        "sin and cos interleaved (sin t f_0, cos t f_0, sin t f_1, ...) instead of all cosines, then all sines":
            lambda t, dim: torch.stack(timestep_embedding(t, dim, flip_sin_to_cos=False).chunk(2, dim=-1),
                                       dim=-1).flatten(1),
    }
    return compare("timestep_embedding", learner, timestep_embedding, cases, mistakes, atol=1e-4)


def check_cross_attention(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 04): ``cross_attention(x, context, attention)``, what the package's
    ``Attention`` layer ``attention`` computes for image tokens x (B, N, C) and text tokens context
    (B, L, D), written with its weights (to_q, to_k, to_v, to_out) and its heads and head_dim."""
    from .unet import Attention

    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, tokens, length, query_dim, context_dim, heads in [(2, 16, 7, 32, 24, 4), (1, 9, 77, 16, 16, 2),
                                                                 (3, 4, 3, 8, 12, 1)]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        attention = Attention(query_dim, heads, query_dim // heads, context_dim=context_dim).eval().requires_grad_(False)
        cases.append(dict(x=torch.randn(batch, tokens, query_dim, generator=generator),
                          context=torch.randn(batch, length, context_dim, generator=generator),
                          attention=attention))

    def reference(x, context, attention):
        with torch.no_grad():
            return attention(x, context)

    def variant(scale_dim=None, softmax_dim=-1, split_heads=True):
        def attend(x, context, attention):
            B, N, _ = x.shape
            heads, head_dim = (attention.heads, attention.head_dim) if split_heads else (1, attention.heads * attention.head_dim)
            with torch.no_grad():
                q = attention.to_q(x).view(B, N, heads, head_dim).transpose(1, 2)
                k = attention.to_k(context).view(B, context.shape[1], heads, head_dim).transpose(1, 2)
                v = attention.to_v(context).view(B, context.shape[1], heads, head_dim).transpose(1, 2)
                scores = q @ k.transpose(-1, -2) / (scale_dim or head_dim) ** 0.5
                out = scores.softmax(dim=softmax_dim) @ v
                return attention.to_out(out.transpose(1, 2).reshape(B, N, heads * head_dim))
        return attend

    mistakes = {
        "no 1/√d scaling of the scores": variant(scale_dim=1),
        "the scores scaled by 1/√(heads·head_dim) instead of 1/√head_dim": lambda x, context, attention: variant(
            scale_dim=attention.heads * attention.head_dim)(x, context, attention),
        "the softmax taken over the image tokens (dim -2) instead of over the text tokens (dim -1)":
            variant(softmax_dim=-2),
        "one head of heads·head_dim channels instead of `heads` heads of head_dim": variant(split_heads=False),
    }
    return compare("cross_attention", learner, reference, cases, mistakes, atol=1e-5)


def check_resblock_forward(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 04): ``resblock_forward(block, x, time_emb)``, what the package's ``ResBlock``
    ``block`` computes, written with its layers (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut)."""
    import torch.nn.functional as F

    from .unet import ResBlock

    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, in_channels, out_channels, side, time_dim in [(2, 8, 16, 6, 32), (1, 16, 16, 5, 24), (3, 8, 8, 4, 16)]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        block = ResBlock(in_channels, out_channels, time_dim, groups=4, eps=1e-5).eval()
        with torch.no_grad():  # make the norms' affine parameters matter
            for name, parameter in block.named_parameters():
                if "norm" in name:
                    parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        block.requires_grad_(False)
        cases.append(dict(block=block, x=torch.randn(batch, in_channels, side, side, generator=generator),
                          time_emb=torch.randn(batch, time_dim, generator=generator)))

    def reference(block, x, time_emb):
        with torch.no_grad():
            return block(x, time_emb)

    def variant(time_silu=True, time_after_conv2=False, skip=True):
        def forward(block, x, time_emb):
            with torch.no_grad():
                time = block.time_emb_proj(F.silu(time_emb) if time_silu else time_emb)[:, :, None, None]
                h = block.conv1(F.silu(block.norm1(x)))
                h = h if time_after_conv2 else h + time
                h = block.conv2(F.silu(block.norm2(h)))
                h = h + time if time_after_conv2 else h
                if not skip:
                    return h
                return h + (x if block.conv_shortcut is None else block.conv_shortcut(x))
        return forward

    mistakes = {
        "no SiLU on the time embedding before time_emb_proj": variant(time_silu=False),
        "the time embedding added after the second conv instead of after the first": variant(time_after_conv2=True),
        "the skip connection left out (return skip + h)": variant(skip=False),
    }
    return compare("resblock_forward", learner, reference, cases, mistakes, atol=1e-5)


# --- chapter 05: training ----------------------------------------------------------------------


def _tiny_unet(seed: int, channels: int = 4, context_dim: int = 16):
    from .unet import UNet, UNetConfig

    torch.manual_seed(seed)
    return UNet(UNetConfig.tiny(in_channels=channels, out_channels=channels, block_out_channels=(8, 16),
                                norm_num_groups=4, attention_head_dim=2, cross_attention_dim=context_dim))


def check_training_step(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 05): ``training_step(unet, latents, context, alphas_cumprod, generator)`` -> the
    loss of one step of latent diffusion training: t drawn with ``torch.randint(0, T, (B,), generator=...)``,
    then ε with ``torch.randn(latents.shape, generator=...)``, the latents noised to x_t, and the MSE
    between ``unet(x_t, t, context)`` and ε. The loss must carry gradients to the U-Net."""
    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, side, schedule in [(4, 8, "scaled_linear"), (2, 4, "linear"), (3, 6, "squaredcos_cap_v2")]:
        cases.append(dict(unet=_tiny_unet(int(torch.randint(0, 2**31, (), generator=generator))),
                          latents=torch.randn(batch, 4, side, side, generator=generator),
                          context=torch.randn(batch, 5, 16, generator=generator),
                          alphas_cumprod=diffusion.NoiseSchedule.make(schedule, 1000, 0.00085, 0.012).alphas_cumprod,
                          seed=int(torch.randint(0, 2**31, (), generator=generator))))

    def reference(unet, latents, context, alphas_cumprod, seed, target="noise", noise_first=False):
        step_generator = torch.Generator().manual_seed(seed)
        if noise_first:
            noise = torch.randn(latents.shape, generator=step_generator)
            t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=step_generator)
        else:
            t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=step_generator)
            noise = torch.randn(latents.shape, generator=step_generator)
        x_t = diffusion.q_sample(latents, t, noise, alphas_cumprod)
        wanted = {"noise": noise, "latents": latents, "x_t": x_t}[target]
        return torch.nn.functional.mse_loss(unet(x_t, t, context), wanted)

    def run_learner(unet, latents, context, alphas_cumprod, seed):
        loss = learner(unet, latents, context, alphas_cumprod, torch.Generator().manual_seed(seed))
        if isinstance(loss, torch.Tensor) and not loss.requires_grad:
            raise ValueError("the loss carries no gradient back to the U-Net: compute it from unet(x_t, t, context), "
                             "and not under torch.no_grad()")
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    mistakes = {
        "the U-Net's output compared with the clean latents instead of the noise ε": partial(reference, target="latents"),
        "the U-Net's output compared with the noisy latents x_t instead of the noise ε": partial(reference, target="x_t"),
        "ε drawn before t: the same math on other random numbers; draw t first, then ε": partial(reference, noise_first=True),
    }
    return compare("training_step", run_learner, lambda **case: reference(**case).detach(), cases, mistakes, atol=1e-5)


def check_caption_dropout(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 05): ``caption_dropout(context, empty_context, probability, generator)``: each
    caption's context (B, L, D) replaced, whole, by the empty prompt's (L, D) where
    ``torch.rand(B, generator=generator)`` falls below ``probability``."""
    from .train import caption_dropout

    generator = torch.Generator().manual_seed(seed)
    cases = [dict(context=torch.randn(batch, length, width, generator=generator),
                  empty_context=torch.randn(length, width, generator=generator), probability=probability,
                  seed=int(torch.randint(0, 2**31, (), generator=generator)))
             for batch, length, width, probability in [(64, 7, 8, 0.1), (16, 77, 4, 0.5), (8, 3, 2, 1.0)]]

    def reference(context, empty_context, probability, seed, fill=None, keep_below=False):
        drop = torch.rand(len(context), generator=torch.Generator().manual_seed(seed)) < probability  # (B,)
        drop = ~drop if keep_below else drop
        empty = empty_context if fill is None else torch.full_like(empty_context, fill)
        return torch.where(drop[:, None, None], empty, context)

    mistakes = {
        "dropped captions set to zeros instead of the empty prompt's features (the pipeline's unconditional "
        "input is the encoded empty prompt, not zeros)": partial(reference, fill=0.0),
        "the test inverted: captions dropped where the draw is at least `probability`, so 90% are dropped at 0.1":
            partial(reference, keep_below=True),
    }
    return compare("caption_dropout", lambda seed, **case: learner(generator=torch.Generator().manual_seed(seed), **case),
                   lambda seed, **case: caption_dropout(generator=torch.Generator().manual_seed(seed), **case),
                   cases, mistakes, atol=0)


def check_ema_update(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 05): ``ema_update(ema_model, model, decay)`` moves each parameter of ``ema_model``
    in place to decay·ema + (1 - decay)·model and leaves ``model`` alone; it returns nothing."""
    import copy

    from .train import ema_update

    generator = torch.Generator().manual_seed(seed)
    cases = []
    for decay, width in [(0.999, 6), (0.9, 3), (0.5, 5)]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        model = torch.nn.Sequential(torch.nn.Linear(width, 4), torch.nn.SiLU(), torch.nn.Linear(4, 2))
        cases.append(dict(ema_model=copy.deepcopy(model).requires_grad_(False), model=model, decay=decay))
        with torch.no_grad():  # the EMA lags behind a model that has moved on
            for parameter in model.parameters():
                parameter.add_(torch.randn(parameter.shape, generator=generator))

    def flat(module):
        return torch.cat([p.detach().flatten() for p in module.parameters()])

    def run(update, ema_model, model, decay):
        ema_model, model = copy.deepcopy(ema_model), copy.deepcopy(model)
        before = flat(model)
        result = update(ema_model, model, decay)
        if result is not None and not isinstance(result, torch.nn.Module):
            raise ValueError(f"ema_update returned a {type(result).__name__}; update ema_model's parameters in place")
        if not torch.equal(flat(model), before):
            raise ValueError("the model's own weights changed; only ema_model's may change")
        return flat(ema_model)

    def swapped(ema_model, model, decay):
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
                ema_parameter.copy_(decay * parameter + (1 - decay) * ema_parameter)

    mistakes = {
        "decay and 1 - decay swapped: the EMA jumps almost all the way to the new weights": partial(run, swapped),
        "ema_model left unchanged: assign into its parameters in place (.lerp_, .mul_().add_(), .copy_)":
            partial(run, lambda ema_model, model, decay: None),
    }
    return compare("ema_update", partial(run, learner), partial(run, ema_update), cases, mistakes, atol=1e-6)


# --- chapter 06: inference -------------------------------------------------------------------


def check_guidance(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 06): ``guidance(noise_uncond, noise_text, guidance_scale)``, classifier-free
    guidance's combination of the unconditional and the text-conditioned noise predictions."""
    from .pipeline import classifier_free_guidance

    generator = torch.Generator().manual_seed(seed)
    cases = [dict(noise_uncond=torch.randn(shape, generator=generator),
                  noise_text=torch.randn(shape, generator=generator), guidance_scale=scale)
             for shape, scale in [((2, 4, 8, 8), 7.5), ((1, 4, 6, 10), 1.0), ((3, 4, 4, 4), 0.0)]]
    mistakes = {
        "the two predictions swapped: ε_text + s·(ε_uncond − ε_text) pushes away from the prompt":
            lambda noise_uncond, noise_text, guidance_scale: noise_text + guidance_scale * (noise_uncond - noise_text),
        "the step taken from ε_text instead of ε_uncond: ε_text + s·(ε_text − ε_uncond)":
            lambda noise_uncond, noise_text, guidance_scale: noise_text + guidance_scale * (noise_text - noise_uncond),
        "only the text prediction scaled: ε_uncond + s·ε_text":
            lambda noise_uncond, noise_text, guidance_scale: noise_uncond + guidance_scale * noise_text,
        "the difference not scaled by guidance_scale (that is plain ε_text)":
            lambda noise_uncond, noise_text, guidance_scale: noise_text,
    }
    return compare("guidance", learner, classifier_free_guidance, cases, mistakes, atol=1e-5)


def reference_denoising_loop(unet, scheduler, latents, context, uncond_context, guidance_scale: float,
                             num_inference_steps: int, init_sigma: bool = True, scale_input: bool = True,
                             halves_swapped: bool = False) -> torch.Tensor:
    """The sampling loop of chapter 06 (on a copy of ``scheduler``); the flags make the checker's common mistakes."""
    import copy

    from .pipeline import classifier_free_guidance

    scheduler = copy.deepcopy(scheduler)  # the learner gets the scheduler untouched, timesteps not yet set
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma if init_sigma else latents
    both_contexts = torch.cat([uncond_context, context])  # (2B, L, D): unconditional rows first
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2)  # (2B, C, h, w)
            model_input = scheduler.scale_model_input(model_input, t) if scale_input else model_input
            noise_uncond, noise_text = unet(model_input, t, both_contexts).chunk(2)
            if halves_swapped:
                noise_uncond, noise_text = noise_text, noise_uncond
            latents = scheduler.step(classifier_free_guidance(noise_uncond, noise_text, guidance_scale), t, latents)
    return latents


def check_denoising_loop(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 06): ``denoise(unet, scheduler, latents, context, uncond_context, guidance_scale,
    num_inference_steps)`` -> the final latents, the whole guided sampling loop written out."""
    from functools import partial

    from .schedulers import DDIMScheduler, EulerDiscreteScheduler
    from .unet import UNet, UNetConfig

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet = UNet(UNetConfig.tiny(cross_attention_dim=32)).eval().requires_grad_(False)
    sd15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    cases = []
    for scheduler, batch, scale, steps in [(EulerDiscreteScheduler(**sd15), 2, 7.5, 4),
                                           (DDIMScheduler(**sd15, steps_offset=1), 1, 3.0, 3)]:
        cases.append(dict(unet=unet, scheduler=scheduler, latents=torch.randn(batch, 4, 8, 8, generator=generator),
                          context=torch.randn(batch, 7, 32, generator=generator),
                          uncond_context=torch.randn(batch, 7, 32, generator=generator),
                          guidance_scale=scale, num_inference_steps=steps))
    mistakes = {
        "the starting latents not multiplied by scheduler.init_noise_sigma (Euler starts from noise of std σ_max)":
            partial(reference_denoising_loop, init_sigma=False),
        "scheduler.scale_model_input(model_input, t) left out (Euler's U-Net must see x / √(σ² + 1))":
            partial(reference_denoising_loop, scale_input=False),
        "the two halves of the U-Net's output swapped: the unconditional rows come first":
            partial(reference_denoising_loop, halves_swapped=True),
        "no guidance: the text prediction alone (that is guidance_scale = 1)":
            lambda **case: reference_denoising_loop(**{**case, "guidance_scale": 1.0}),
    }
    return compare("denoise", learner, reference_denoising_loop, cases, mistakes, atol=1e-4)


def reference_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents in the U-Net's (scaled) space -> images (B, 3, H, W) in [0, 1], as the pipeline decodes them."""
    with torch.no_grad():
        return (vae.decode(latents / vae.scaling_factor) * 0.5 + 0.5).clamp(0, 1)


def check_decode_latents(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 06): ``decode(vae, latents)`` -> images (B, 3, H, W) in [0, 1]: undo the
    scaling factor, decode, and map the decoder's [-1, 1] to [0, 1]."""
    from dataclasses import replace

    from .vae import AutoencoderKL, VAEConfig

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae = AutoencoderKL(replace(VAEConfig.tiny(), scaling_factor=0.18215)).eval().requires_grad_(False)
    with torch.no_grad():  # a louder decoder, so that its output leaves [-1, 1] and clipping matters
        vae.decoder.conv_out.weight.mul_(4)
    cases = [dict(vae=vae, latents=torch.randn(shape, generator=generator)) for shape in [(2, 4, 8, 8), (1, 4, 6, 10)]]

    def decoded(vae, latents, scale=None):
        with torch.no_grad():
            return vae.decode(latents / vae.scaling_factor if scale is None else latents * scale)

    mistakes = {
        "the latents multiplied by vae.scaling_factor instead of divided by it":
            lambda vae, latents: (decoded(vae, latents, vae.scaling_factor) * 0.5 + 0.5).clamp(0, 1),
        "the latents not divided by vae.scaling_factor before decoding":
            lambda vae, latents: (decoded(vae, latents, 1.0) * 0.5 + 0.5).clamp(0, 1),
        "the images left in the decoder's [-1, 1] (map them with x / 2 + 0.5)":
            lambda vae, latents: decoded(vae, latents).clamp(-1, 1),
        "the images not clipped to [0, 1] (the decoder's output is not bounded)":
            lambda vae, latents: decoded(vae, latents) * 0.5 + 0.5,
    }
    return compare("decode", learner, reference_decode, cases, mistakes, atol=1e-5)
