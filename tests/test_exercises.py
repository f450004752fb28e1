import math

import pytest
import torch
import torch.nn.functional as F

from ldm_teach import diffusion, exercises
from ldm_teach.exercises import registry


def test_correct_answers_pass(capsys):
    assert exercises.check_q_sample(diffusion.q_sample)
    assert exercises.check_posterior_mean(diffusion.q_posterior_mean)
    assert exercises.check_ddim_step(exercises.reference_ddim_step)
    assert capsys.readouterr().out.count("✅") == 3


def test_wrong_answer_names_the_worst_value_and_the_mistake():
    def no_sqrt(x0, t, noise, alphas_cumprod):
        a = alphas_cumprod[t].reshape(-1, *[1] * (x0.ndim - 1))
        return a * x0 + (1 - a) * noise

    result = exercises.check_q_sample(no_sqrt)
    assert not result
    assert "worst |difference|" in result.message and "at index" in result.message
    assert "√ᾱ_t" in result.message


def test_shape_errors_and_exceptions_are_reported():
    def unbroadcast(x0, t, noise, alphas_cumprod):
        return alphas_cumprod[t].sqrt() * x0 + (1 - alphas_cumprod[t]).sqrt() * noise

    result = exercises.check_q_sample(unbroadcast)
    assert not result and ("raised RuntimeError" in result.message or "expected shape" in result.message)

    result = exercises.check_ddim_step(lambda eps, x_t, alpha_prod_t, alpha_prod_prev: x_t.sum(dim=0))
    assert not result and "expected shape" in result.message

    result = exercises.check_posterior_mean(lambda x0, x_t, t, alphas_cumprod: None)
    assert not result and "returned NoneType" in result.message


def test_ddim_mistake_is_recognised():
    def forgot(eps, x_t, alpha_prod_t, alpha_prod_prev):
        return (x_t - (1 - alpha_prod_t).sqrt() * eps) / alpha_prod_t.sqrt()

    result = exercises.check_ddim_step(forgot)
    assert not result and "previous noise level" in result.message
    assert torch.is_tensor(forgot(torch.zeros(1), torch.zeros(1), torch.tensor(0.5), torch.tensor(0.6)))


# --- chapter 02: the VAE ---


def test_vae_correct_answers_pass(capsys):
    assert exercises.check_reparameterise(lambda mean, logvar, eps: mean + torch.exp(0.5 * logvar) * eps)
    assert exercises.check_kl_divergence(
        lambda mean, logvar: -0.5 * torch.sum(1 + logvar - mean**2 - logvar.exp(), dim=(1, 2, 3)))
    assert exercises.check_scaling_factor(lambda latents: 1 / latents.std())
    assert exercises.check_scaling_factor(lambda latents: float(1 / latents.std()))  # a plain float is fine too
    assert exercises.check_scaling_factor(lambda latents: 1 / latents.std(unbiased=False))  # either std estimate
    assert capsys.readouterr().out.count("✅") == 5


def test_reparameterise_mistakes_are_named():
    result = exercises.check_reparameterise(lambda mean, logvar, eps: mean + logvar.exp() * eps)
    assert not result and "exp(0.5 * logvar)" in result.message and "worst |difference|" in result.message
    result = exercises.check_reparameterise(lambda mean, logvar, eps: mean + logvar * eps)
    assert not result and "log-variance used as the standard deviation" in result.message
    result = exercises.check_reparameterise(lambda mean, logvar, eps: (mean + (0.5 * logvar).exp() * eps).detach())
    assert not result and "no gradient reaches `mean`" in result.message


def test_kl_divergence_mistakes_are_named():
    def full(mean, logvar):
        return 0.5 * (mean**2 + logvar.exp() - 1 - logvar)

    result = exercises.check_kl_divergence(lambda mean, logvar: full(mean, logvar).sum(dim=(1, 2, 3)) * 2)
    assert not result and "factor 1/2" in result.message
    result = exercises.check_kl_divergence(lambda mean, logvar: full(mean, logvar).mean(dim=(1, 2, 3)))
    assert not result and "a mean over the latent entries" in result.message
    result = exercises.check_kl_divergence(lambda mean, logvar: full(mean, logvar).sum())
    assert not result and "expected shape (2,), got ()" in result.message and "one KL per image" in result.message


def test_scaling_factor_mistakes_are_named():
    result = exercises.check_scaling_factor(lambda latents: latents.std())
    assert not result and "not its reciprocal" in result.message
    result = exercises.check_scaling_factor(lambda latents: latents.pow(2).mean().rsqrt())
    assert not result and "mean was not subtracted" in result.message
    result = exercises.check_scaling_factor(lambda latents: 1 / latents.std(dim=(0, 2, 3)))
    assert not result and "one number for the whole batch" in result.message
    result = exercises.check_scaling_factor(lambda latents: None)
    assert not result and "returned NoneType" in result.message


# --- chapter 03: CLIP ---


def test_clip_checkers_pass_correct_answers(capsys):
    from ldm_teach import clip

    assert exercises.check_bpe_merge(clip.merge_best_pair)
    assert exercises.check_causal_attention(exercises.reference_causal_attention)
    assert exercises.check_contrastive_loss(clip.contrastive_loss)
    assert exercises.check_zero_shot(exercises.reference_zero_shot)
    assert capsys.readouterr().out.count("✅") == 4


def test_bpe_checker_names_the_mistake():
    result = exercises.check_bpe_merge(exercises.clip._merge_first_only)
    assert not result and "every non-overlapping occurrence" in result.message
    result = exercises.check_bpe_merge(exercises.clip._merge_worst_rank)
    assert not result and "largest" in result.message
    result = exercises.check_bpe_merge(lambda parts, bpe_ranks: parts)  # never finishes, never merges
    assert not result and "expected" in result.message
    result = exercises.check_bpe_merge(lambda parts, bpe_ranks: 1 / 0)
    assert not result and "ZeroDivisionError" in result.message


def test_clip_checkers_reject_wrong_answers():
    F = torch.nn.functional
    result = exercises.check_causal_attention(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    assert not result and "no mask" in result.message
    result = exercises.check_causal_attention(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0))
    assert not result and "√d" in result.message

    def one_way(logits_per_text):
        return F.cross_entropy(logits_per_text, torch.arange(len(logits_per_text)))

    result = exercises.check_contrastive_loss(one_way)
    assert not result and "transposed" in result.message

    def unnormalised(image_features, text_features):
        return (image_features @ text_features.mean(dim=1).T).argmax(dim=1)

    def averaged_first(image_features, text_features):
        return (image_features @ F.normalize(text_features.mean(dim=1), dim=-1).T).argmax(dim=1)

    result = exercises.check_zero_shot(unnormalised)
    assert not result and "without normalising" in result.message
    result = exercises.check_zero_shot(averaged_first)
    assert not result and "longest dominates" in result.message
    result = exercises.check_zero_shot(lambda image_features, text_features: averaged_first(
        image_features, text_features).float())
    assert not result and "dtype" in result.message


# --- chapter 04: the U-Net ---


def test_unet_checkers_pass_the_package_and_name_the_mistakes(capsys):
    import torch.nn.functional as F

    from ldm_teach import unet

    assert exercises.check_timestep_embedding(unet.timestep_embedding)
    assert exercises.check_cross_attention(lambda x, context, attention: attention(x, context))
    assert exercises.check_resblock_forward(lambda block, x, time_emb: block(x, time_emb))
    assert capsys.readouterr().out.count("✅") == 3

    result = exercises.check_timestep_embedding(lambda t, dim: unet.timestep_embedding(t, dim, flip_sin_to_cos=False))
    assert not result and "wrong order" in result.message

    def unscaled(x, context, attention):
        B, N, _ = x.shape
        h, d = attention.heads, attention.head_dim
        q = attention.to_q(x).view(B, N, h, d).transpose(1, 2)
        k = attention.to_k(context).view(B, -1, h, d).transpose(1, 2)
        v = attention.to_v(context).view(B, -1, h, d).transpose(1, 2)
        out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return attention.to_out(out.transpose(1, 2).reshape(B, N, h * d))

    result = exercises.check_cross_attention(unscaled)
    assert not result and "no 1/√d scaling" in result.message

    def no_skip(block, x, time_emb):
        h = block.conv1(F.silu(block.norm1(x))) + block.time_emb_proj(F.silu(time_emb))[:, :, None, None]
        return block.conv2(F.silu(block.norm2(h)))

    result = exercises.check_resblock_forward(no_skip)
    assert not result and "skip connection" in result.message

    result = exercises.check_resblock_forward(lambda block, x, time_emb: x)
    assert not result and "expected shape" in result.message


def test_an_unwritten_function_is_recognised():
    result = exercises.check_q_sample(lambda x0, t, noise, alphas_cumprod: x0)
    assert not result and "returned the input `x0` unchanged" in result.message


def test_training_checkers_pass_the_package_and_name_the_mistakes(capsys):
    from ldm_teach import train

    def package_step(unet, latents, context, alphas_cumprod, generator):
        return diffusion.diffusion_loss(unet, latents, alphas_cumprod, context, generator=generator)

    assert exercises.check_training_step(package_step)
    assert exercises.check_caption_dropout(train.caption_dropout)
    assert exercises.check_ema_update(train.ema_update)
    assert capsys.readouterr().out.count("✅") == 3

    def clean_target(unet, latents, context, alphas_cumprod, generator):
        t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=generator)
        x_t = diffusion.q_sample(latents, t, torch.randn(latents.shape, generator=generator), alphas_cumprod)
        return torch.nn.functional.mse_loss(unet(x_t, t, context), latents)

    result = exercises.check_training_step(clean_target)
    assert not result and "compared with the clean latents" in result.message
    result = exercises.check_training_step(lambda unet, latents, context, alphas_cumprod, generator: torch.zeros(()))
    assert not result and "the U-Net ran 0 times" in result.message

    def zeros_for_dropped(context, empty_context, probability, generator):
        drop = torch.rand(len(context), generator=generator) < probability
        return torch.where(drop[:, None, None], torch.zeros_like(context), context)

    result = exercises.check_caption_dropout(zeros_for_dropped)
    assert not result and "zeros instead of the empty prompt" in result.message

    def swapped(ema_model, model, decay):
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
                ema_parameter.copy_(decay * parameter + (1 - decay) * ema_parameter)

    result = exercises.check_ema_update(swapped)
    assert not result and "decay and 1 - decay swapped" in result.message
    result = exercises.check_ema_update(lambda ema_model, model, decay: [p * decay for p in ema_model.parameters()])
    assert not result and "in place" in result.message

    def moves_the_model(ema_model, model, decay):
        with torch.no_grad():
            for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
                parameter.lerp_(ema_parameter, 1 - decay)

    result = exercises.check_ema_update(moves_the_model)
    assert not result and "the model's own weights changed" in result.message


def test_inference_checkers_pass_the_package_and_name_the_mistakes(capsys):
    from functools import partial

    from ldm_teach.pipeline import classifier_free_guidance

    assert exercises.check_guidance(classifier_free_guidance)
    assert exercises.check_denoising_loop(exercises.reference_denoising_loop)
    assert exercises.check_decode_latents(exercises.reference_decode)
    assert capsys.readouterr().out.count("✅") == 3

    result = exercises.check_guidance(lambda noise_uncond, noise_text, guidance_scale:
                                      noise_text + guidance_scale * (noise_text - noise_uncond))
    assert not result and "the step taken from ε_text" in result.message
    result = exercises.check_guidance(lambda noise_uncond, noise_text, guidance_scale: noise_uncond)
    assert not result and "returned the input `noise_uncond` unchanged" in result.message

    for flag, hint in [("init_sigma", "init_noise_sigma"), ("scale_input", "scale_model_input"),
                       ("halves_swapped", "halves of the U-Net's output swapped")]:
        wrong = partial(exercises.reference_denoising_loop, **{flag: flag == "halves_swapped"})
        result = exercises.check_denoising_loop(wrong)
        assert not result and hint in result.message, flag

    def no_set_timesteps(unet, scheduler, latents, context, uncond_context, guidance_scale, num_inference_steps):
        for t in scheduler.timesteps:  # None: the learner forgot scheduler.set_timesteps
            pass
        return latents

    result = exercises.check_denoising_loop(no_set_timesteps)
    assert not result and "raised TypeError" in result.message

    result = exercises.check_decode_latents(lambda vae, latents: (vae.decode(latents * vae.scaling_factor) / 2 + 0.5).clamp(0, 1))
    assert not result and "multiplied by vae.scaling_factor instead of divided" in result.message
    result = exercises.check_decode_latents(lambda vae, latents: vae.decode(latents / vae.scaling_factor) / 2 + 0.5)
    assert not result and "not clipped to [0, 1]" in result.message


# --- right answers written differently, at several seeds (the grader's seed is not 0) ---


def q_sample_float64(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod.double()[t].reshape(-1, *[1] * (x0.ndim - 1))
    return a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()  # returned in float64


def q_sample_loop(x0, t, noise, alphas_cumprod):
    rows = [alphas_cumprod[step].sqrt() * x0[i] + (1 - alphas_cumprod[step]).sqrt() * noise[i] for i, step in enumerate(t)]
    return torch.stack(rows)


def q_sample_addcmul(x0, t, noise, alphas_cumprod):
    a = alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1))
    return torch.addcmul(a.sqrt() * x0, (1 - a).sqrt(), noise)


def posterior_mean_python_floats(x0, x_t, t, alphas_cumprod):  # the review's rejected accurate answer
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[t - 1]) if t > 0 else 1.0
    beta = 1 - a_t / a_prev
    return (math.sqrt(a_prev) * beta * x0 + math.sqrt(1 - beta) * (1 - a_prev) * x_t) / (1 - a_t)


def posterior_mean_float64(x0, x_t, t, alphas_cumprod):
    return diffusion.q_posterior_mean(x0.double(), x_t.double(), t, alphas_cumprod.double())


def ddim_float64(eps, x_t, alpha_prod_t, alpha_prod_prev):
    return exercises.reference_ddim_step(eps.double(), x_t.double(), alpha_prod_t.double(), alpha_prod_prev.double())


def causal_loop(q, k, v):
    L, d = q.shape[-2:]
    outputs = []
    for i in range(L):
        weights = (q[..., i:i + 1, :] @ k[..., :i + 1, :].transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        outputs.append(weights @ v[..., :i + 1, :])
    return torch.cat(outputs, dim=-2)


def causal_where(q, k, v):
    L = q.shape[-2]
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    allowed = torch.ones(L, L, dtype=torch.bool).tril()
    return torch.where(allowed, scores, torch.tensor(float("-inf"))).softmax(-1) @ v


def clip_loss_by_hand(logits_per_text):
    n = len(logits_per_text)
    rows = -logits_per_text.log_softmax(dim=1).diagonal().sum() / n
    columns = -logits_per_text.log_softmax(dim=0).diagonal().sum() / n
    return 0.5 * (rows + columns)


def zero_shot_float64(image_features, text_features):
    return exercises.reference_zero_shot(image_features.double(), text_features.double())


def cross_attention_einsum(x, context, attention):
    B, N, _ = x.shape
    h, d = attention.heads, attention.head_dim
    q = attention.to_q(x).reshape(B, N, h, d)
    k = attention.to_k(context).reshape(B, -1, h, d)
    v = attention.to_v(context).reshape(B, -1, h, d)
    weights = torch.einsum("bnhd,blhd->bhnl", q, k).mul(d**-0.5).softmax(-1)
    return attention.to_out(torch.einsum("bhnl,blhd->bnhd", weights, v).reshape(B, N, h * d))


def resblock_by_layers(block, x, time_emb):
    h = F.silu(block.norm1(x))
    h = block.conv1(h) + block.time_emb_proj(F.silu(time_emb)).unsqueeze(-1).unsqueeze(-1)
    h = block.conv2(F.silu(block.norm2(h)))
    return (block.conv_shortcut(x) if block.conv_shortcut is not None else x) + h


def training_step_by_hand(unet, latents, context, alphas_cumprod, generator):
    t = torch.randint(0, len(alphas_cumprod), (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    a = alphas_cumprod[t][:, None, None, None]
    prediction = unet(torch.addcmul(a.sqrt() * latents, (1 - a).sqrt(), noise), t, context)
    return ((prediction - noise) ** 2).mean()


def caption_dropout_loop(context, empty_context, probability, generator):
    draws = torch.rand(len(context), generator=generator)
    return torch.stack([empty_context if draw < probability else row for draw, row in zip(draws, context)])


@torch.no_grad()
def ema_lerp(ema_model, model, decay):
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter, 1 - decay)


def denoise_enumerate(unet, scheduler, latents, context, uncond_context, guidance_scale, num_inference_steps):
    scheduler.set_timesteps(num_inference_steps)
    x = scheduler.init_noise_sigma * latents
    for _, t in enumerate(scheduler.timesteps):
        with torch.no_grad():
            noise = unet(scheduler.scale_model_input(x.repeat(2, 1, 1, 1), t), t, torch.cat([uncond_context, context]))
        noise_uncond, noise_text = noise.chunk(2)
        x = scheduler.step(torch.lerp(noise_uncond, noise_text, guidance_scale), t, x)
    return x


def trainable_parameters(model):
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


VARIANTS = [
    ("check_latent_shape", lambda b, h, w: [b, 4, h // 8, w // 8]),  # a list is fine where a tuple is asked
    ("check_attention_bytes", lambda h, w, heads, size: int(heads * ((h / 8) * (w / 8)) ** 2 * size)),
    ("check_trainable_parameters", trainable_parameters),
    ("check_q_sample", q_sample_float64), ("check_q_sample", q_sample_loop), ("check_q_sample", q_sample_addcmul),
    ("check_posterior_mean", posterior_mean_python_floats), ("check_posterior_mean", posterior_mean_float64),
    ("check_ddim_step", ddim_float64),
    ("check_reparameterise", lambda mean, logvar, eps: torch.addcmul(mean, (0.5 * logvar).exp(), eps)),
    ("check_reparameterise", lambda mean, logvar, eps: mean + logvar.exp().sqrt() * eps),
    ("check_kl_divergence", lambda mean, logvar: 0.5 * (mean.double() ** 2 + logvar.double().exp() - 1
                                                        - logvar.double()).flatten(1).sum(1)),
    ("check_scaling_factor", lambda latents: float(1 / latents.double().std())),
    ("check_causal_attention", causal_loop), ("check_causal_attention", causal_where),
    ("check_contrastive_loss", clip_loss_by_hand), ("check_zero_shot", zero_shot_float64),
    ("check_timestep_embedding", lambda t, dim: exercises.reference_timestep_embedding(t, dim).float()),
    ("check_cross_attention", cross_attention_einsum), ("check_resblock_forward", resblock_by_layers),
    ("check_training_step", training_step_by_hand), ("check_caption_dropout", caption_dropout_loop),
    ("check_ema_update", ema_lerp),
    ("check_guidance", lambda noise_uncond, noise_text, scale: torch.lerp(noise_uncond, noise_text, scale)),
    ("check_denoising_loop", denoise_enumerate),
    ("check_decode_latents", lambda vae, z: (vae.decode(z / vae.scaling_factor) / 2 + 0.5).clamp(0, 1).detach()),
]


@pytest.mark.parametrize("seed", [1, 20261202])
@pytest.mark.parametrize("checker, answer", VARIANTS, ids=[f"{c}-{i}" for i, (c, _) in enumerate(VARIANTS)])
def test_right_answers_written_differently_pass_at_other_seeds(checker, answer, seed, capsys):
    result = getattr(exercises, checker)(answer, seed=seed)
    assert result, result.message
    assert result.seed == seed


def test_every_registered_checker_exists_and_names_its_function():
    for exercise in registry.EXERCISES:
        if exercise.auto_graded:
            check = registry.checker(exercise)
            assert exercise.chapter[:2] in check.__doc__ and f"``{exercise.function}(" in check.__doc__, exercise.label
    for chapter in ["00", "01", "02", "03", "04", "05", "06", "07"]:
        assert len(registry.for_chapter(chapter, auto_graded=True)) >= 3, chapter
    assert len(registry.BY_LABEL) == len(registry.EXERCISES)


# --- wrong answers of each kind ---


def test_answers_that_block_gradients_fail():
    result = exercises.check_reparameterise(lambda mean, logvar, eps: mean + (0.5 * logvar).exp().detach() * eps)
    assert not result and "no gradient reaches `logvar`" in result.message

    def rewrapped(unet, latents, context, alphas_cumprod, generator):
        loss = training_step_by_hand(unet, latents, context, alphas_cumprod, generator)
        return loss.detach().requires_grad_()

    result = exercises.check_training_step(rewrapped)
    assert not result and "no gradient reaches `unet` (parameter" in result.message

    def frozen_attention(x, context, attention):
        with torch.no_grad():
            return cross_attention_einsum(x, context, attention)

    result = exercises.check_cross_attention(frozen_attention)
    assert not result and "no gradient reaches `x`" in result.message
    result = exercises.check_q_sample(lambda x0, t, noise, alphas_cumprod: torch.tensor(
        q_sample_addcmul(x0, t, noise, alphas_cumprod).tolist()))
    assert not result and "no gradient reaches `x0`" in result.message


def test_answers_that_change_their_inputs_fail():
    def q_sample_in_place(x0, t, noise, alphas_cumprod):
        a = alphas_cumprod[t].view(-1, *[1] * (x0.ndim - 1))
        return x0.detach().mul_(a.sqrt()).add_((1 - a).sqrt() * noise)

    result = exercises.check_q_sample(q_sample_in_place)
    assert not result and "changed its input `x0` in place" in result.message

    def dropout_in_place(context, empty_context, probability, generator):
        drop = torch.rand(len(context), generator=generator) < probability
        context[drop] = empty_context
        return context

    result = exercises.check_caption_dropout(dropout_in_place)
    assert not result and "changed its input `context` in place" in result.message

    def denoise_in_place(unet, scheduler, latents, context, uncond_context, guidance_scale, num_inference_steps):
        scheduler.set_timesteps(num_inference_steps)
        latents *= scheduler.init_noise_sigma
        return denoise_enumerate(unet, scheduler, latents / scheduler.init_noise_sigma, context, uncond_context,
                                 guidance_scale, num_inference_steps)

    result = exercises.check_denoising_loop(denoise_in_place)
    assert not result and "changed its input `latents` in place" in result.message


def test_too_many_model_calls_fail():
    def two_calls(unet, scheduler, latents, context, uncond_context, guidance_scale, num_inference_steps):
        scheduler.set_timesteps(num_inference_steps)
        x = latents * scheduler.init_noise_sigma
        with torch.no_grad():
            for t in scheduler.timesteps:
                model_input = scheduler.scale_model_input(x, t)
                noise_uncond, noise_text = unet(model_input, t, uncond_context), unet(model_input, t, context)
                x = scheduler.step(noise_uncond + guidance_scale * (noise_text - noise_uncond), t, x)
        return x

    result = exercises.check_denoising_loop(two_calls)
    assert not result and "the U-Net ran 8 times for 4 steps" in result.message

    def twice(unet, latents, context, alphas_cumprod, generator):
        unet(latents, torch.zeros(len(latents), dtype=torch.long), context)  # a stray extra call
        return training_step_by_hand(unet, latents, context, alphas_cumprod, generator)

    result = exercises.check_training_step(twice)
    assert not result and "the U-Net ran 2 times" in result.message


def test_the_common_mistakes_the_review_found_unnamed_are_named():
    def t_from_one(unet, latents, context, alphas_cumprod, generator):
        t = torch.randint(1, len(alphas_cumprod) + 1, (len(latents),), generator=generator).clamp(max=999)
        noise = torch.randn(latents.shape, generator=generator)
        return F.mse_loss(unet(diffusion.q_sample(latents, t, noise, alphas_cumprod), t, context), noise)

    result = exercises.check_training_step(t_from_one)
    assert not result and "t drawn from 1 to T" in result.message

    def divided_by_d(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / q.shape[-1])

    result = exercises.check_causal_attention(divided_by_d)
    assert not result and "divided by d instead of √d" in result.message

    def no_transpose(x, context, attention):
        B, N, _ = x.shape
        h, d = attention.heads, attention.head_dim
        q = attention.to_q(x).view(B, N, h, d).transpose(1, 2)
        k = attention.to_k(context).view(B, -1, h, d).transpose(1, 2)
        v = attention.to_v(context).view(B, -1, h, d).transpose(1, 2)
        out = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1) @ v
        return attention.to_out(out.reshape(B, N, h * d))

    result = exercises.check_cross_attention(no_transpose)
    assert not result and "merged without the transpose" in result.message

    result = exercises.check_ddim_step(lambda eps, x_t, a_t, a_prev: exercises.reference_ddim_step(eps, x_t, a_prev, a_t))
    assert not result and "alpha_prod_t and alpha_prod_prev swapped" in result.message


def test_messages_print_scalars_give_one_hint_and_say_what_is_off():
    result = exercises.check_guidance(lambda u, c, s: c if s <= 1 else u + s * (c - u))
    assert not result and "shortcut for s ≤ 1" in result.message and "guidance_scale: 0.0" in result.message
    result = exercises.check_guidance(lambda u, c, s: c + s * (u - c))
    assert not result and "guidance_scale: 7.5" in result.message and "swapped" in result.message
    result = exercises.check_ema_update(lambda ema_model, model, decay: None)
    assert not result and "decay: 0.999" in result.message

    def tuple_merge(parts, bpe_ranks):
        from ldm_teach import clip

        merged = clip.merge_best_pair(parts, bpe_ranks)
        return None if merged is None else tuple(merged)

    result = exercises.check_bpe_merge(tuple_merge)
    assert not result and "as a tuple" in result.message

    result = exercises.check_zero_shot(lambda image_features, text_features: exercises.reference_zero_shot(
        image_features, text_features).flip(0))
    assert not result and "predictions differ" in result.message and " of 200 " in result.message

    result = exercises.check_q_sample(lambda x0, t, noise, alphas_cumprod: alphas_cumprod[t].sqrt() * x0)
    assert not result and "broadcasts" not in result.message or "reshape it to (B, 1, ...)" in result.message
    result = exercises.check_ddim_step(lambda eps, x_t, a_t, a_prev: x_t.sum(dim=0))
    assert not result and "broadcasts" not in result.message

    wrong_answers = [
        (exercises.check_q_sample, exercises.diffusion._without_square_roots),
        (exercises.check_guidance, lambda u, c, s: c),
        (exercises.check_kl_divergence, lambda mean, logvar: torch.zeros(len(mean))),
        (exercises.check_scaling_factor, lambda latents: latents.std()),
        (exercises.check_latent_shape, lambda b, h, w: (b, 4, w // 8, h // 8)),
    ]
    for check, answer in wrong_answers:
        result = check(answer)
        assert not result and result.message.count("Hint:") <= 1, result.message


def test_renamed_parameters_work_and_chapter_00_mistakes_are_named():
    assert exercises.check_q_sample(lambda clean, steps, eps, table: q_sample_addcmul(clean, steps, eps, table))
    result = exercises.check_latent_shape(lambda b, h, w: (b, 4, w // 8, h // 8))
    assert not result and "height and width swapped" in result.message
    result = exercises.check_attention_bytes(lambda h, w, heads, size: heads * (h // 8) * (w // 8) * size)
    assert not result and "N not squared" in result.message
    result = exercises.check_trainable_parameters(lambda model: sum(p.numel() for p in model.parameters()))
    assert not result and "frozen parameters counted" in result.message
    result = exercises.check_trainable_parameters(lambda model: sum(
        p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad))
    assert not result and "tied weight counted twice" in result.message


def test_the_generator_is_described_as_the_learner_receives_it():
    result = exercises.check_caption_dropout(lambda context, empty_context, probability, generator: context * 2)
    assert not result and "generator: torch.Generator().manual_seed(" in result.message and "seed: int" not in result.message
