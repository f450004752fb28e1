"""LoRA adapters (ldm_teach/lora.py): identity at start, merged equals unmerged, only A and B train."""
import pytest
import torch

from ldm_teach import clip, lora
from ldm_teach.unet import UNet, UNetConfig


def tiny_unet():
    torch.manual_seed(0)
    return UNet(UNetConfig.tiny()).eval()


def unet_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 77, 64, generator=g)


def test_fresh_adapter_changes_nothing_and_keeps_the_state_dict_names():
    unet = tiny_unet()
    x, t, context = unet_inputs()
    before = unet(x, t, context)
    names = set(unet.state_dict())
    adapters = lora.add_lora(unet, rank=4)
    assert len(adapters) == 4 * sum(1 for m in unet.modules() if type(m).__name__ == "Attention")
    assert torch.equal(unet(x, t, context), before)
    after = set(unet.state_dict())
    assert names <= after
    assert all(".lora_A." in k or ".lora_B." in k for k in after - names)
    assert len(after - names) == 2 * len(adapters)


def test_only_the_adapters_train():
    unet = tiny_unet()
    lora.add_lora(unet, rank=2)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(lora.lora_parameters(unet)) == len(trainable)
    x, t, context = unet_inputs()
    unet(x, t, context).square().mean().backward()
    grads = [p.grad for p in lora.lora_parameters(unet)]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)  # B's gradient is non-zero though B starts at zero


@pytest.mark.parametrize("alpha, scale", [(None, 1.0), (8.0, 0.5)])
def test_merged_model_equals_the_adapted_one(alpha, scale):
    unet = tiny_unet()
    x, t, context = unet_inputs()
    adapters = lora.add_lora(unet, rank=3, alpha=alpha, scale=scale)
    torch.manual_seed(2)
    for adapter in adapters:
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.05)
    with torch.no_grad():
        adapted = unet(x, t, context)
        assert lora.merge_lora(unet) == len(adapters)
        merged = unet(x, t, context)
    assert not any(isinstance(m, lora.LoRALinear) for m in unet.modules())
    assert (adapted - merged).abs().max() < 1e-5
    assert (adapted - tiny_unet()(x, t, context)).abs().max() > 1e-3  # the adapter did change the output


def test_remove_gives_back_the_original_layers():
    unet = tiny_unet()
    x, t, context = unet_inputs()
    before = unet(x, t, context)
    for adapter in lora.add_lora(unet, rank=2):
        torch.nn.init.normal_(adapter.lora_B.weight)
    assert lora.remove_lora(unet) > 0
    assert torch.equal(unet(x, t, context), before)


def test_text_encoder_targets():
    torch.manual_seed(0)
    encoder = clip.TextEncoder(clip.TextEncoderConfig.tiny())
    adapters = lora.add_lora(encoder, rank=4, targets=lora.TEXT_ENCODER_TARGETS)
    assert len(adapters) == 4 * encoder.config.num_hidden_layers
    assert adapters[0].lora_A.weight.shape == (4, 64) and adapters[0].lora_B.weight.shape == (64, 4)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="rank"):
        lora.add_lora(tiny_unet(), rank=0)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        lora.add_lora(tiny_unet(), rank=2, targets=("q_proj",))
    unet = tiny_unet()
    lora.add_lora(unet, rank=2)
    with pytest.raises(ValueError, match="already has LoRA"):
        lora.add_lora(unet, rank=2)


def test_added_token_is_kept_whole_and_gets_an_embedding_row():
    tokenizer = clip.Tokenizer()
    before = tokenizer.encode("a small red <cross> in the center")
    (new_id,) = tokenizer.add_tokens(["<cross>"])
    assert new_id == 49408 and tokenizer.vocab_size == 49409
    ids = tokenizer.encode("a small red <cross> in the center")
    assert len(ids) == len(before) - 2 and new_id in ids  # "<", "cross", ">" became one token
    assert tokenizer.decode(ids) == "a small red <cross> in the center"
    assert tokenizer.encode("a small red cross") == clip.Tokenizer().encode("a small red cross")
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tokenizer.add_tokens(["<cross>"])
    with pytest.raises(ValueError, match="already in the vocabulary"):
        tokenizer.add_tokens(["red</w>"])
    torch.manual_seed(0)
    encoder = clip.TextEncoder(clip.TextEncoderConfig.tiny())
    ids_before = clip.Tokenizer()("a small red square")
    features = encoder(ids_before)
    encoder.resize_token_embeddings(tokenizer.vocab_size)
    assert encoder.token_embedding.weight.shape == (49409, 64) and encoder.config.vocab_size == 49409
    assert torch.equal(encoder(ids_before), features)  # old tokens read as before
    assert encoder(tokenizer("a small red <cross>")).shape == (1, 77, 64)
