"""Tiny random SDXL parts, as diffusers' own tests build them, for the SDXL and refiner tests."""
import json

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm_teach.clip import BUNDLED_VOCABULARY, clip_vocabulary, read_bpe_merges


def sdxl_unet(cross_attention_dim: int = 64, time_ids: int = 6) -> UNet2DConditionModel:
    """An SDXL-style U-Net: a level without attention, two transformer layers at the other, and the added
    embedding of the pooled prompt (32 wide) and ``time_ids`` numbers of 8 features each."""
    return UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=cross_attention_dim, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + time_ids * 8)


def perturbed(*models):
    """Shift the norms' 1s and 0s (and the all-zero tensors) so that a skipped or swapped one shows."""
    with torch.no_grad():
        for model in models:
            for name, parameter in model.named_parameters():
                if "norm" in name or (parameter == 0).all():
                    parameter.add_(0.1 * torch.randn_like(parameter))
    return models


def sdxl_parts(folder) -> dict:
    """The parts an SDXL pipeline has besides its U-Net: the VAE, CLIP's encoder and a second one with its
    projection (eos_token_id 2, as SDXL's configs say), their tokenizers (OpenCLIP's pads with "!"), and
    SDXL base's scheduler. ``folder`` receives the vocabulary files the tokenizers read."""
    merges = read_bpe_merges(BUNDLED_VOCABULARY)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    vocabulary = (str(folder / "vocab.json"), str(folder / "merges.txt"))  # positional: transformers 4 and 5
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, sample_size=64,
                        scaling_factor=0.13025)
    text_config = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                       vocab_size=49408, bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_act="gelu")
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config, projection_dim=32))
    perturbed(vae, text_encoder, text_encoder_2)
    return dict(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                tokenizer=CLIPTokenizer(*vocabulary, model_max_length=77),
                tokenizer_2=CLIPTokenizer(*vocabulary, model_max_length=77, pad_token="!"),
                scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                 steps_offset=1, timestep_spacing="leading"))


def saved_sdxl_pipeline(root):
    """A tiny random SDXL base pipeline built from the parts above (seed 0) and saved by diffusers into
    ``root / "pipeline"``: (the pipeline, its folder)."""
    from diffusers import StableDiffusionXLPipeline

    torch.manual_seed(0)
    (unet,) = perturbed(sdxl_unet())
    pipe = StableDiffusionXLPipeline(unet=unet, **sdxl_parts(root / "vocabulary"), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipeline")
    return pipe, root / "pipeline"
