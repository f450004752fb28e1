"""Every exercise of the book as data: its label, chapter, kind, the function it asks for, its checker,
its points and the time it takes. The grader (``ldm_teach.grade``), the tests and the instructors'
page read this one table, so a label means the same exercise everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Exercise:
    label: str  # the sphinx-exercise label in the chapter, e.g. "ex-q-sample"
    chapter: str  # the notebook's stem, e.g. "01_diffusion"
    title: str
    kind: str  # "code" (auto-checked), "computation" (run and read off) or "open" (discussion, experiment)
    minutes: int  # expected time for a student who has read the chapter
    function: str | None = None  # the name the student defines (code exercises)
    checker: str | None = None  # the name of its checker in ldm_teach.exercises
    points: int = 0  # points when auto-graded; other kinds are graded by hand
    needs_training: bool = False  # whether doing it means retraining a model (minutes of CPU)
    sources: tuple[str, ...] = ()  # package objects whose source answers it: shown only inside its solution

    @property
    def auto_graded(self) -> bool:
        return self.checker is not None


def _code(label, chapter, title, minutes, function, checker, points=1, sources=()):
    return Exercise(label, chapter, title, "code", minutes, function, checker, points, sources=sources)


EXERCISES: tuple[Exercise, ...] = (
    Exercise("ex-latent-size", "00_overview", "Latents for other sizes", "computation", 5),
    Exercise("ex-where-parameters", "00_overview", "Where the parameters are", "computation", 10),
    _code("ex-latent-shape", "00_overview", "The latent's shape", 5, "latent_shape", "check_latent_shape"),
    _code("ex-attention-bytes", "00_overview", "The attention weights' memory", 10, "attention_bytes",
          "check_attention_bytes"),
    _code("ex-trainable-parameters", "00_overview", "Parameters that train", 10, "trainable_parameters",
          "check_trainable_parameters"),
    _code("ex-q-sample", "01_diffusion", "The closed-form forward process", 10, "q_sample", "check_q_sample",
          sources=("diffusion.q_sample",)),
    _code("ex-posterior-mean", "01_diffusion", "The posterior mean", 20, "posterior_mean", "check_posterior_mean",
          sources=("diffusion.q_posterior_mean",)),
    _code("ex-ddim-step", "01_diffusion", "One DDIM step", 20, "ddim_step", "check_ddim_step",
          sources=("schedulers.DDIMScheduler.step",)),
    Exercise("ex-terminal-snr", "01_diffusion", "Why not zero?", "open", 15),
    _code("ex-reparameterise", "02_vae", "The reparameterisation trick", 10, "reparameterise", "check_reparameterise",
          sources=("vae.DiagonalGaussian",)),
    _code("ex-kl-divergence", "02_vae", "The KL of a diagonal Gaussian", 15, "kl_divergence", "check_kl_divergence",
          sources=("vae.DiagonalGaussian",)),
    _code("ex-scaling-factor", "02_vae", "The scaling factor from a batch of latents", 10, "scaling_factor",
          "check_scaling_factor"),
    Exercise("ex-kl-weight", "02_vae", "How much KL?", "open", 25, needs_training=True),
    _code("ex-bpe-merge", "03_clip", "One BPE merge step", 20, "merge_step", "check_bpe_merge",
          sources=("clip.merge_best_pair",)),
    _code("ex-causal-attention", "03_clip", "Causal attention by hand", 15, "causal_attention", "check_causal_attention"),
    _code("ex-contrastive-loss", "03_clip", "The contrastive loss", 10, "clip_loss", "check_contrastive_loss",
          sources=("clip.contrastive_loss",)),
    _code("ex-zero-shot", "03_clip", "Zero-shot classification from embeddings", 15, "zero_shot_classify",
          "check_zero_shot", sources=("clip.zero_shot_weights",)),
    Exercise("ex-temperature", "03_clip", "The modality gap and the temperature", "open", 25, needs_training=True),
    _code("ex-timestep-embedding", "04_unet", "The timestep embedding", 15, "timestep_embedding",
          "check_timestep_embedding", sources=("unet.timestep_embedding",)),
    _code("ex-cross-attention", "04_unet", "Cross-attention", 25, "cross_attention", "check_cross_attention", 2),
    _code("ex-resblock", "04_unet", "A ResBlock forward", 15, "resblock_forward", "check_resblock_forward",
          sources=("unet.ResBlock",)),
    Exercise("ex-attention-cost", "04_unet", "Attention at a larger image", "computation", 20),
    _code("ex-training-step", "05_training", "One training step", 20, "training_step", "check_training_step", 2,
          sources=("diffusion.diffusion_loss", "train.LatentDiffusionTrainer.training_step")),
    _code("ex-caption-dropout", "05_training", "Caption dropout", 10, "caption_dropout", "check_caption_dropout",
          sources=("train.caption_dropout",)),
    _code("ex-ema-update", "05_training", "The EMA update", 10, "ema_update", "check_ema_update",
          sources=("train.ema_update",)),
    Exercise("ex-no-dropout", "05_training", "Guidance without caption dropout", "open", 30, needs_training=True),
    Exercise("ex-v-prediction", "05_training", "Predicting v", "open", 35, needs_training=True),
    _code("ex-guidance", "06_inference", "Classifier-free guidance", 5, "guidance", "check_guidance",
          sources=("pipeline.classifier_free_guidance",)),
    _code("ex-denoising-loop", "06_inference", "The whole denoising loop", 30, "denoise", "check_denoising_loop", 2,
          sources=("pipeline.StableDiffusion.__call__",)),
    _code("ex-decode", "06_inference", "Decoding latents", 10, "decode", "check_decode_latents",
          sources=("pipeline.StableDiffusion.__call__",)),
    Exercise("ex-spacing", "06_inference", "Leading and trailing timesteps", "open", 25),
    _code("ex-start-step", "07_editing", "The start step for a strength", 10, "start_step", "check_start_step"),
    _code("ex-blend-step", "07_editing", "One step of inpainting by blending", 15, "blend_step", "check_blend_step"),
    _code("ex-inpainting-input", "07_editing", "The 9-channel input", 5, "inpainting_input",
          "check_inpainting_input"),
    _code("ex-controlled-skips", "07_editing", "The skips a ControlNet steers", 10, "controlled_skips",
          "check_controlled_skips"),
    Exercise("ex-img2img-mean", "07_editing", "Image to image with the posterior's mean", "open", 15),
    Exercise("ex-edges", "07_editing", "Edges instead of silhouettes", "open", 30, needs_training=True),
    _code("ex-velocity", "08_bigger", "The v-prediction target", 10, "velocity", "check_velocity",
          sources=("diffusion.velocity",)),
    _code("ex-karras-sigmas", "08_bigger", "Karras noise levels", 15, "karras_sigmas", "check_karras_sigmas",
          sources=("sigmas.karras_sigmas",)),
    _code("ex-euler-ancestral", "08_bigger", "One Euler ancestral step", 20, "euler_ancestral_step",
          "check_euler_ancestral_step", 2, sources=("samplers.EulerAncestralDiscreteScheduler.step",)),
    Exercise("ex-refiner-split", "08_bigger", "Where the refiner takes over", "computation", 15),
    Exercise("ex-prompt-2", "08_bigger", "A prompt for the second encoder", "open", 20),
    _code("ex-lora-forward", "09_finetuning", "The LoRA layer's forward pass", 10, "lora_forward",
          "check_lora_forward", sources=("lora.LoRALinear.forward",)),
    _code("ex-lora-merge", "09_finetuning", "Merging a LoRA into its weight", 10, "merge_lora_weight",
          "check_merge_lora_weight", sources=("lora.LoRALinear.delta_weight",)),
    _code("ex-ti-update", "09_finetuning", "Textual inversion's update", 10, "textual_inversion_update",
          "check_ti_update", sources=("finetune.textual_inversion_update",)),
    _code("ex-prior-loss", "09_finetuning", "The prior-preservation loss", 10, "prior_preservation_loss",
          "check_prior_loss", sources=("finetune.prior_preservation_loss",)),
    Exercise("ex-lora-rank", "09_finetuning", "How low can the rank go?", "open", 25, needs_training=True),
    Exercise("ex-prior-weight", "09_finetuning", "Weighing the prior", "open", 25, needs_training=True),
)

BY_LABEL = {exercise.label: exercise for exercise in EXERCISES}


def for_chapter(chapter: str, auto_graded: bool | None = None) -> list[Exercise]:
    """The exercises of one chapter (its notebook's stem, or just its number "01"), in the chapter's order."""
    return [exercise for exercise in EXERCISES
            if chapter in (exercise.chapter, exercise.chapter[:2])
            and (auto_graded is None or exercise.auto_graded == auto_graded)]


def checker(exercise: Exercise):
    """The checker function of an auto-graded exercise."""
    from .. import exercises

    return getattr(exercises, exercise.checker)
