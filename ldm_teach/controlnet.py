"""ControlNet (Zhang, Rao and Agrawala, 2023): steering a frozen U-Net with an image of edges, depth, pose...

Chapter 07, section "ControlNet", builds this file top to bottom:

1. ``ControlNetConfig``: the U-Net's down path and middle (the part that is copied) plus the
   small network that reads the control image;
2. ``zero_convolution``: a 1x1 convolution whose weights and bias start at zero, so that a new
   ControlNet adds nothing and the U-Net's output is unchanged until training moves them;
3. ``ControlNetConditioningEmbedding``: the control image (B, 3, H, W) down to the latents'
   resolution and the U-Net's first width;
4. ``ControlNet``: a trainable copy of the down path and middle block that takes the noisy
   latents plus the embedded control image, and returns one residual per U-Net skip and one
   for the middle block, each through its zero convolution and times ``conditioning_scale``;
5. ``StableDiffusionControlNet``: text to image with the residuals added to the U-Net's skips at
   every step, called like diffusers' ``StableDiffusionControlNetPipeline``.

Module names follow diffusers' ``ControlNetModel`` so that its checkpoints load with the
U-Net's renames (``pretrained.controlnet_from_diffusers``, ``pretrained.load_controlnet``).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from .checks import as_float, check_tensor
from .editing import EditingPipeline, image_tensor
from .pipeline import PipelineOutput, draw_latents
from .unet import (IGNORED_DIFFUSERS_KEYS, SUPPORTED_ONLY_AT, DownBlock, MidBlock, TimestepEmbedding, UNet,
                   UNetConfig, timestep_embedding)

# --- the configuration -------------------------------------------------------------------------


@dataclass
class ControlNetConfig:
    """A ControlNet's settings; the defaults are SD 1.5's ControlNets (lllyasviel/sd-controlnet-*).

    The U-Net fields mean what they mean in ``UNetConfig`` and must equal those of the U-Net the
    ControlNet steers (``check_controlnet_fits``); ``conditioning_embedding_out_channels`` are the
    widths of the control image's embedding network, one stride-2 halving between each pair
    (four widths: 512 px control images to 64 x 64 latents).
    """

    in_channels: int = 4
    conditioning_channels: int = 3
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    layers_per_block: int = 2
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    transformer_layers_per_block: int | tuple[int, ...] = 1
    cross_attention_dim: int = 768
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    controlnet_conditioning_channel_order: str = "rgb"

    def __post_init__(self):
        for field in fields(self):
            if isinstance(getattr(self, field.name), list):  # JSON configs hold lists
                setattr(self, field.name, tuple(getattr(self, field.name)))
        widths = self.conditioning_embedding_out_channels
        if not widths or not all(isinstance(c, numbers.Integral) and c > 0 for c in widths):
            raise ValueError(f"conditioning_embedding_out_channels={widths!r} must be a non-empty tuple of positive "
                             "ints, e.g. (16, 32, 96, 256).")
        if self.controlnet_conditioning_channel_order not in ("rgb", "bgr"):
            raise ValueError(f"controlnet_conditioning_channel_order={self.controlnet_conditioning_channel_order!r} "
                             "must be 'rgb' or 'bgr'.")
        self.unet_config()  # the U-Net fields are checked as a U-Net's

    @property
    def control_downsample_factor(self) -> int:
        """How many control-image pixels make one latent cell along a side: 2 ** (len(widths) - 1), 8 for SD."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    def unet_config(self) -> UNetConfig:
        """The config of a U-Net with this down path (its up path mirrored), which the copied blocks are built from."""
        shared = {f.name: getattr(self, f.name) for f in fields(UNetConfig) if hasattr(self, f.name)}
        up_block_types = tuple(kind.replace("Down", "Up") for kind in reversed(self.down_block_types))
        return UNetConfig(**shared, up_block_types=up_block_types)

    @classmethod
    def from_unet_config(cls, config: UNetConfig, **overrides) -> ControlNetConfig:
        """The config of a ControlNet for a U-Net of ``config``: its down path's fields, and ``overrides``."""
        shared = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**{**shared, **overrides})

    @classmethod
    def sd15(cls) -> ControlNetConfig:
        """SD 1.5's ControlNets (lllyasviel/sd-controlnet-canny and its siblings)."""
        return cls()

    @classmethod
    def from_diffusers_config(cls, config: dict) -> ControlNetConfig:
        """Our config from a diffusers ``ControlNetModel`` config, refusing options we do not implement."""
        ours = {f.name for f in fields(cls)}
        only_at = {**SUPPORTED_ONLY_AT, "global_pool_conditions": False, "addition_embed_type": None,
                   "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None}  # not SDXL's
        unsupported = []
        for key, value in config.items():
            if key in ours or key.startswith("_") or key in IGNORED_DIFFUSERS_KEYS:
                continue
            if key not in only_at:
                unsupported.append(f"{key}={value!r} (unknown option)")
            elif not (value == only_at[key]
                      or isinstance(value, (list, tuple)) and all(v == only_at[key] for v in value)):
                unsupported.append(f"{key}={value!r} (only {only_at[key]!r} is supported)")
        if unsupported:
            raise ValueError("this ControlNet does not implement these config values: " + "; ".join(unsupported)
                             + ". ldm_teach supports the SD 1.x / 2.x ControlNets.")
        return cls(**{key: value for key, value in config.items() if key in ours})


# --- the pieces --------------------------------------------------------------------------------


def zero_convolution(channels: int) -> nn.Conv2d:
    """A 1x1 convolution with weights and bias at zero: its output is zero until training changes it,
    so a freshly made ControlNet leaves the U-Net it steers exactly as it was."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class ControlNetConditioningEmbedding(nn.Module):
    """The control image (B, C, H, W) in [0, 1] -> features (B, C0, H/s, W/s) at the latents' resolution.

    A 3x3 conv, then per width pair a 3x3 conv and a stride-2 3x3 conv (SiLU after each), and a
    zero-initialised 3x3 conv out to the U-Net's first width C0; s = 2 ** (len(widths) - 1).
    """

    def __init__(self, out_channels: int, conditioning_channels: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(width_in, width_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(width_in, width_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, control_image: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv_in(control_image))  # (B, widths[0], H, W)
        for block in self.blocks:
            h = F.silu(block(h))  # halved at every second conv
        return self.conv_out(h)  # (B, C0, H/s, W/s)


class ControlNet(nn.Module):
    """``controlnet(x, t, context, control_image, conditioning_scale=1.0)`` -> (down_residuals, mid_residual).

    x (B, 4, h, w) the noisy latents, t and context as for the U-Net, control_image (B, 3, h·s,
    w·s) in [0, 1]. The down path and middle block are a copy of the U-Net's (``from_unet``
    copies the weights); the control image's embedding is added after ``conv_in``. Every map the
    down path keeps for the U-Net's skips goes through its own zero convolution: the residuals
    (one per skip, the skip's shape) and the middle block's, times ``conditioning_scale``, which
    ``UNet.forward`` adds to its skips and middle output. Chapter 07, section "ControlNet".
    """

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        self.config = config
        unet_config = config.unet_config()
        channels = config.block_out_channels
        time_dim = 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            channels[0], config.conditioning_channels, config.conditioning_embedding_out_channels)
        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]  # the width of every map the U-Net's down path keeps, in order
        for level, out_channels in enumerate(channels):
            in_channels = channels[max(level - 1, 0)]
            self.down_blocks.append(DownBlock(in_channels, out_channels, unet_config, level, time_dim))
            skip_channels += [out_channels] * (config.layers_per_block + (level < len(channels) - 1))
        self.controlnet_down_blocks = nn.ModuleList(zero_convolution(c) for c in skip_channels)
        self.mid_block = MidBlock(channels[-1], unet_config, time_dim)
        self.controlnet_mid_block = zero_convolution(channels[-1])

    @classmethod
    def from_unet(cls, unet: UNet, conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
                  conditioning_channels: int = 3) -> ControlNet:
        """A new ControlNet for ``unet``: its down path and middle block copied, the zero convolutions at zero,
        so that at first it changes nothing (Chapter 07, "Zero convolutions")."""
        config = ControlNetConfig.from_unet_config(
            unet.config, conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels))
        controlnet = cls(config).to(unet.conv_in.weight.device, unet.conv_in.weight.dtype)
        for name in ("conv_in", "time_embedding", "down_blocks", "mid_block"):
            getattr(controlnet, name).load_state_dict(getattr(unet, name).state_dict())
        return controlnet

    def forward(self, x: torch.Tensor, t, context: torch.Tensor, control_image: torch.Tensor,
                conditioning_scale: float = 1.0) -> tuple[list[torch.Tensor], torch.Tensor]:
        t = UNet.check_inputs(self, x, t, context)  # the U-Net's own checks of x, t and context; (B,)
        expected = tuple(side * self.config.control_downsample_factor for side in x.shape[-2:])
        if control_image.ndim != 4 or control_image.shape[1] != self.config.conditioning_channels or (
                tuple(control_image.shape[-2:]) != expected or len(control_image) != len(x)):
            raise ValueError(
                f"control_image has shape {tuple(control_image.shape)}, but for latents of shape {tuple(x.shape)} this "
                f"ControlNet takes ({len(x)}, {self.config.conditioning_channels}, {expected[0]}, {expected[1]}): "
                f"{self.config.control_downsample_factor}x the latents' sides, the size of the image being made."
            )
        if self.config.controlnet_conditioning_channel_order == "bgr":
            control_image = control_image.flip(1)
        features = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                      self.config.freq_shift)
        time_emb = self.time_embedding(features.to(x.dtype))  # (B, 4 * C0)

        x = self.conv_in(x) + self.controlnet_cond_embedding(control_image)  # (B, C0, h, w)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time_emb, context)
            skips += block_skips
        x = self.mid_block(x, time_emb, context)  # (B, C_last, h / 2^(levels-1), w / 2^(levels-1))
        down_residuals = [conv(skip) * conditioning_scale for conv, skip in zip(self.controlnet_down_blocks, skips)]
        return down_residuals, self.controlnet_mid_block(x) * conditioning_scale


def check_controlnet_fits(controlnet: ControlNet, unet: UNet) -> None:
    """A ControlNet makes one residual per skip of the U-Net it was trained with; refuse one of other shapes."""
    names = ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
    differing = [f"{name}: ControlNet {getattr(controlnet.config, name)!r} vs U-Net {getattr(unet.config, name)!r}"
                 for name in names if getattr(controlnet.config, name) != getattr(unet.config, name)]
    if differing:
        raise ValueError("the ControlNet does not fit this U-Net (" + "; ".join(differing) + "): its residuals must "
                         "match the U-Net's skips. Use a ControlNet made for this U-Net (SD 1.5's for SD 1.5).")


# --- the pipeline --------------------------------------------------------------------------------


class StableDiffusionControlNet(EditingPipeline):
    """Text to image steered by a control image (Chapter 07, section "ControlNet").

    ``pipe(prompt, image=control_image, controlnet_conditioning_scale=1.0, negative_prompt=None,
    num_inference_steps=50, guidance_scale=7.5, generator=None, output_type="pil")``, as
    diffusers' ``StableDiffusionControlNetPipeline``: the control image (PIL, or (B, 3, H, W) in
    [0, 1]; one for all prompts or one per prompt) sets the output's size. At every step the
    ControlNet sees the same latents, timestep and prompt as the U-Net, plus the control image,
    and its residuals are added to the U-Net's skips; ``control_guidance_start`` and
    ``control_guidance_end`` (fractions of the steps) say when it acts. diffusers' ``guess_mode``
    is not implemented.
    """

    def __init__(self, unet, controlnet, vae, text_encoder, tokenizer, scheduler):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler)
        check_controlnet_fits(controlnet, unet)
        self.controlnet = controlnet.eval()

    @property
    def components(self) -> dict:
        return {**super().components, "controlnet": self.controlnet}

    def to(self, device=None, dtype=None) -> StableDiffusionControlNet:
        super().to(device, dtype)
        self.controlnet.to(device=self.device, dtype=dtype)
        return self

    def check_devices(self) -> None:
        super().check_devices()
        weight = self.controlnet.conv_in.weight
        if (weight.device, weight.dtype) != (self.device, self.dtype):
            raise ValueError(f"the controlnet is {weight.dtype} on {weight.device} but the U-Net {self.dtype} on "
                             f"{self.device}; move them together with pipe.to(device, dtype).")

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], image, negative_prompt=None, num_inference_steps: int = 50,
                 guidance_scale: float = 7.5, height: int | None = None, width: int | None = None, generator=None,
                 output_type: str = "pil", eta: float = 0.0, num_images_per_prompt: int = 1,
                 controlnet_conditioning_scale: float = 1.0, guess_mode: bool = False,
                 control_guidance_start: float = 0.0, control_guidance_end: float = 1.0, latents=None,
                 callback=None, progress: bool = True) -> PipelineOutput:
        prompts, negatives, guidance_scale = self.check_prompts(prompt, negative_prompt, guidance_scale)
        num_inference_steps, num_images_per_prompt, eta = self.check_common(
            num_inference_steps, num_images_per_prompt, eta, generator, callback, output_type)
        scale = as_float(controlnet_conditioning_scale, "controlnet_conditioning_scale")
        start = as_float(control_guidance_start, "control_guidance_start")
        end = as_float(control_guidance_end, "control_guidance_end")
        if guess_mode:
            raise ValueError("guess_mode=True (the ControlNet without the prompt, residuals scaled from 0.1 to 1) is "
                             "not implemented in ldm_teach; use guess_mode=False.")
        if not 0 <= start < end <= 1:
            raise ValueError(f"control_guidance_start={start} and control_guidance_end={end} must satisfy "
                             "0 <= start < end <= 1: the fractions of the steps between which the ControlNet acts.")
        control = image_tensor(image, "image")  # (N, 3, H, W) in [0, 1]
        height, width = self.check_image_size(control, "the control image", height, width)
        if control.shape[1] != self.controlnet.config.conditioning_channels:
            raise ValueError(f"the control image has {control.shape[1]} channels but the ControlNet takes "
                             f"{self.controlnet.config.conditioning_channels}.")
        if len(control) not in (1, len(prompts)):
            raise ValueError(f"{len(control)} control images were passed for {len(prompts)} prompts; pass one for all "
                             "prompts, or one per prompt.")
        batch_size = len(prompts) * num_images_per_prompt
        shape = (batch_size, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)  # (B, 4, h, w)
        if control.shape[-1] != shape[-1] * self.controlnet.config.control_downsample_factor:
            raise ValueError(f"the control image is {height}x{width}, but the VAE makes latents of {shape[-2]}x"
                             f"{shape[-1]} from it and this ControlNet's embedding shrinks images "
                             f"{self.controlnet.config.control_downsample_factor}x: the two must agree.")
        if latents is not None:
            check_tensor(latents, "latents")
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents has shape {tuple(latents.shape)}, but this batch needs {shape}.")
        step_options = self.step_options(generator, eta)

        guided = guidance_scale > 1
        context = self.encode_context(prompts, negatives, guided, num_images_per_prompt)  # (B or 2B, 77, D)
        control = control.repeat_interleave(batch_size if len(control) == 1 else num_images_per_prompt, dim=0)
        control = control.to(self.device, self.controlnet.conv_in.weight.dtype)  # (B, 3, H, W)
        control = torch.cat([control] * 2) if guided else control  # one per row of the guided batch
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        timesteps = self.scheduler.timesteps
        if latents is None:
            latents = draw_latents(shape, generator, self.device, context.dtype)
        latents = latents.to(self.device) * self.scheduler.init_noise_sigma
        n = len(timesteps)
        keep = [0.0 if (i / n < start or (i + 1) / n > end) else 1.0 for i in range(n)]  # diffusers' controlnet_keep

        def predict_noise(model_input, t, context, step):
            down_residuals, mid_residual = self.controlnet(model_input, t, context, control, scale * keep[step])
            return self.unet(model_input, t, context, down_residuals=down_residuals, mid_residual=mid_residual)

        latents = self.denoise(latents, context, timesteps, guidance_scale, step_options, callback, progress,
                               predict_noise=predict_noise)
        return self.finish(latents, output_type)

