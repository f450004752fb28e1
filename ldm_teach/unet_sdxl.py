"""SDXL's added conditioning: the pooled prompt and the image's size numbers join the timestep (Chapter 08).

SD 1.x and 2.x tell the U-Net *which step* it denoises through the time embedding alone, and *what*
to draw through cross-attention. SDXL (``addition_embed_type="text_time"`` in a ``UNetConfig``) adds
a second vector to the time embedding, made from two things that cross-attention does not carry:

- the pooled prompt embedding ``text_embeds`` (B, 1280): one vector for the whole prompt, the
  projected end-token feature of the second text encoder (OpenCLIP ViT-bigG);
- the micro-conditioning numbers ``time_ids`` (B, K): for SDXL base the original image size
  (height, width), the top-left corner of the training crop (top, left) and the target size
  (height, width), K = 6; for the refiner the original size, the crop and an aesthetic score, K = 5.
  Trained with the real values of each picture, the model learns what a small upscaled source or
  an off-centre crop looks like; at sampling time one asks for a large, uncropped image.

Each number gets the timestep's sinusoidal features (``addition_time_embed_dim`` = 256 of them),
the K x 256 features are put next to the pooled prompt (1280 + 6 x 256 = 2816 =
``projection_class_embeddings_input_dim``), and a Linear-SiLU-Linear MLP maps them to the time
embedding's width. Every ResBlock then sees prompt and sizes through its time projection.

The inputs arrive as diffusers passes them, ``unet(x, t, context, added_cond_kwargs={"text_embeds":
..., "time_ids": ...})``; ``micro_conditioning`` builds ``time_ids`` from the sizes. ``sdxl_base``
and ``sdxl_refiner`` are the full-size configs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_tensor
from .unet import UNetConfig, timestep_embedding


def sdxl_base() -> UNetConfig:
    """SDXL base (stabilityai/stable-diffusion-xl-base-1.0): three levels, no attention at the highest
    resolution, 2 and 10 transformer blocks below it, heads of 64 channels, a context 2048 wide (both
    text encoders' features side by side), the pooled prompt and six size numbers added to the time."""
    return UNetConfig(sample_size=128, block_out_channels=(320, 640, 1280),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                      cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=256, projection_class_embeddings_input_dim=1280 + 6 * 256)


def sdxl_refiner() -> UNetConfig:
    """SDXL refiner (stabilityai/stable-diffusion-xl-refiner-1.0): four levels 384 to 1536 wide, attention
    at the middle two levels and in the middle block, 4 transformer blocks each, a context 1280 wide
    (OpenCLIP bigG's alone), the pooled prompt and five numbers (original size, crop, aesthetic score)."""
    return UNetConfig(sample_size=128, block_out_channels=(384, 768, 1536, 1536),
                      down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                      attention_head_dim=(6, 12, 24, 24), transformer_layers_per_block=4, cross_attention_dim=1280,
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=1280 + 5 * 256)


class TextTimeEmbedding(nn.Module):
    """(pooled prompt (B, P), size numbers (B, K)) -> a vector (B, time_dim) added to the time embedding.

    ``linear_1`` and ``linear_2`` are diffusers' names (``add_embedding.linear_1``, ...), so SDXL
    checkpoints load unchanged.
    """

    def __init__(self, config: UNetConfig, time_dim: int):
        super().__init__()
        self.config = config
        self.linear_1 = nn.Linear(config.projection_class_embeddings_input_dim, time_dim)
        self.linear_2 = nn.Linear(time_dim, time_dim)

    def forward(self, added_cond_kwargs: dict | None, batch: int, dtype: torch.dtype) -> torch.Tensor:
        text_embeds, time_ids = self.check_inputs(added_cond_kwargs, batch)
        config = self.config
        features = timestep_embedding(time_ids.flatten(), config.addition_time_embed_dim, config.flip_sin_to_cos,
                                      config.freq_shift)  # (B * K, 256)
        features = features.reshape(batch, -1)  # (B, K * 256)
        added = torch.cat([text_embeds.to(dtype), features.to(dtype)], dim=-1)  # (B, P + K * 256)
        return self.linear_2(F.silu(self.linear_1(added)))  # (B, time_dim)

    def check_inputs(self, added_cond_kwargs: dict | None, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The two tensors of ``added_cond_kwargs``, or an error that says what to pass."""
        width = self.config.projection_class_embeddings_input_dim
        per_number = self.config.addition_time_embed_dim
        expected = (f"added_cond_kwargs={{'text_embeds': (B, P), 'time_ids': (B, K)}} with P + K * {per_number} = "
                    f"{width} (SDXL base: the pooled prompt, P = 1280, and K = 6 size numbers; see "
                    "ldm_teach.unet_sdxl.micro_conditioning)")
        if not isinstance(added_cond_kwargs, dict) or not {"text_embeds", "time_ids"} <= set(added_cond_kwargs):
            got = sorted(added_cond_kwargs) if isinstance(added_cond_kwargs, dict) else added_cond_kwargs
            raise TypeError(f"this U-Net (addition_embed_type='text_time', SDXL) needs {expected}; got {got!r}.")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        check_tensor(text_embeds, "text_embeds", finite=False)
        check_tensor(time_ids, "time_ids", finite=False)
        shapes = (tuple(text_embeds.shape), tuple(time_ids.shape))
        if (text_embeds.ndim != 2 or time_ids.ndim != 2 or len(text_embeds) != batch or len(time_ids) != batch
                or text_embeds.shape[1] + time_ids.shape[1] * per_number != width):
            raise ValueError(f"text_embeds and time_ids have shapes {shapes[0]} and {shapes[1]}, for {batch} "
                             f"latents; pass {expected}, one row per latent.")
        return text_embeds, time_ids


def micro_conditioning(original_size: tuple[int, int], crops_coords_top_left: tuple[int, int],
                       target_size: tuple[int, int], batch: int = 1, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """SDXL base's ``time_ids`` (batch, 6): original (height, width), crop (top, left), target (height, width).

    Sizes are in pixels of the image, not of the latent: (1024, 1024), (0, 0), (1024, 1024) asks
    for what SDXL was trained to make best, a full, uncropped 1024 px picture.
    """
    numbers = [*original_size, *crops_coords_top_left, *target_size]
    if len(numbers) != 6:
        raise ValueError(f"original_size={original_size}, crops_coords_top_left={crops_coords_top_left} and "
                         f"target_size={target_size} must be two numbers each, e.g. (1024, 1024), (0, 0) and "
                         "(1024, 1024).")
    return torch.tensor([numbers] * batch, dtype=dtype, device=device)  # (batch, 6)
