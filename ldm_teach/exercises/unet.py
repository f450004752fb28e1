"""Checkers for chapter 04's exercises: the timestep embedding, cross-attention, a ResBlock's forward pass."""
from __future__ import annotations

import math
from typing import Callable

import torch

from .base import CheckResult, compare


def reference_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """SD's sinusoidal features in float64: cos(t f_i) for i < dim/2, then sin(t f_i), f_i = 10000^(-i/(dim/2))."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)  # (half,)
    angles = t[:, None].double() * frequencies[None, :]  # (B, half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)  # (B, dim)


def check_timestep_embedding(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 04): ``timestep_embedding(t, dim)`` -> (B, dim), SD's sinusoidal features
    (cosines first, frequencies exp(-ln(10000) i / (dim/2)) for i = 0 .. dim/2 - 1)."""
    from ..unet import timestep_embedding

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
    # float32 angles t·f_i up to 999 carry rounding errors of about 1e-4 rad
    return compare("timestep_embedding", learner, reference_timestep_embedding, cases, mistakes, rtol=0, atol=5e-4,
                   shape_hint="return (B, dim): dim/2 cosines followed by dim/2 sines for each step.", seed=seed)


def _attention_variant(scale_dim=None, softmax_dim=-1, split_heads=True, merge_transposed=True):
    """Cross-attention written out with one of the common mistakes."""
    def attend(x, context, attention):
        B, N, _ = x.shape
        heads, head_dim = (attention.heads, attention.head_dim) if split_heads else (1, attention.heads * attention.head_dim)
        with torch.no_grad():
            q = attention.to_q(x).view(B, N, heads, head_dim).transpose(1, 2)  # (B, heads, N, d)
            k = attention.to_k(context).view(B, context.shape[1], heads, head_dim).transpose(1, 2)  # (B, heads, L, d)
            v = attention.to_v(context).view(B, context.shape[1], heads, head_dim).transpose(1, 2)
            scale = (scale_dim(attention) if callable(scale_dim) else scale_dim or head_dim) ** 0.5
            out = (q @ k.transpose(-1, -2) / scale).softmax(dim=softmax_dim) @ v  # (B, heads, N, d)
            out = out.transpose(1, 2) if merge_transposed else out
            return attention.to_out(out.reshape(B, N, heads * head_dim))  # (B, N, C)
    return attend


def check_cross_attention(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 04): ``cross_attention(x, context, attention)``, what the package's
    ``Attention`` layer ``attention`` computes for image tokens x (B, N, C) and text tokens context
    (B, L, D), written with its weights (to_q, to_k, to_v, to_out) and its heads and head_dim;
    gradients on x, context and the layer's weights are compared too."""
    from ..unet import Attention

    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, tokens, length, query_dim, context_dim, heads in [(2, 16, 7, 32, 24, 4), (1, 9, 77, 16, 16, 2),
                                                                 (3, 4, 3, 8, 12, 1)]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        attention = Attention(query_dim, heads, query_dim // heads, context_dim=context_dim).eval()
        cases.append(dict(x=torch.randn(batch, tokens, query_dim, generator=generator),
                          context=torch.randn(batch, length, context_dim, generator=generator),
                          attention=attention))

    def reference(x, context, attention):
        return attention(x, context)

    mistakes = {
        "no 1/√d scaling of the scores": _attention_variant(scale_dim=1),
        "the scores divided by d instead of √d": _attention_variant(scale_dim=lambda attention: attention.head_dim**2),
        "the scores scaled by 1/√(heads·head_dim) instead of 1/√head_dim":
            _attention_variant(scale_dim=lambda attention: attention.heads * attention.head_dim),
        "the softmax taken over the image tokens (dim -2) instead of over the text tokens (dim -1)":
            _attention_variant(softmax_dim=-2),
        "the heads merged without the transpose: (B, heads, N, d) must become (B, N, heads, d) before the reshape":
            _attention_variant(merge_transposed=False),
        "one head of heads·head_dim channels instead of `heads` heads of head_dim": _attention_variant(split_heads=False),
    }
    return compare("cross_attention", learner, reference, cases, mistakes, gradients=("x", "context", "attention"),
                   rtol=1e-5, atol=1e-5, seed=seed)


def _resblock_variant(time_silu=True, time_after_conv2=False, skip=True):
    """A ResBlock's forward pass with one of the common mistakes."""
    import torch.nn.functional as F

    def forward(block, x, time_emb):
        with torch.no_grad():
            time = block.time_emb_proj(F.silu(time_emb) if time_silu else time_emb)[:, :, None, None]  # (B, C, 1, 1)
            h = block.conv1(F.silu(block.norm1(x)))
            h = h if time_after_conv2 else h + time
            h = block.conv2(F.silu(block.norm2(h)))
            h = h + time if time_after_conv2 else h
            if not skip:
                return h
            return h + (x if block.conv_shortcut is None else block.conv_shortcut(x))
    return forward


def check_resblock_forward(learner: Callable, seed: int = 0) -> CheckResult:
    """Exercise (chapter 04): ``resblock_forward(block, x, time_emb)``, what the package's ``ResBlock``
    ``block`` computes, written with its layers (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut);
    gradients on x, time_emb and the block's weights are compared too."""
    from ..unet import ResBlock

    generator = torch.Generator().manual_seed(seed)
    cases = []
    for batch, in_channels, out_channels, side, time_dim in [(2, 8, 16, 6, 32), (1, 16, 16, 5, 24), (3, 8, 8, 4, 16)]:
        torch.manual_seed(int(torch.randint(0, 2**31, (), generator=generator)))
        block = ResBlock(in_channels, out_channels, time_dim, groups=4, eps=1e-5).eval()
        with torch.no_grad():  # make the norms' affine parameters matter
            for name, parameter in block.named_parameters():
                if "norm" in name:
                    parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
        cases.append(dict(block=block, x=torch.randn(batch, in_channels, side, side, generator=generator),
                          time_emb=torch.randn(batch, time_dim, generator=generator)))

    def reference(block, x, time_emb):
        return block(x, time_emb)

    mistakes = {
        "no SiLU on the time embedding before time_emb_proj": _resblock_variant(time_silu=False),
        "the time embedding added after the second conv instead of after the first": _resblock_variant(time_after_conv2=True),
        "the skip connection left out (return skip + h)": _resblock_variant(skip=False),
    }
    return compare("resblock_forward", learner, reference, cases, mistakes, gradients=("x", "time_emb", "block"),
                   rtol=1e-5, atol=1e-5,
                   shape_hint="the result has the block's output channels: add the skip, through conv_shortcut "
                              "when the channel count changes.", seed=seed)
