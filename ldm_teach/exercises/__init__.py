"""Checkers for the chapters' exercises, one module per chapter, and the table of every exercise.

``from ldm_teach import exercises; exercises.check_q_sample(q_sample)`` runs a checker: it calls the
learner's function and the package's own on the same random inputs (a ``seed`` picks them) and
prints and returns a ``CheckResult``, truthy when the function passes. ``exercises.registry`` maps
each exercise's label to its chapter, function, checker and points; ``ldm_teach.grade`` uses it.
"""
from . import registry
from .base import CheckResult, compare, compare_values
from .bigger import check_euler_ancestral_step, check_karras_sigmas, check_velocity
from .clip import (check_bpe_merge, check_causal_attention, check_contrastive_loss, check_zero_shot,
                   reference_causal_attention, reference_zero_shot)
from .editing import (check_blend_step, check_controlled_skips, check_inpainting_input, check_start_step,
                      reference_blend_step, reference_controlled_skips)
from .finetune import check_prior_loss, check_ti_update
from .diffusion import check_ddim_step, check_posterior_mean, check_q_sample, reference_ddim_step
from .inference import (check_decode_latents, check_denoising_loop, check_guidance, reference_decode,
                        reference_denoising_loop, reference_guidance)
from .lora import check_lora_forward, check_merge_lora_weight, reference_lora_forward, reference_merge_lora_weight
from .overview import (check_attention_bytes, check_latent_shape, check_trainable_parameters,
                       reference_attention_bytes, reference_latent_shape, reference_trainable_parameters)
from .training import check_caption_dropout, check_ema_update, check_training_step
from .unet import check_cross_attention, check_resblock_forward, check_timestep_embedding, reference_timestep_embedding
from .vae import check_kl_divergence, check_reparameterise, check_scaling_factor, reference_scaling_factor

__all__ = [
    "CheckResult", "compare", "compare_values", "registry",
    "check_latent_shape", "check_attention_bytes", "check_trainable_parameters",
    "check_q_sample", "check_posterior_mean", "check_ddim_step",
    "check_reparameterise", "check_kl_divergence", "check_scaling_factor",
    "check_bpe_merge", "check_causal_attention", "check_contrastive_loss", "check_zero_shot",
    "check_timestep_embedding", "check_cross_attention", "check_resblock_forward",
    "check_training_step", "check_caption_dropout", "check_ema_update",
    "check_guidance", "check_denoising_loop", "check_decode_latents",
    "check_start_step", "check_blend_step", "check_inpainting_input", "check_controlled_skips",
    "check_velocity", "check_karras_sigmas", "check_euler_ancestral_step",
    "check_lora_forward", "check_merge_lora_weight",
    "check_ti_update", "check_prior_loss",
    "reference_latent_shape", "reference_attention_bytes", "reference_trainable_parameters",
    "reference_ddim_step", "reference_scaling_factor", "reference_causal_attention", "reference_zero_shot",
    "reference_timestep_embedding", "reference_guidance", "reference_denoising_loop", "reference_decode",
    "reference_blend_step", "reference_controlled_skips", "reference_lora_forward", "reference_merge_lora_weight",
]
