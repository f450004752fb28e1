"""LoRA: low-rank adapters on a frozen model's linear layers (Hu et al., 2021; chapter 09).

A fine-tune changes a weight matrix W (out, in) by some ΔW. LoRA bets that the useful ΔW has low
rank, and learns it as a product: ΔW = (alpha / r) · B A, with A (r, in) and B (out, r), r much
smaller than in and out. W stays frozen; only A and B train, so an adapter for SD 1.5's attention
layers weighs a few megabytes where the U-Net weighs gigabytes. B starts at zero, so a fresh adapter
leaves the model exactly as it was. After training the product can be added into W once ("merged"):
the model then runs at its old speed, with the adapter baked in.

``LoRALinear`` *is* an ``nn.Linear`` that shares the frozen layer's weight and bias, so the model's
state dict keeps its old names (``...attn2.to_q.weight``) and only gains ``lora_A``/``lora_B``.
The readers of the LoRA and textual-inversion files people share live in ``lora_files.py`` and are
re-exported here.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .checks import as_float, as_int

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out")  # the U-Net's attention projections (self and cross)
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")  # the text encoder's attention projections


class LoRALinear(nn.Linear):
    """y = W x + b + scale · (alpha / r) · B(A(x)), with W and b the frozen layer's own tensors."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, scale: float = 1.0):
        rank = as_int(rank, "rank", minimum=1)
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # shared, not copied: (out, in) and (out,)
        self.rank = rank
        self.alpha = float(rank) if alpha is None else as_float(alpha, "alpha")
        self.scale = as_float(scale, "scale")
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)  # down: in -> r
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)  # up: r -> out
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear (and PEFT) start A
        nn.init.zeros_(self.lora_B.weight)  # B = 0: the adapter starts as the identity change

    def delta_weight(self) -> torch.Tensor:
        """ΔW = scale · (alpha / r) · B A, shape (out, in): what merging adds to W."""
        return self.scale * (self.alpha / self.rank) * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low_rank = self.lora_B(self.lora_A(x))  # (..., in) -> (..., r) -> (..., out)
        return super().forward(x) + self.scale * (self.alpha / self.rank) * low_rank

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` whose weight is W + ΔW: the adapter baked in, no extra cost per call."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer.requires_grad_(self.weight.requires_grad)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


def linear_layers(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[nn.Module, str, nn.Linear]]:
    """Every (parent, name, layer) whose layer is an ``nn.Linear`` called one of ``targets``."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if name in targets and isinstance(child, nn.Linear):
                found.append((parent, name, child))
    return found


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: tuple[str, ...] = UNET_TARGETS,
             scale: float = 1.0) -> list[LoRALinear]:
    """Put a fresh rank-``rank`` adapter on each linear layer named in ``targets``; freeze everything else.

    Returns the adapters; their ``lora_A``/``lora_B`` are the only parameters left trainable."""
    rank = as_int(rank, "rank", minimum=1)
    layers = linear_layers(model, targets)
    if not layers:
        raise ValueError(f"no nn.Linear named one of {targets} in {type(model).__name__}; the U-Net's attention "
                         f"layers are {UNET_TARGETS}, the text encoder's {TEXT_ENCODER_TARGETS}.")
    if any(isinstance(layer, LoRALinear) for _, _, layer in layers):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; merge_lora or remove_lora them first.")
    model.requires_grad_(False)
    adapters = []
    for parent, name, layer in layers:
        adapter = LoRALinear(layer, rank, alpha, scale)
        setattr(parent, name, adapter)
        adapters.append(adapter)
    return adapters


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' A and B matrices: what an optimizer should train."""
    return [p for module in model.modules() if isinstance(module, LoRALinear)
            for p in (module.lora_A.weight, module.lora_B.weight)]


def _replace_adapters(model: nn.Module, make) -> int:
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, make(child))
                count += 1
    return count


def merge_lora(model: nn.Module) -> int:
    """Bake every adapter into its layer (W <- W + ΔW) and drop A and B; returns how many were merged."""
    return _replace_adapters(model, LoRALinear.merged)


def remove_lora(model: nn.Module) -> int:
    """Drop every adapter, giving back the original layers unchanged; returns how many were removed."""
    def original(adapter: LoRALinear) -> nn.Linear:
        layer = nn.Linear(adapter.in_features, adapter.out_features, bias=adapter.bias is not None, device="meta")
        layer.weight, layer.bias = adapter.weight, adapter.bias
        return layer
    return _replace_adapters(model, original)



FILE_READERS = ("read_lora_file", "load_lora_into", "read_embedding_file", "add_embedding", "expand_multi_vector")


def __getattr__(name: str):
    """``lora.read_lora_file`` and the other readers of shared files, which live in ``lora_files.py``; they build
    on ``LoRALinear``, so they are imported on first use."""
    if name in FILE_READERS:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.lora_files"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
