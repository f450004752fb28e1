"""Diagrams of the model's data flow, with tensor shapes measured from the models themselves.

Each function draws one figure the chapters show: the text-to-image loop with guidance (chapters 00
and 06), the forward and reverse chains (01), CLIP's two towers (03), the U-Net and its
cross-attention (04) and the training step (05). No shape is typed in: the functions run the
book's own models on PyTorch's ``meta`` device (shapes without memory or arithmetic) and label the
arrows with what came out, so a diagram of a tiny configuration shows the tiny shapes.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

from .clip import TextEncoder, TextEncoderConfig
from .unet import UNet, UNetConfig
from .vae import AutoencoderKL, VAEConfig

COLORS = {"data": "#eeeeee", "text": "#dbe9f6", "model": "#fde2c8", "schedule": "#e3f1dc", "guide": "#f3dcef",
          "loss": "#f8d7d3"}


def shape(tensor_or_shape) -> str:
    """A shape as the code prints it: ``(1, 4, 64, 64)``."""
    return str(tuple(getattr(tensor_or_shape, "shape", tensor_or_shape)))


def box(ax, x, y, text, kind="model", width=2.2, height=0.8, fontsize=9.5, **style):
    """A rounded box centred at (x, y), coloured by what it is (data, text, model, schedule, guide, loss)."""
    style = {"facecolor": COLORS[kind], "edgecolor": "0.3", "linewidth": 1.1, **style}
    ax.add_patch(FancyBboxPatch((x - width / 2, y - height / 2), width, height, boxstyle="round,pad=0.04", **style))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)


def arrow(ax, start, end, label=None, offset=(0.0, 0.2), fontsize=8, color="0.25", **style):
    """An arrow from ``start`` to ``end``, with an optional label (a tensor shape) beside its middle."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color=color, linewidth=1.1,
                                 shrinkA=0, shrinkB=0, **style))
    if label:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], label, ha="center",
                va="center", fontsize=fontsize, color="0.15")


def canvas(width: float, height: float, figsize: tuple[float, float]):
    fig, ax = plt.subplots(figsize=figsize)
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    return fig, ax


def meta_models(unet_config: UNetConfig, vae_config: VAEConfig, text_config: TextEncoderConfig):
    """The three models built on the meta device: every shape, no memory."""
    with torch.device("meta"):
        return UNet(unet_config), AutoencoderKL(vae_config), TextEncoder(text_config)


# --- text to image, with guidance (chapters 00 and 06) ---------------------------------------


def text_to_image(unet_config: UNetConfig | None = None, vae_config: VAEConfig | None = None,
                  text_config: TextEncoderConfig | None = None, height: int = 512, width: int = 512,
                  num_inference_steps: int = 50, guidance_scale: float = 7.5):
    """The sampling loop of ``pipeline.StableDiffusion`` for one prompt, shapes from a meta-device run.

    The prompt and the empty (or negative) prompt are encoded once; at every step the latent is
    doubled, the U-Net predicts both noises in one call, guidance mixes them, and the scheduler
    steps; at the end the latent is divided by the VAE's scaling factor and decoded. SD 1.5's
    configurations by default.
    """
    unet, vae, text_encoder = meta_models(unet_config or UNetConfig.sd15(), vae_config or VAEConfig.sd(),
                                          text_config or TextEncoderConfig.sd15())
    f = vae.config.downsample_factor
    ids = torch.zeros(2, text_encoder.config.max_position_embeddings, dtype=torch.long, device="meta")
    context = text_encoder(ids)  # (2, 77, D)
    latents = torch.zeros(1, unet.config.in_channels, height // f, width // f, device="meta")
    noise = unet(torch.cat([latents] * 2), 999, context)  # (2, 4, h, w)
    image = vae.decode(latents)  # (1, 3, H, W)

    fig, ax = canvas(15, 8.0, (14, 7.4))
    box(ax, 1.3, 7.2, '"a red circle"', "data", width=2.0)
    box(ax, 1.3, 5.8, '"" (or the\nnegative prompt)', "data", width=2.0, height=0.9)
    for y in (7.2, 5.8):
        box(ax, 4.0, y, "tokenizer", "text", width=1.7)
        box(ax, 7.0, y, "CLIP text encoder", "text", width=2.3)
        arrow(ax, (2.3, y), (3.15, y))
        arrow(ax, (4.85, y), (5.85, y), shape(ids[:1]))
    box(ax, 10.2, 6.5, "concatenate\n[uncond, text]", "guide", width=2.0, height=0.9)
    arrow(ax, (8.15, 7.2), (9.2, 6.7), shape(context[:1]), offset=(0, 0.3))
    arrow(ax, (8.15, 5.8), (9.2, 6.3), shape(context[:1]), offset=(0, -0.3))

    # the loop, drawn inside a frame
    ax.add_patch(Rectangle((2.6, 1.75), 12.25, 3.4, facecolor="none", edgecolor="0.55", linestyle="--", linewidth=1))
    ax.text(2.75, 4.9, f"repeated for each of the {num_inference_steps} timesteps t (the scheduler's list)",
            fontsize=8.5, color="0.35", ha="left")
    box(ax, 1.3, 3.6, "noise $z_T$\n(generator)", "data", width=2.0, height=0.9)
    box(ax, 4.3, 3.6, "duplicate\n$[z_t, z_t]$", "guide", width=1.8, height=0.9)
    box(ax, 7.3, 3.6, "U-Net\n$\\epsilon_\\theta(z, t, c)$", "model", width=2.0, height=0.9)
    box(ax, 10.2, 3.6, "guidance\n$\\hat\\epsilon_u + s(\\hat\\epsilon_c - \\hat\\epsilon_u)$", "guide",
        width=2.4, height=0.9)
    box(ax, 13.6, 3.6, "scheduler.step", "schedule", width=2.0)
    arrow(ax, (2.3, 3.6), (3.4, 3.6), shape(latents))
    arrow(ax, (5.2, 3.6), (6.3, 3.6), shape(noise))
    arrow(ax, (10.2, 6.05), (7.8, 4.05), shape(context), offset=(0.9, 0.45))
    arrow(ax, (8.3, 3.6), (9.0, 3.6), shape(noise), offset=(0, 0.35), fontsize=7.5)
    arrow(ax, (11.4, 3.6), (12.6, 3.6), shape(latents), offset=(0, 0.35), fontsize=7.5)
    arrow(ax, (13.6, 3.2), (4.3, 3.15), connectionstyle="arc3,rad=-0.22")
    ax.text(8.9, 2.25, "$z_{t-1}$: the next step's input", ha="center", fontsize=8.5, color="0.15")
    ax.text(10.2, 4.3, f"s = {guidance_scale:g}", fontsize=8.5, ha="center", color="0.3")
    arrow(ax, (6.0, 4.65), (6.6, 4.05), "t", offset=(-0.4, 0.2))

    # after the loop: undo the scaling, decode
    box(ax, 13.6, 0.7, f"÷ scaling factor\n{vae.scaling_factor:g}", "schedule", width=2.0, height=0.8)
    box(ax, 10.2, 0.7, "VAE decoder", "model", width=1.8, height=0.7)
    box(ax, 7.0, 0.7, "image", "data", width=1.4, height=0.7)
    arrow(ax, (13.6, 3.2), (13.6, 1.1), f"$z_0$ {shape(latents)}", offset=(-0.95, 0))
    arrow(ax, (12.6, 0.7), (11.1, 0.7))
    arrow(ax, (9.3, 0.7), (7.7, 0.7), shape(image), offset=(0, 0.22))
    fig.tight_layout()
    return fig


# --- the forward and reverse chains (chapter 01) ---------------------------------------------


def diffusion_chain(images: list[torch.Tensor], timesteps: list[int | str]):
    """A row of x_t images with the forward q arrows above and the learned reverse p_θ arrows below
    (the DDPM paper's Figure 2, on the book's own noised photo). Images (3, H, W) in [-1, 1];
    ``timesteps`` label them, in the maths' numbering (x_0 clean, x_T = x_1000 noise)."""
    from .viz import to_numpy_image

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(2.1 * n, 2.9))
    for index, (ax, image, t) in enumerate(zip(axes, images, timesteps)):
        ax.imshow(to_numpy_image(image))
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"$x_{{{t}}}$", fontsize=11)
        if index + 1 < n:
            kwargs = dict(xycoords="axes fraction", textcoords="axes fraction", annotation_clip=False)
            ax.annotate("", (1.32, 1.18), (0.96, 1.18), arrowprops=dict(arrowstyle="-|>", color="C3"), **kwargs)
            ax.annotate("", (0.96, -0.14), (1.32, -0.14), arrowprops=dict(arrowstyle="-|>", color="C0"), **kwargs)
    fig.text(0.5, 0.965, "forward process $q(x_t \\mid x_{t-1})$: fixed, adds Gaussian noise →", ha="center",
             color="C3", fontsize=10)
    fig.text(0.5, 0.02, "← reverse process $p_\\theta(x_{t-1} \\mid x_t)$: learned, removes it step by step",
             ha="center", color="C0", fontsize=10)
    fig.subplots_adjust(top=0.78, bottom=0.16, wspace=0.45)
    return fig


# --- CLIP's two towers (chapter 03) ----------------------------------------------------------


def clip_towers(captions: list[str], similarities: torch.Tensor | None = None):
    """Captions through the text tower, images through the image tower, and the N x N table of
    their cosine similarities, the matching pairs on the diagonal (CLIP paper, Figure 1).
    ``similarities`` (N, N) colours the table with a trained model's values."""
    n = len(captions)
    gx, gy = 4.4, 1.2 + 0.32 * n  # the table's lower-left corner, above the captions' list
    fig, ax = canvas(gx + n + 0.4, gy + n + 1.9, (3.0 + 0.75 * n, 2.0 + 0.95 * n))
    box(ax, 1.2, gy + n + 1.35, f"{n} images", "data", width=1.8)
    box(ax, gx + n / 2, gy + n + 1.35, "image encoder", "model", width=2.4)
    arrow(ax, (2.1, gy + n + 1.35), (gx + n / 2 - 1.2, gy + n + 1.35))
    arrow(ax, (gx + n / 2, gy + n + 0.95), (gx + n / 2, gy + n + 0.5))
    box(ax, 0.95, gy + n / 2, f"{n}\ncaptions", "data", width=1.3, height=1.0)
    box(ax, 2.75, gy + n / 2, "text\nencoder", "text", width=1.3, height=1.0)
    arrow(ax, (1.6, gy + n / 2), (2.1, gy + n / 2))
    arrow(ax, (3.4, gy + n / 2), (gx - 0.45, gy + n / 2))
    for i in range(n):
        ax.text(gx - 0.12, gy + n - i - 0.5, f"$T_{i + 1}$", ha="right", va="center", fontsize=9)
        ax.text(gx + i + 0.5, gy + n + 0.22, f"$I_{i + 1}$", ha="center", va="center", fontsize=9)
        for j in range(n):
            value = None if similarities is None else float(similarities[i, j])
            color = ("#c7dcef" if i == j else "white") if value is None else plt.cm.viridis((value + 1) / 2)
            ax.add_patch(Rectangle((gx + j, gy + n - 1 - i), 1, 1, facecolor=color, edgecolor="0.4"))
            label = f"{value:.2f}" if value is not None else f"$I_{j + 1}\\!\\cdot\\!T_{i + 1}$"
            ax.text(gx + j + 0.5, gy + n - 0.5 - i, label, ha="center", va="center", fontsize=7.5,
                    color="white" if value is not None and value < 0.2 else "black")
    ax.text(gx + n / 2, gy - 0.12, "$I$, $T$: unit vectors; the diagonal holds the matching pairs;\n"
            "the loss is a cross-entropy along every row and every column", ha="center", va="top", fontsize=8)
    for i, caption in enumerate(captions):
        ax.text(0.3, gy - 0.95 - 0.32 * i, f"$T_{i + 1}$: {caption}", fontsize=7.5, color="0.3", va="top")
    return fig


# --- the U-Net and its cross-attention (chapter 04) ------------------------------------------


def unet_shapes(unet: UNet, latent_size: int, context_length: int) -> dict:
    """Run ``unet`` (on the meta device) once and record what each stage outputs, skips included."""
    record = {}
    hooks = [unet.conv_in.register_forward_hook(lambda m, i, o: record.__setitem__("conv_in", o.shape)),
             unet.time_embedding.register_forward_hook(lambda m, i, o: record.__setitem__("time", o.shape)),
             unet.mid_block.register_forward_hook(lambda m, i, o: record.__setitem__("mid", o.shape))]
    for level, block in enumerate(unet.down_blocks):
        hooks.append(block.register_forward_hook(
            lambda m, i, o, level=level: record.__setitem__(("down", level), (o[0].shape, [s.shape for s in o[1]]))))
    for level, block in enumerate(unet.up_blocks):
        hooks.append(block.register_forward_hook(lambda m, i, o, level=level: record.__setitem__(("up", level), o.shape)))
    x = torch.zeros(1, unet.config.in_channels, latent_size, latent_size, device="meta")
    context = torch.zeros(1, context_length, unet.config.cross_attention_dim, device="meta")
    record["x"], record["context"] = x.shape, context.shape
    added = None
    if unet.config.addition_embed_type == "text_time":  # SDXL: zeros of the right shapes for the added embedding
        numbers = 6  # the base's size numbers; only the total width matters for the shapes
        pooled = unet.config.projection_class_embeddings_input_dim - numbers * unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.zeros(1, pooled, device="meta"), "time_ids": torch.zeros(1, numbers, device="meta")}
    record["out"] = unet(x, 999, context, added_cond_kwargs=added).shape
    for hook in hooks:
        hook.remove()
    return record


def unet(config: UNetConfig | None = None, latent_size: int = 64, context_length: int = 77):
    """The U-Net's levels with their resolutions and widths, the skips between the two paths, and
    where the timestep and the text enter; SD 1.5's configuration by default."""
    with torch.device("meta"):
        model = UNet(config or UNetConfig.sd15())
    config, record = model.config, unet_shapes(model, latent_size, context_length)
    levels = len(config.block_out_channels)
    depths = config.per_level("transformer_layers_per_block")

    def transformers(level):  # " + transformer" for SD 1.5's one block, " + 10× transformer" for SDXL's ten
        return " + transformer" if depths[level] == 1 else f" + {depths[level]}× transformer"

    skips = [record["conv_in"]] + [s for level in range(levels) for s in record[("down", level)][1]]
    fig, ax = canvas(16, 3.2 + 1.45 * (levels + 1), (13.5, 2.0 + 1.2 * (levels + 1)))
    top = 1.4 + 1.45 * levels

    def y(level):
        return top - 1.45 * level

    box(ax, 4.3, top + 1.35, "noisy latent $z_t$", "data", width=2.2)
    box(ax, 11.7, top + 1.35, "predicted noise", "data", width=2.2)
    arrow(ax, (4.3, top + 0.95), (4.3, y(0) + 0.35), shape(record["x"]), offset=(-1.1, 0))
    arrow(ax, (11.7, y(0) + 0.35), (11.7, top + 0.95), shape(record["out"]), offset=(1.1, 0))
    added = " + embedding of pooled prompt & sizes" if config.addition_embed_type == "text_time" else ""
    ax.text(8.0, top + 1.55, f"timestep t → sinusoids → MLP{added}\n{shape(record['time'])}, added in every ResBlock",
            ha="center", va="center", fontsize=8.5, color="C3")
    ax.text(8.0, top + 0.8, f"text context {shape(record['context'])}:\nkeys and values of every cross-attention",
            ha="center", va="center", fontsize=8.5, color="C0")
    for level in range(levels):
        out, level_skips = record[("down", level)]
        H, W = level_skips[0][-2:]
        attends = config.down_block_types[level] == "CrossAttnDownBlock2D"
        text = (f"{H}×{W}, {config.block_out_channels[level]} ch: {config.layers_per_block}× ResBlock"
                f"{transformers(level) if attends else ''}" + (" → down" if level < levels - 1 else ""))
        box(ax, 4.3, y(level), text, "model" if attends else "schedule", width=4.6, height=0.7, fontsize=8.5)
        up_level = levels - 1 - level
        up_attends = config.up_block_types[up_level] == "CrossAttnUpBlock2D"
        text = (f"{config.layers_per_block + 1}× ResBlock{transformers(level) if up_attends else ''}"
                + (" → up" if level > 0 else "") + f", {tuple(record[('up', up_level)])[1]} ch")
        box(ax, 11.7, y(level), text, "model" if up_attends else "schedule", width=4.6, height=0.7, fontsize=8.5)
        at_this_size = [s for s in skips if tuple(s[-2:]) == (H, W)]
        widths = ", ".join(str(s[1]) for s in at_this_size)
        arrow(ax, (6.6, y(level)), (9.4, y(level)), f"{len(at_this_size)} skips at {H}×{W}: {widths} ch",
              offset=(0, 0.2), fontsize=7.5, linestyle=(0, (4, 2)))
        if level < levels - 1:
            arrow(ax, (4.3, y(level) - 0.35), (4.3, y(level + 1) + 0.35), shape(out), offset=(-1.2, 0))
            arrow(ax, (11.7, y(level + 1) + 0.35), (11.7, y(level) - 0.35),
                  shape(record[("up", levels - 2 - level)]), offset=(1.3, 0))
    box(ax, 8.0, y(levels), f"middle: ResBlock{transformers(levels - 1)} + ResBlock, {shape(record['mid'])}", "model",
        width=5.6, height=0.7, fontsize=8.5)
    arrow(ax, (4.3, y(levels - 1) - 0.35), (5.6, y(levels)), shape(record[("down", levels - 1)][0]),
          offset=(-1.1, -0.1))
    arrow(ax, (10.4, y(levels)), (11.7, y(levels - 1) - 0.35), shape(record["mid"]), offset=(1.1, -0.1))
    ax.text(8.0, 0.25, "orange: levels with transformers (self- and cross-attention); green: ResBlocks only",
            ha="center", fontsize=8, color="0.35")
    fig.tight_layout()
    return fig


def cross_attention(config: UNetConfig | None = None, level: int = 0, latent_size: int = 64,
                    context_length: int = 77):
    """One cross-attention layer at a down-path ``level``: queries from the image's pixels, keys and
    values from the text's tokens, and the (pixels x tokens) table of weights between them."""
    with torch.device("meta"):
        model = UNet(config or UNetConfig.sd15())
    layer = model.down_blocks[level].attentions[0].transformer_blocks[0].attn2
    side = latent_size // 2**level
    pixels, channels = side * side, layer.to_q.in_features
    heads, d = layer.heads, layer.head_dim
    fig, ax = canvas(15, 5.4, (13, 4.7))
    box(ax, 1.4, 4.2, f"image features\n(1, {channels}, {side}, {side})", "data", width=2.4, height=0.9)
    box(ax, 1.4, 1.1, f"text context\n(1, {context_length}, {model.config.cross_attention_dim})", "text",
        width=2.4, height=0.9)
    box(ax, 5.4, 4.2, "$Q = x W_q$", "model", width=1.6)
    box(ax, 5.4, 1.7, "$K = c W_k$", "model", width=1.6)
    box(ax, 5.4, 0.6, "$V = c W_v$", "model", width=1.6)
    box(ax, 8.9, 3.0, "softmax$(QK^T / \\sqrt{d})$", "guide", width=2.6)
    box(ax, 12.0, 3.0, "weights × V,\nthen $W_o$", "model", width=1.8, height=0.9)
    box(ax, 12.0, 4.7, f"added to x: (1, {channels}, {side}, {side})", "data", width=3.2, height=0.6)
    arrow(ax, (2.6, 4.2), (4.6, 4.2), f"flatten:\n(1, {pixels}, {channels})", offset=(0, -0.4))
    arrow(ax, (2.6, 1.3), (4.6, 1.7))
    arrow(ax, (2.6, 0.9), (4.6, 0.6))
    arrow(ax, (6.2, 4.2), (8.3, 3.4), f"(1, {heads}, {pixels}, {d})", offset=(0.5, 0.35))
    arrow(ax, (6.2, 1.7), (8.3, 2.6), f"(1, {heads}, {context_length}, {d})", offset=(0.5, -0.35))
    arrow(ax, (10.2, 3.0), (11.1, 3.0))
    ax.text(10.65, 3.65, f"weights\n(1, {heads}, {pixels}, {context_length})", ha="center", fontsize=8)
    arrow(ax, (6.2, 0.6), (11.6, 2.55), f"(1, {heads}, {context_length}, {d})", offset=(1.3, -0.45))
    arrow(ax, (12.0, 3.45), (12.0, 4.4), f"(1, {pixels}, {channels})", offset=(1.0, 0))
    ax.text(7.2, 5.15, f"{heads} heads of d = {d}: each of the {pixels:,} pixels spreads its attention over the "
            f"{context_length} tokens", ha="center", fontsize=8.5, color="0.3")
    return fig


# --- one training step (chapter 05) ----------------------------------------------------------


def training_step(unet_config: UNetConfig | None = None, vae_config: VAEConfig | None = None,
                  text_config: TextEncoderConfig | None = None, image_size: int = 512, batch_size: int = 1,
                  caption_dropout: float = 0.1, num_train_timesteps: int = 1000):
    """The latent-diffusion training step: the frozen encoder and text encoder, a random timestep and
    noise, the U-Net's prediction and the mean squared error; shapes from a meta-device run."""
    unet, vae, text_encoder = meta_models(unet_config or UNetConfig.sd15(), vae_config or VAEConfig.sd(),
                                          text_config or TextEncoderConfig.sd15())
    images = torch.zeros(batch_size, vae.config.in_channels, image_size, image_size, device="meta")
    latents = vae.encode(images).mean  # (B, 4, H/f, W/f)
    ids = torch.zeros(batch_size, text_encoder.config.max_position_embeddings, dtype=torch.long, device="meta")
    context = text_encoder(ids)
    prediction = unet(latents, 0, context)
    fig, ax = canvas(15, 6.0, (14, 5.2))
    box(ax, 1.2, 5.3, "caption", "data", width=1.6)
    box(ax, 4.2, 5.3, f"dropped to \"\"\nwith p = {caption_dropout:g}", "guide", width=2.0, height=0.9)
    box(ax, 7.3, 5.3, "tokenizer + CLIP\ntext encoder (frozen)", "text", width=2.4, height=0.9)
    box(ax, 1.2, 3.2, "image", "data", width=1.6)
    box(ax, 4.2, 3.2, "VAE encoder\n(frozen)", "model", width=2.0, height=0.9)
    box(ax, 7.3, 3.2, f"× scaling factor\n{vae.scaling_factor:g}", "schedule", width=2.0, height=0.9)
    box(ax, 10.4, 3.2, "add noise\n$\\sqrt{\\bar\\alpha_t} z_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\epsilon$",
        "schedule", width=2.6, height=0.9)
    box(ax, 13.6, 3.2, "U-Net\n(trained)", "model", width=1.8, height=0.9)
    box(ax, 10.4, 1.0, f"t ~ U{{0, …, {num_train_timesteps - 1}}}\nε ~ N(0, I)", "data", width=2.4, height=0.9)
    box(ax, 13.6, 1.0, "loss = MSE(ε̂, ε)", "loss", width=2.2)
    arrow(ax, (2.0, 5.3), (3.2, 5.3))
    arrow(ax, (5.2, 5.3), (6.1, 5.3))
    arrow(ax, (8.5, 5.3), (13.2, 3.65), f"context {shape(context)}", offset=(0.6, 0.45))
    arrow(ax, (2.0, 3.2), (3.2, 3.2), shape(images), offset=(0, 0.35), fontsize=7.5)
    arrow(ax, (5.2, 3.2), (6.3, 3.2))
    arrow(ax, (8.3, 3.2), (9.1, 3.2), "$z_0$", offset=(0, 0.3))
    ax.text(8.7, 2.55, shape(latents), ha="center", fontsize=8)
    arrow(ax, (11.7, 3.2), (12.7, 3.2), "$z_t$", offset=(0, 0.3))
    arrow(ax, (10.4, 1.45), (10.4, 2.75))
    arrow(ax, (11.6, 1.35), (12.9, 2.75), "t", offset=(-0.2, 0.15))
    arrow(ax, (11.6, 0.85), (12.5, 0.9), "ε", offset=(0, -0.3))
    arrow(ax, (13.6, 2.75), (13.6, 1.3), f"ε̂ {shape(prediction)}", offset=(0.05, 0.1), fontsize=7.5)
    ax.text(4.2, 4.2, "the VAE and the text encoder never change; only the U-Net learns", ha="center",
            fontsize=8.5, color="0.35")
    fig.tight_layout()
    return fig


# --- where each fine-tuning method changes the model (chapter 09) -----------------------------


def fine_tuning(unet_config: UNetConfig | None = None, text_config: TextEncoderConfig | None = None,
                rank: int = 4, new_tokens: int = 1, prompts: tuple[str, str] = ("a <cross>", "a sks square")):
    """Three rows, one per method, of the path from prompt to noise prediction, with the part each method
    trains drawn in red and its weight count measured on meta-device models: textual inversion (one new
    row of the token embedding table), DreamBooth (the whole U-Net) and LoRA (rank-``rank`` adapters
    beside the U-Net's attention projections). ``prompts``: textual inversion's, then DreamBooth's and LoRA's."""
    from .lora import add_lora, lora_parameters  # diagrams draws the models; lora adapts them

    unet_config, text_config = unet_config or UNetConfig.sd15(), text_config or TextEncoderConfig.sd15()
    with torch.device("meta"):
        unet, text_encoder = UNet(unet_config), TextEncoder(text_config)
        unet_weights = sum(p.numel() for p in unet.parameters())
        adapters = add_lora(unet, rank)
        lora_weights = sum(p.numel() for p in lora_parameters(unet))
    D, V = text_config.hidden_size, text_config.vocab_size
    context = (1, text_config.max_position_embeddings, D)
    rows = [("textual inversion", f"{new_tokens * D:,} weights: {new_tokens} new row{'s' * (new_tokens > 1)} of {D}",
             "embedding"),
            ("DreamBooth", f"{unet_weights:,} weights: the whole U-Net", "unet"),
            ("LoRA", f"{lora_weights:,} weights: A and B on {len(adapters)} attention projections, rank {rank}", "lora")]
    fig, ax = canvas(16, 2.6 * len(rows), (14, 2.1 * len(rows)))
    trained = dict(facecolor=COLORS["loss"], edgecolor="#a33", linewidth=2.2)
    for r, (method, count, part) in enumerate(rows):
        y = 2.6 * (len(rows) - r) - 1.35
        ax.text(0.1, y + 0.95, method, fontsize=11, fontweight="bold", va="center")
        ax.text(3.0, y + 0.95, "trained: " + count, fontsize=9, va="center", color="#a33")
        box(ax, 1.2, y, f'prompt\n"{prompts[0] if part == "embedding" else prompts[1]}"', "data",
            width=1.9, height=0.9, fontsize=8.5)
        box(ax, 3.6, y, "tokenizer", "text", width=1.6, height=0.9, fontsize=8.5)
        box(ax, 6.2, y, f"token embedding\ntable ({V + (new_tokens if part == 'embedding' else 0):,} × {D})", "text",
            width=2.4, height=0.9, fontsize=8.5, **(trained if part == "embedding" else {}))
        box(ax, 8.9, y, "text encoder\n(frozen)", "text", width=1.8, height=0.9, fontsize=8.5)
        box(ax, 12.6, y, "U-Net" + (" (trained)" if part == "unet" else " (frozen)") +
            "\nResBlocks, attention\nto_q  to_k  to_v  to_out", "model", width=3.0, height=1.1, fontsize=8.5,
            **(trained if part == "unet" else {}))
        if part == "lora":
            box(ax, 12.6, y - 0.9, "+ (α/r)·B A beside each", "loss", width=2.8, height=0.5, fontsize=8.5,
                edgecolor="#a33", linewidth=2.2)
        arrow(ax, (2.15, y), (2.8, y))
        arrow(ax, (4.4, y), (5.0, y), "ids", offset=(0, 0.25))
        arrow(ax, (7.4, y), (8.0, y))
        arrow(ax, (9.8, y), (11.1, y), f"context {shape(context)}", offset=(0, 0.3), fontsize=7.5)
        arrow(ax, (14.1, y), (15.2, y), "ε̂", offset=(0, 0.25))
        ax.text(12.6, y + 0.75, "noisy latent $z_t$, t", ha="center", fontsize=8, color="0.35")
    fig.tight_layout()
    return fig
