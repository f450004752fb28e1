"""The conditional U-Net that predicts the noise in a latent, given a timestep and a text context.

Chapter 04 builds this file top to bottom:

1. ``UNetConfig``: the handful of numbers that tell SD 1.5, SD 2.x and our tiny model apart (4.1);
2. ``timestep_embedding`` and its MLP: how the network knows *which* step it is denoising (4.2);
3. ``ResBlock``, ``Downsample``, ``Upsample``: the convolutional body (4.3);
4. ``Attention``, ``FeedForward``, ``TransformerBlock``, ``SpatialTransformer``: self-attention
   over the latent's pixels and cross-attention from the pixels to the prompt's tokens (4.4);
5. ``DownBlock``, ``MidBlock``, ``UpBlock`` and ``UNet``: the down path, the middle, and the
   up path that concatenates the down path's skips (4.5);
6. ``capture_cross_attention``: which pixels looked at which word (4.6).

Chapter 08 adds SDXL's options: levels without attention, deeper transformers, and the added
conditioning on the pooled prompt and the image sizes (``addition_embed_type="text_time"``,
built in ``unet_sdxl.py``).

Module names follow diffusers' ``UNet2DConditionModel`` (``down_blocks.0.resnets.1.conv1``, ...)
so that its checkpoints load with a few readable renames (``pretrained.unet_key_from_diffusers``).
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .checks import check_tensor

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


# --- the configuration (4.1) -----------------------------------------------------------------


@dataclass
class UNetConfig:
    """What distinguishes one U-Net from another; the defaults are SD 1.5's (Chapter 04, section 4.1).

    The field names are diffusers' (``UNet2DConditionModel.config``), including one historical
    quirk: diffusers reads ``attention_head_dim`` as the *number of heads* per level (SD 1.5's
    ``8`` means 8 heads of 40, 80, 160 and 160 channels), unless ``num_attention_heads`` is set.
    ``heads_per_level`` resolves this. Per-level values are an int (the same at every level) or
    one entry per level, from the highest resolution down.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64  # the latent side the model was trained at (64 = 512 px / 8)
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
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
    # SDXL (Chapter 08): "text_time" adds the pooled prompt and the size numbers to the time embedding.
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoidal features per size number (SDXL: 256)
    projection_class_embeddings_input_dim: int | None = None  # pooled width + numbers x 256 (SDXL: 2816)

    def __post_init__(self):
        for name in ("block_out_channels", "down_block_types", "up_block_types", "attention_head_dim",
                     "num_attention_heads", "transformer_layers_per_block"):
            if isinstance(getattr(self, name), list):  # JSON configs hold lists
                setattr(self, name, tuple(getattr(self, name)))
        if not isinstance(self.block_out_channels, tuple) or not all(
                isinstance(c, numbers.Integral) and c > 0 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels!r} must be a tuple of positive ints, one "
                             "width per level, e.g. (320, 640, 1280, 1280).")
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        levels = len(self.block_out_channels)
        for name, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, name)
            if len(types) != levels or not set(types) <= set(allowed):
                raise ValueError(
                    f"{name}={types} must hold one of {allowed} per level ({levels} levels, as in "
                    f"block_out_channels={self.block_out_channels})."
                )
        for name in ("layers_per_block", "cross_attention_dim"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name}={getattr(self, name)!r} must be one int for the whole U-Net.")
        for level, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads_per_level)):
            if channels % self.norm_num_groups or channels % heads:
                raise ValueError(
                    f"level {level} has {channels} channels, which must divide into norm_num_groups="
                    f"{self.norm_num_groups} groups and {heads} attention heads."
                )
        self.per_level("transformer_layers_per_block")
        self.upcast_attention = bool(self.upcast_attention)  # SDXL's config.json says null
        if self.addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type={self.addition_embed_type!r} is not implemented: use None "
                             "(SD 1.x / 2.x) or 'text_time' (SDXL's pooled prompt and size numbers).")
        widths = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim)
        if self.addition_embed_type == "text_time" and not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"addition_embed_type='text_time' needs positive ints addition_time_embed_dim and "
                             f"projection_class_embeddings_input_dim, got {widths} (SDXL base: 256 and 2816).")

    def per_level(self, name: str) -> tuple:
        """The field ``name`` as one value per level (an int is repeated)."""
        value = getattr(self, name)
        levels = len(self.block_out_channels)
        if isinstance(value, int):
            return (value,) * levels
        if len(value) != levels:
            raise ValueError(f"{name}={value} needs one value per level ({levels}), or a single int.")
        return tuple(value)

    @property
    def heads_per_level(self) -> tuple[int, ...]:
        """Attention heads at each level: ``num_attention_heads``, else (diffusers' quirk) ``attention_head_dim``."""
        if self.num_attention_heads is not None:
            return self.per_level("num_attention_heads")
        return self.per_level("attention_head_dim")

    @classmethod
    def sd15(cls) -> UNetConfig:
        """Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5): CLIP ViT-L/14 context, 768 wide."""
        return cls()

    @classmethod
    def sd2(cls) -> UNetConfig:
        """Stable Diffusion 2.x (stabilityai/stable-diffusion-2-1): OpenCLIP ViT-H context, 1024 wide,
        heads of 64 channels (5, 10, 20, 20 heads), linear projections, attention upcast to float32.
        SDXL's configs are ``unet_sdxl.sdxl_base()`` and ``unet_sdxl.sdxl_refiner()``."""
        return cls(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                   use_linear_projection=True, upcast_attention=True)

    @classmethod
    def tiny(cls, **overrides) -> UNetConfig:
        """A two-level U-Net of 0.8 M parameters for CPU training and tests; ``overrides`` replace fields."""
        settings = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1,
                        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                        attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8)
        return cls(**{**settings, **overrides})

    @classmethod
    def from_diffusers_config(cls, config: dict) -> UNetConfig:
        """Our config from a diffusers ``UNet2DConditionModel`` config (``model.config`` or config.json).

        Options this U-Net does not implement (class or added embeddings, other block types,
        other activations, ...) raise a ValueError naming them, rather than loading a model
        that would silently compute something else.
        """
        ours = {f.name for f in fields(cls)}
        unsupported = []
        for key, value in config.items():
            if key in ours or key.startswith("_") or key in IGNORED_DIFFUSERS_KEYS:
                continue
            if key not in SUPPORTED_ONLY_AT:
                unsupported.append(f"{key}={value!r} (unknown option)")
            elif not (value == SUPPORTED_ONLY_AT[key] or isinstance(value, (list, tuple))
                      and all(v == SUPPORTED_ONLY_AT[key] for v in value)):
                unsupported.append(f"{key}={value!r} (only {SUPPORTED_ONLY_AT[key]!r} is supported)")
        if unsupported:
            raise ValueError("this U-Net does not implement these config values: " + "; ".join(unsupported)
                             + ". ldm_teach supports the SD 1.x / 2.x and SDXL text-to-image U-Nets.")
        return cls(**{key: value for key, value in config.items() if key in ours})


# diffusers options that ldm_teach implements only at their SD 1.x/2.x/XL value.
SUPPORTED_ONLY_AT = {
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu",
    "encoder_hid_dim": None, "encoder_hid_dim_type": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False, "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
}
# diffusers options with no effect on this U-Net (the heads of addition_embed_type="text", which it refuses).
IGNORED_DIFFUSERS_KEYS = {"addition_embed_type_num_heads"}


# --- the timestep (4.2) ----------------------------------------------------------------------


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0,
                       max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal features of the timesteps t (B,) -> (B, dim), float32 (Chapter 04, section 4.2).

    As in the Transformer's positional encoding, feature i is sin or cos of t * f_i with the
    frequencies f_i spaced geometrically from 1 down to about 1/max_period, so nearby steps get
    similar vectors and far-apart steps different ones. ``flip_sin_to_cos`` puts the cosines
    first and ``freq_shift`` shifts the spacing; SD uses (True, 0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    frequencies = torch.exp(exponent / (half - freq_shift))  # (half,)
    angles = t[:, None].float() * frequencies[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)  # (B, 2 * half)
    return F.pad(embedding, (0, dim % 2))  # (B, dim)


class TimestepEmbedding(nn.Module):
    """Linear-SiLU-Linear on the sinusoidal features: (B, C0) -> (B, 4 * C0) (Chapter 04, section 4.2)."""

    def __init__(self, channels: int, embedding_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(channels, embedding_dim)
        self.linear_2 = nn.Linear(embedding_dim, embedding_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(features)))


# --- the convolutional body (4.3) ------------------------------------------------------------


class ResBlock(nn.Module):
    """Two 3x3 convs with the timestep added in between, plus a skip (Chapter 04, section 4.3).

    GroupNorm-SiLU-conv, then the time embedding projected to one value per channel and added
    to every pixel, then GroupNorm-SiLU-conv again. The skip is the identity, or a 1x1 conv
    when the block changes the channel count.
    """

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_dim, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = h + self.time_emb_proj(F.silu(time_emb))[:, :, None, None]  # (B, C_out, 1, 1) broadcast over pixels
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv: (B, C, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution (nearest neighbour), then a 3x3 conv (Chapter 04, section 4.3).

    The target ``size`` is the spatial size of the skip the up path concatenates next: exactly
    2x, except where the down path rounded an odd side up (7 -> 4 -> 7, not 8).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))  # (B, C, size[0], size[1])


# --- attention (4.4) -------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention: self-attention when ``context`` is None, else cross-attention (Chapter 04, section 4.4).

    Queries come from the image tokens x (B, N, C); keys and values from ``context`` (B, L, D),
    the prompt's token features for cross-attention. The softmax weights say how much each
    pixel takes from each token. ``record_probs``, set by ``capture_cross_attention``, makes
    the layer compute those weights explicitly and hand them over; otherwise the fused
    ``scaled_dot_product_attention`` kernel runs and never materialises them.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        self.heads, self.head_dim, self.upcast = heads, head_dim, upcast
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Linear(inner, query_dim)
        self.record_probs = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        B, N, _ = x.shape
        L = context.shape[1]
        q = self.to_q(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)
        v = self.to_v(context).view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, L, d)
        if self.record_probs is None:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        else:
            out = self.attend_and_record(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.head_dim)  # (B, N, heads * d)
        return self.to_out(out)

    def attend_and_record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(d)) v, written out, recording the softmax weights (B, heads, N, L).

        With ``upcast`` (SD 2.x) the scores and softmax are computed in float32 even for fp16
        inputs, as the original code does; the fused kernel accumulates in float32 by itself.
        """
        if self.upcast:
            q, k = q.float(), k.float()
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)  # (B, heads, N, L)
        probs = scores.softmax(dim=-1).to(v.dtype)
        self.record_probs(probs.detach())
        return probs @ v  # (B, heads, N, d)


class FeedForward(nn.Module):
    """The transformer's MLP with a GEGLU gate: (B, N, C) -> (B, N, C) via 4C hidden units (Chapter 04, section 4.4).

    ``proj_in`` makes 2 x 4C features; half of them, through a GELU, gate the other half.
    """

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj_in(x).chunk(2, dim=-1)  # 2 x (B, N, 4C)
        return self.proj_out(hidden * F.gelu(gate))


class TransformerBlock(nn.Module):
    """LayerNorm then self-attention, cross-attention and feed-forward, each added back to its input.

    Chapter 04, section 4.4.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # pixels attend to pixels
        x = x + self.attn2(self.norm2(x), context)  # pixels attend to the prompt's tokens
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer blocks over a feature map's pixels as tokens, with a residual (Chapter 04, section 4.4).

    GroupNorm, a projection in (a 1x1 conv in SD 1.x, a linear layer on the flattened pixels in
    SD 2.x: the same map, stored differently), the blocks, a projection out, plus the input.
    """

    def __init__(self, channels: int, heads: int, context_dim: int, num_layers: int, groups: int,
                 use_linear_projection: bool, upcast: bool):
        super().__init__()
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        projection = nn.Linear if use_linear_projection else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = projection(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(channels, heads, channels // heads, context_dim, upcast) for _ in range(num_layers)
        )
        self.proj_out = projection(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, C)
        else:
            h = self.proj_in(h).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous())  # (B, C, H, W)
        return x + h


# --- the U (4.5) -----------------------------------------------------------------------------


def spatial_transformer(channels: int, config: UNetConfig, level: int) -> SpatialTransformer:
    """The SpatialTransformer of a down-path ``level`` (0 = highest resolution), as the config says."""
    return SpatialTransformer(
        channels, config.heads_per_level[level], config.cross_attention_dim,
        config.per_level("transformer_layers_per_block")[level], config.norm_num_groups,
        config.use_linear_projection, config.upcast_attention,
    )


class DownBlock(nn.Module):
    """One level of the down path: ResBlocks (each followed by a SpatialTransformer when the level
    has cross-attention), then a Downsample except at the last level (Chapter 04, section 4.5).

    Returns the output and every intermediate map, which the up path concatenates back in.
    """

    def __init__(self, in_channels: int, out_channels: int, config: UNetConfig, level: int, time_dim: int):
        super().__init__()
        groups, eps, n = config.norm_num_groups, config.norm_eps, config.layers_per_block
        self.resnets = nn.ModuleList(
            ResBlock(in_channels if i == 0 else out_channels, out_channels, time_dim, groups, eps) for i in range(n)
        )
        self.attentions = nn.ModuleList()
        if config.down_block_types[level] == "CrossAttnDownBlock2D":
            self.attentions.extend(spatial_transformer(out_channels, config, level) for _ in range(n))
        self.downsample = Downsample(out_channels) if level < len(config.block_out_channels) - 1 else None

    def forward(self, x, time_emb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, time_emb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)  # (B, C, ceil(H/2), ceil(W/2))
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """ResBlock, SpatialTransformer, ResBlock at the lowest resolution (Chapter 04, section 4.5)."""

    def __init__(self, channels: int, config: UNetConfig, time_dim: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(ResBlock(channels, channels, time_dim, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([spatial_transformer(channels, config, len(config.block_out_channels) - 1)])

    def forward(self, x, time_emb, context):
        x = self.resnets[0](x, time_emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, time_emb)


class UpBlock(nn.Module):
    """One level of the up path: layers_per_block + 1 ResBlocks, each taking the last unused skip
    concatenated to its input (plus a SpatialTransformer at cross-attention levels), then an
    Upsample except at the last level (Chapter 04, section 4.5).

    ``level`` counts from the lowest resolution: up block 0 mirrors the last down block.
    """

    def __init__(self, in_channels: int, out_channels: int, skip_channels: list[int], config: UNetConfig,
                 level: int, time_dim: int):
        super().__init__()
        groups, eps = config.norm_num_groups, config.norm_eps
        self.resnets = nn.ModuleList(
            ResBlock((in_channels if i == 0 else out_channels) + skip, out_channels, time_dim, groups, eps)
            for i, skip in enumerate(skip_channels)
        )
        self.attentions = nn.ModuleList()
        levels = len(config.block_out_channels)
        if config.up_block_types[level] == "CrossAttnUpBlock2D":
            self.attentions.extend(
                spatial_transformer(out_channels, config, levels - 1 - level) for _ in skip_channels
            )
        self.upsample = Upsample(out_channels) if level < levels - 1 else None

    def forward(self, x, skips: list[torch.Tensor], time_emb, context):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = resnet(x, time_emb)
            if self.attentions:
                x = self.attentions[i](x, context)
        if self.upsample is not None:
            x = self.upsample(x, size=skips[-1].shape[-2:])  # (B, C, H_skip, W_skip)
        return x


class UNet(nn.Module):
    """The conditional U-Net: ``unet(x, t, context)`` predicts the noise in latents x (Chapter 04, section 4.5).

    x (B, in_channels, H, W), t an int or a (B,) tensor of timesteps, context (B, L,
    cross_attention_dim) the text encoder's token features -> (B, out_channels, H, W). An SDXL
    U-Net also takes ``added_cond_kwargs``, the pooled prompt and the size numbers (``unet_sdxl``).
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        time_dim = 4 * channels[0]
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.add_embedding = None
        if config.addition_embed_type == "text_time":  # SDXL (Chapter 08); imported here: unet_sdxl imports us
            from .unet_sdxl import TextTimeEmbedding

            self.add_embedding = TextTimeEmbedding(config, time_dim)

        self.down_blocks = nn.ModuleList()
        skip_channels = [channels[0]]  # the width of every map the down path keeps, in order
        for level, out_channels in enumerate(channels):
            in_channels = channels[max(level - 1, 0)]
            self.down_blocks.append(DownBlock(in_channels, out_channels, config, level, time_dim))
            skip_channels += [out_channels] * (config.layers_per_block + (level < len(channels) - 1))

        self.mid_block = MidBlock(channels[-1], config, time_dim)

        self.up_blocks = nn.ModuleList()
        in_channels = channels[-1]
        for level, out_channels in enumerate(reversed(channels)):
            block_skips = [skip_channels.pop() for _ in range(config.layers_per_block + 1)]
            self.up_blocks.append(UpBlock(in_channels, out_channels, block_skips, config, level, time_dim))
            in_channels = out_channels

        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], config.out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: int | float | torch.Tensor, context: torch.Tensor | None = None,
                added_cond_kwargs: dict[str, torch.Tensor] | None = None,
                down_residuals: list[torch.Tensor] | None = None,
                mid_residual: torch.Tensor | None = None) -> torch.Tensor:
        """``added_cond_kwargs`` is SDXL's ``{"text_embeds": (B, 1280), "time_ids": (B, 6)}`` (Chapter 08).
        ``down_residuals`` (one per skip) and ``mid_residual`` are a ControlNet's outputs, added to the
        skips and to the middle block's output (Chapter 07, section "ControlNet"); None leaves them alone."""
        t = self.check_inputs(x, t, context)  # (B,)
        features = timestep_embedding(t, self.config.block_out_channels[0], self.config.flip_sin_to_cos,
                                      self.config.freq_shift)
        time_emb = self.time_embedding(features.to(x.dtype))  # (B, 4 * C0)
        if self.add_embedding is not None:  # SDXL: the pooled prompt and the sizes join the timestep
            time_emb = time_emb + self.add_embedding(added_cond_kwargs, len(x), time_emb.dtype)  # (B, 4 * C0)
        elif added_cond_kwargs is not None:
            raise ValueError("added_cond_kwargs was passed, but this U-Net has no added conditioning "
                             "(config.addition_embed_type is None: SD 1.x / 2.x); leave it out.")

        x = self.conv_in(x)  # (B, C0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time_emb, context)
            skips += block_skips
        x = self.mid_block(x, time_emb, context)  # (B, C_last, H / 2^(levels-1), W / 2^(levels-1))
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} down_residuals were passed for the U-Net's {len(skips)} "
                                 "skips; pass the ControlNet's outputs for this very U-Net config.")
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            x = block(x, skips, time_emb, context)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, out_channels, H, W)

    def check_inputs(self, x: torch.Tensor, t, context: torch.Tensor) -> torch.Tensor:
        """Refuse inputs the U-Net cannot use, saying what to pass instead; returns t as a (B,) tensor."""
        config = self.config
        if context is None:
            raise TypeError(
                f"unet(x, t, context) needs context, the text encoder's token features (B, 77, "
                f"{config.cross_attention_dim}); for an unconditional prediction pass the empty prompt's "
                "features, text_encoder(tokenizer([''] * B))."
            )
        check_tensor(x, "x", finite=False)  # types only: a finiteness check would sync the GPU at every call
        check_tensor(context, "context", finite=False)
        if isinstance(t, str):
            raise TypeError(f"t={t!r} is a string; pass the timestep as a number or a tensor, e.g. t=int({t!r}).")
        if x.ndim != 4 or x.shape[1] != config.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)}, but this U-Net takes latents (B, {config.in_channels}, H, W) "
                "(config.in_channels): pass the VAE's latents, not images."
            )
        smallest = 2 ** (len(config.block_out_channels) - 1)
        if min(x.shape[-2:]) < smallest:
            raise ValueError(
                f"the latent is {x.shape[-2]}x{x.shape[-1]}, but the down path halves it "
                f"{len(config.block_out_channels) - 1} times: each side must be at least {smallest} "
                f"(an image side of at least {8 * smallest} px for SD's VAE)."
            )
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != config.cross_attention_dim:
            raise ValueError(
                f"context has shape {tuple(context.shape)}, but this U-Net's cross-attention takes "
                f"({x.shape[0]}, L, {config.cross_attention_dim}): one row of token features per latent, "
                f"{config.cross_attention_dim} wide (SD 1.x: CLIP ViT-L/14, 768; SD 2.x: OpenCLIP ViT-H, 1024; "
                "SDXL: both encoders side by side, 2048). Use the text encoder that matches this U-Net."
            )
        weight = self.conv_in.weight
        if (x.device, x.dtype) != (weight.device, weight.dtype) or context.dtype != weight.dtype:
            raise ValueError(
                f"x is {x.dtype} on {x.device} and context {context.dtype}, but the U-Net's weights are "
                f"{weight.dtype} on {weight.device}: move the inputs with .to(device, dtype)."
            )
        t = torch.as_tensor(t, device=x.device)
        if t.ndim > 1 or t.numel() not in (1, x.shape[0]):
            raise ValueError(f"t has shape {tuple(t.shape)}; pass one timestep, or one per latent ({x.shape[0]},).")
        return t.reshape(-1).expand(x.shape[0])


# --- looking inside (4.6) --------------------------------------------------------------------


@contextmanager
def capture_cross_attention(unet: UNet):
    """Record every cross-attention layer's softmax weights while the block is active (Chapter 04, section 4.6).

    Yields a dict that each forward pass fills with layer name -> probabilities (B, heads, H*W, L),
    for each pixel of that layer's feature map the share of attention it gives each token
    (each row sums to 1). A later forward pass overwrites the earlier one's entries. Outside
    the block the layers go back to the fused kernel, so capturing costs nothing when unused.
    """
    store: dict[str, torch.Tensor] = {}
    layers = [(name, module) for name, module in unet.named_modules() if name.endswith(".attn2")]
    for name, module in layers:
        module.record_probs = partial(store.__setitem__, name)
    try:
        yield store
    finally:
        for _, module in layers:
            module.record_probs = None
