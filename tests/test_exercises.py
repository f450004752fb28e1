import torch

from ldm_teach import diffusion, exercises


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
    assert not result and "every occurrence" in result.message
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
