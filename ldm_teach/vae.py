"""The variational autoencoder that carries images into Stable Diffusion's latent space and back.

Chapter 02 builds this file top to bottom:

1. ``VAEConfig``: the handful of numbers that fix the architecture (SD's, a tiny one, or any
   diffusers ``AutoencoderKL`` config);
2. the building blocks: ``ResnetBlock``, ``Downsample``, ``Upsample`` and the single-head
   ``SelfAttention`` of the middle block;
3. the ``Encoder``, which turns a (B, 3, H, W) image into the mean and log-variance of a
   (B, 4, H/8, W/8) latent, and the ``DiagonalGaussian`` posterior they define;
4. the ``Decoder``, the encoder's mirror image;
5. ``AutoencoderKL``, which joins them (and rescues fp16 decodes that overflow);
6. the training losses: reconstruction (with LPIPS from ``ldm_teach.perceptual`` where its
   weights can be had), KL, and the adversarial loss of a ``PatchDiscriminator`` with LDM's
   adaptive weight.

The module names follow diffusers' ``AutoencoderKL`` so that its weights load by a few
renaming rules (see ``pretrained.vae_from_diffusers``), and every computation matches it
to float32 rounding.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_tensor

# --- configuration -------------------------------------------------------------------------


@dataclass
class VAEConfig:
    """The architecture of an ``AutoencoderKL``; the field names are those of diffusers' config.

    ``block_out_channels`` has one entry per resolution level; every level but the last halves
    the image, so the downsampling factor is ``2 ** (levels - 1)`` (8 for SD).
    ``scaling_factor`` rescales latents to roughly unit variance before the U-Net sees them
    (Chapter 02, section "The scaling factor"). ``force_upcast`` asks the SDXL pipeline to decode
    a float16 VAE in float32 (SDXL's VAE overflows in float16; its "fp16-fix" says False).
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 512
    scaling_factor: float = 0.18215
    mid_block_add_attention: bool = True
    force_upcast: bool = True

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        if isinstance(self.sample_size, list):
            self.sample_size = tuple(self.sample_size)
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one channel count per level, e.g. (128, 256, 512, 512).")
        uneven = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if uneven:
            raise ValueError(
                f"block_out_channels {self.block_out_channels} has {uneven}, not divisible by "
                f"norm_num_groups={self.norm_num_groups}; GroupNorm needs whole groups, so change one or the other."
            )

    @property
    def downsample_factor(self) -> int:
        """f: how many pixels along each side one latent cell stands for (8 for SD)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def sd(cls) -> "VAEConfig":
        """Stable Diffusion 1.x/2.x: four levels (f = 8), 4 latent channels, 83.7M parameters."""
        return cls()

    @classmethod
    def tiny(cls, downsample_factor: int = 4) -> "VAEConfig":
        """A VAE small enough to train on a CPU in the chapter: 16 then 32 channels, 4 latent channels.

        ``downsample_factor`` (f, a power of two) sets the number of levels, 1 + log2(f); the
        default f = 4 has three levels and about 240k parameters. Its ``scaling_factor`` is 1
        until the chapter measures the latents' spread after training.
        """
        if downsample_factor < 1 or downsample_factor & (downsample_factor - 1):
            raise ValueError(f"downsample_factor={downsample_factor} is not a power of two; use 1, 2, 4, 8, 16, ...")
        levels = downsample_factor.bit_length()  # f = 2 ** (levels - 1)
        return cls(block_out_channels=(16,) + (32,) * (levels - 1), layers_per_block=1, norm_num_groups=8,
                   sample_size=32, scaling_factor=1.0)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "VAEConfig":
        """Our config from a diffusers ``AutoencoderKL`` config (its ``config.json`` as a dict).

        Keys that are missing take diffusers' defaults. Anything this package does not build
        (other block types or activations, no quant convs, SD3/Flux-style latent shifts) is a
        ValueError naming the key. ``force_upcast`` is kept for the SDXL pipeline; our ``decode``
        also reruns in float32 whenever a float16 decode actually overflows.
        """
        config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        # diffusers' defaults, for the keys a config leaves out
        values = {"in_channels": 3, "out_channels": 3, "block_out_channels": (64,), "layers_per_block": 1,
                  "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
                  "mid_block_add_attention": True, "force_upcast": True}
        values.update({k: config.pop(k) for k in list(config) if k in values})
        levels = len(values["block_out_channels"])
        expected = {
            "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels,
            "use_quant_conv": True,
            "use_post_quant_conv": True,
            "shift_factor": None,
            "latents_mean": None,
            "latents_std": None,
        }
        for key, wanted in expected.items():
            given = config.pop(key, wanted)
            if (list(given) if isinstance(given, (list, tuple)) else given) != wanted:
                raise ValueError(
                    f"{key}={given!r} is not supported: ldm_teach builds SD 1.x/2.x-style VAEs, which have "
                    f"{key}={wanted!r}."
                )
        act_fn = config.pop("act_fn", "silu")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={act_fn!r} is not supported: ldm_teach's VAE uses SiLU ('silu').")
        if config:
            raise ValueError(f"unknown AutoencoderKL config keys {sorted(config)}; this ldm_teach cannot build them.")
        return cls(**values)


# --- building blocks -----------------------------------------------------------------------


class ResnetBlock(nn.Module):
    """Two (GroupNorm, SiLU, 3x3 conv) steps plus a skip connection (Chapter 02, section "Encoder and decoder").

    The skip is a 1x1 conv when the channel count changes, so the two paths can be added.
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv.

    The original LDM code pads only the right and bottom edge by one pixel, then convolves
    without padding; diffusers keeps that asymmetry, and so must we to load its weights.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (0, 1, 0, 1))  # (B, C, H + 1, W + 1): one column right, one row below
        return self.conv(x)  # (B, C, H / 2, W / 2)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour copies, then a 3x3 conv to smooth them."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x)


class SelfAttention(nn.Module):
    """Single-head self-attention over all pixels, with a residual connection.

    It sits only at the lowest resolution (64x64 latents for a 512x512 image), where it lets
    every position see every other one at an affordable (H*W)^2 cost.
    """

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, H*W, C): one token per pixel
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)  # each (B, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, H*W, C), softmax(q k^T / sqrt(C)) v
        h = self.to_out(h).transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + h


class MidBlock(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock: the bottleneck of both encoder and decoder."""

    def __init__(self, channels: int, num_groups: int, add_attention: bool = True):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, num_groups) for _ in range(2)])
        self.attention = SelfAttention(channels, num_groups) if add_attention else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnets[1](self.attention(self.resnets[0](x)))


class DownBlock(nn.Module):
    """One encoder level: ``num_layers`` ResnetBlocks, then a Downsample (except at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups) for i in range(num_layers)]
        )
        self.downsample = Downsample(out_channels) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsample(x)


class UpBlock(nn.Module):
    """One decoder level: ``num_layers`` ResnetBlocks, then an Upsample (except at the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups) for i in range(num_layers)]
        )
        self.upsample = Upsample(out_channels) if upsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsample(x)


# --- encoder, posterior, decoder -----------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> moments (B, 2 * latent_channels, H / f, W / f) (Chapter 02, section "Encoder and decoder").

    The output holds the mean and the log-variance of the latent's distribution, stacked
    along the channels; ``DiagonalGaussian`` splits them.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, out_channels in enumerate(channels):
            in_channels = channels[max(i - 1, 0)]
            self.down_blocks.append(
                DownBlock(in_channels, out_channels, config.layers_per_block, groups, downsample=i < len(channels) - 1)
            )
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, 128, H, W) for SD
        for block in self.down_blocks:
            h = block(h)  # SD: (B, 128, H/2, W/2), (B, 256, H/4, W/4), (B, 512, H/8, W/8), (B, 512, H/8, W/8)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 8, H/8, W/8): mean and log-variance


class DiagonalGaussian:
    """The posterior q(z | x) = N(mean, diag(std^2)) that the encoder predicts.

    Chapter 02, section "Autoencoders, plain and variational".

    ``sample`` draws z = mean + std * eps with eps ~ N(0, I): the randomness sits in eps, so
    gradients flow to mean and std (the reparameterisation trick). The log-variance is
    clamped to [-30, 20] as in LDM and diffusers, keeping exp() finite.
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # each (B, latent_channels, h, w)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the posterior; eps comes from ``torch.randn`` with ``generator`` exactly as in diffusers.

        A CPU generator draws on the CPU and the noise moves to the latents' device, so a
        seed gives the same latents on every machine.
        """
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        """The most likely latent, the mean: what you encode with when you want no randomness."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z | x) || N(0, I)) per sample, shape (B,), summed over every latent entry.

        Closed form for Gaussians: 0.5 * sum(mean^2 + var - 1 - log var).
        """
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=(1, 2, 3))


class Decoder(nn.Module):
    """Latent (B, latent_channels, h, w) -> image (B, 3, h * f, w * f): the encoder's mirror image.

    Each level has one ResnetBlock more than the encoder's (``layers_per_block + 1``): the
    decoder does the harder job, inventing the detail the latent left out.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = nn.Conv2d(config.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention)
        self.up_blocks = nn.ModuleList()
        for i, out_channels in enumerate(channels):
            in_channels = channels[max(i - 1, 0)]
            self.up_blocks.append(
                UpBlock(in_channels, out_channels, config.layers_per_block + 1, groups, upsample=i < len(channels) - 1)
            )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, 512, h, w) for SD
        for block in self.up_blocks:
            h = block(h)  # SD: (B, 512, 2h, 2w), (B, 512, 4h, 4w), (B, 256, 8h, 8w), (B, 128, 8h, 8w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, 8h, 8w)


# --- the autoencoder -----------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE: ``encode`` images in [-1, 1] to a posterior, ``decode`` latents to images.

    ``quant_conv`` and ``post_quant_conv`` are 1x1 convs on either side of the latent, kept
    from LDM's VQ models so that the pretrained weights load. The U-Net works on
    ``posterior.sample() * vae.scaling_factor``; undo the scaling before ``decode``.
    """

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quant_conv = nn.Conv2d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self._warned_fp16_overflow = False

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """(B, in_channels, H, W) images in [-1, 1], H and W multiples of f -> the posterior over (B, 4, H/f, W/f)."""
        self._check_input(x, "x", self.config.in_channels, "images in [-1, 1]")
        if x.numel() and not x.is_meta and x.abs().max() > 10:  # far outside [-1, 1]: 8-bit pixel values, most likely
            warnings.warn(f"x spans {x.min().item():.4g} to {x.max().item():.4g}, but the VAE takes images in [-1, 1]; "
                          "map 8-bit pixels with x / 127.5 - 1 (or [0, 1] images with 2 * x - 1).", stacklevel=2)
        f = self.config.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            H, W = x.shape[-2:]
            raise ValueError(
                f"image size {H}x{W} is not a multiple of {f}, this VAE's downsampling factor; "
                f"resize or crop to e.g. {max(f, H // f * f)}x{max(f, W // f * f)}."
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))  # moments (B, 2 * latent_channels, H/f, W/f)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, latent_channels, h, w), already divided by ``scaling_factor`` -> images (B, 3, h*f, w*f).

        The output is roughly in [-1, 1] and not clamped. In float16, SD's decoder can overflow
        (activations past 65,504 become inf, then NaN, then a black image); when the output is
        not finite we warn once and decode again with float32 weights, returning float16.
        """
        self._check_input(z, "z", self.config.latent_channels, "latents")
        image = self.decoder(self.post_quant_conv(z))
        if image.dtype == torch.float16 and not torch.isfinite(image).all():
            if not self._warned_fp16_overflow:
                warnings.warn("the float16 VAE decode overflowed (inf/NaN); decoding again in float32.", stacklevel=2)
                self._warned_fp16_overflow = True
            image = self._decode_in_float32(z).to(z.dtype)
        return image

    def _decode_in_float32(self, z: torch.Tensor) -> torch.Tensor:
        """The decode with float32 copies of the weights; the model itself stays in its dtype."""
        def float32_weights(module):
            return {name: p.float() for name, p in module.named_parameters()}

        z = torch.func.functional_call(self.post_quant_conv, float32_weights(self.post_quant_conv), (z.float(),))
        return torch.func.functional_call(self.decoder, float32_weights(self.decoder), (z,))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True, generator: torch.Generator | None = None):
        """Encode and decode, for training: returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _check_input(self, tensor: torch.Tensor, name: str, channels: int, what: str):
        """A clear error, naming the fix, for a tensor ``encode`` or ``decode`` cannot take."""
        check_tensor(tensor, name, finite=False)
        if tensor.ndim != 4 or tensor.shape[1] != channels:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but this VAE takes {what} of shape "
                f"(B, {channels}, H, W); add a batch dimension with {name}[None] or fix the channel count."
            )
        weight = self.post_quant_conv.weight
        if tensor.dtype != weight.dtype or tensor.device != weight.device:
            raise ValueError(
                f"{name} is {tensor.dtype} on {tensor.device} but the VAE's weights are {weight.dtype} on "
                f"{weight.device}; pass {name}.to(device={str(weight.device)!r}, dtype={weight.dtype})."
            )


# --- training losses (Chapter 02, section "Training the VAE") ------------------------------
# LDM trains its autoencoders with four terms: reconstruction, perceptual (LPIPS), KL and
# adversarial. LPIPS (ldm_teach.perceptual) needs VGG16's ImageNet weights, a download: the
# chapter uses it in the full profile and leaves it out in the quick one.


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN, as LDM uses it: one real/fake logit per overlapping image patch.

    Judging patches rather than whole images pushes the decoder towards sharp local texture,
    which pixel losses alone blur. Output (B, 1, H / 2^num_layers - 2, W / 2^num_layers - 2).
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers + 1):
            stride = 2 if i < num_layers else 1  # the last layer keeps the resolution (minus the 4x4 kernel's edge)
            new_width = channels * min(2**i, 8)
            layers += [nn.Conv2d(width, new_width, 4, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(new_width), nn.LeakyReLU(0.2)]
            width = new_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        for module in self.modules():  # DCGAN's initialisation, as in LDM
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.normal_(module.weight, 1.0, 0.02)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # (B, 1, H / 2^num_layers - 2, W / 2^num_layers - 2)


def reconstruction_loss(x: torch.Tensor, reconstruction: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """|x - x̂| (``"l1"``, LDM's choice) or (x - x̂)^2 (``"l2"``), summed per image and averaged over the batch.

    Summing per image, as LDM does, keeps LDM's small ``kl_weight`` (1e-6) meaningful.
    """
    if kind == "l1":
        error = (x - reconstruction).abs()
    elif kind == "l2":
        error = (x - reconstruction) ** 2
    else:
        raise ValueError(f"kind={kind!r} is not a reconstruction loss; use 'l1' or 'l2'.")
    return error.sum(dim=(1, 2, 3)).mean()


def kl_loss(posterior: DiagonalGaussian) -> torch.Tensor:
    """The KL term: each image's KL to N(0, I), averaged over the batch."""
    return posterior.kl().mean()


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_adversarial_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The decoder's adversarial loss: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(reconstruction: torch.Tensor, adversarial: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """LDM's balance of the two decoder losses: ||grad reconstruction|| / ||grad adversarial|| at the last layer.

    Measured on the decoder's last weights (``vae.decoder.conv_out.weight``), it scales the
    adversarial loss so that neither term's gradient swamps the other's. Detached: a
    weight, not something to optimise.
    """
    reconstruction_grad, = torch.autograd.grad(reconstruction, last_layer, retain_graph=True)
    adversarial_grad, = torch.autograd.grad(adversarial, last_layer, retain_graph=True)
    weight = reconstruction_grad.norm() / (adversarial_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


def vae_loss(x: torch.Tensor, reconstruction: torch.Tensor, posterior: DiagonalGaussian,
             logits_fake: torch.Tensor | None = None, last_layer: torch.Tensor | None = None,
             kl_weight: float = 1e-6, adversarial_weight: float = 0.5, kind: str = "l1",
             perceptual: torch.nn.Module | None = None, perceptual_weight: float = 1.0):
    """The autoencoder's loss: reconstruction + kl_weight * KL (+ the adaptively weighted adversarial term).

    With ``perceptual`` (an ``ldm_teach.perceptual.LPIPS``), the reconstruction term gains
    ``perceptual_weight`` times each image's LPIPS distance added to every one of its values, as
    LDM adds it before summing per image. Pass the discriminator's ``logits_fake`` on the
    reconstructions and the decoder's ``last_layer`` once the adversarial phase starts (LDM
    starts it after a warm-up). Returns (total, a dict of the detached parts for logging).
    """
    rec = reconstruction_loss(x, reconstruction, kind)
    parts = {}
    if perceptual is not None:
        distance = perceptual(x, reconstruction)  # (B,)
        rec = rec + perceptual_weight * x[0].numel() * distance.mean()
        parts["perceptual"] = distance.mean().detach()
    kl = kl_loss(posterior)
    total = rec + kl_weight * kl
    parts.update(reconstruction=rec.detach(), kl=kl.detach())
    if logits_fake is not None:
        if last_layer is None:
            raise ValueError("the adversarial term needs last_layer, e.g. vae.decoder.conv_out.weight.")
        adversarial = generator_adversarial_loss(logits_fake)
        weight = adversarial_weight * adaptive_weight(rec, adversarial, last_layer)
        total = total + weight * adversarial
        parts.update(adversarial=adversarial.detach(), adaptive_weight=weight)
    return total, parts
