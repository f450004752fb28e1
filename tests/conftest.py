import os

# No test touches the network: the hub is offline, and the profile is the CPU one.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LDM_TEACH_PROFILE", "quick")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_diffusers_pipeline(tmp_path_factory):
    """A tiny random diffusers StableDiffusionPipeline (f = 8 VAE, 2-level U-Net, 2-layer CLIP, SD 1.5's PNDM)
    and the folder its save_pretrained wrote: (pipeline, folder). Built once per test session."""
    import json

    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from ldm_teach.clip import BUNDLED_VOCABULARY, clip_vocabulary, read_bpe_merges

    folder = tmp_path_factory.mktemp("tiny_sd")
    merges = read_bpe_merges(BUNDLED_VOCABULARY)
    (folder / "vocab.json").write_text(json.dumps(clip_vocabulary(merges)), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    # the paths positionally: transformers 5 names them vocab/merges, transformers 4 vocab_file/merges_file
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=2, norm_num_groups=8, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(16, 16, 32, 32), down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, sample_size=64)
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=49408, max_position_embeddings=77))
    with torch.no_grad():  # perturb the norms' 1s and 0s so that a swapped or skipped norm shows
        for model in (unet, vae, text_encoder):
            for name, parameter in model.named_parameters():
                if "norm" in name:
                    parameter.add_(0.1 * torch.randn_like(parameter))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder / "pipeline")
    return pipe, folder / "pipeline"
