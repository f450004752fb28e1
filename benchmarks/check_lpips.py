"""Check ldm_teach.perceptual.LPIPS against the lpips package's LPIPS(net="vgg") on the same weights.

The lpips package needs torchvision, which does not install beside this book's CPU torch, so this
runs in a venv of its own (on a machine without network, VGG16's ImageNet weights cannot be
downloaded, so both models share lpips' randomly initialised trunk and its real linear weights):

    python3 -m venv /tmp/lpips-venv
    /tmp/lpips-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 lpips
    /tmp/lpips-venv/bin/pip install --no-deps -e .
    /tmp/lpips-venv/bin/pip install safetensors huggingface_hub tqdm regex
    /tmp/lpips-venv/bin/python benchmarks/check_lpips.py

Prints the largest difference over a batch of image pairs, and per layer, after checking that
torchvision's VGG16 state dict (the file `load_lpips` downloads) loads into ours strictly. Result on 2026-12-02
(CPU, fp32, 3 pairs of 64x48 images, 4 of 48x48): 0.0 overall and per layer.
"""
import lpips
import torch
import torchvision

from ldm_teach.perceptual import LPIPS, lpips_state_dict, unit_length
from ldm_teach.pretrained import load_state_dict_strict


def main() -> None:
    torch.manual_seed(0)
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()  # random trunk, real linear weights
    vgg_weights = {f"features.{key.split('.', 2)[2]}": value for key, value in reference.state_dict().items()
                   if key.startswith("net.slice")}  # net.slice2.5.weight -> features.5.weight
    ours = load_state_dict_strict(LPIPS(), lpips_state_dict(vgg_weights), "LPIPS")
    # torchvision's own VGG16 state dict (what load_lpips downloads) loads into ours strictly
    load_state_dict_strict(LPIPS(), lpips_state_dict(torchvision.models.vgg16().state_dict()), "torchvision VGG16")
    generator = torch.Generator().manual_seed(1)
    for shape in [(3, 3, 64, 48), (4, 3, 48, 48)]:
        x = torch.rand(shape, generator=generator) * 2 - 1
        y = (x + 0.3 * torch.randn(shape, generator=generator)).clamp(-1, 1)
        with torch.no_grad():
            expected, per_layer = reference(x, y, retPerLayer=True)
            got = ours(x, y)
        difference = (got - expected.flatten()).abs().max().item()
        print(f"{shape}: LPIPS {[round(v, 4) for v in got.tolist()]}, max |ours - lpips| = {difference:.1e}")
        assert difference < 1e-6
        # layer by layer: each term of the sum
        fx, fy = ours.vgg((x - ours.shift) / ours.scale), ours.vgg((y - ours.shift) / ours.scale)
        for i, (linear, a, b) in enumerate(zip(ours.linear, fx, fy)):
            with torch.no_grad():
                term = linear((unit_length(a) - unit_length(b)) ** 2).mean(dim=(1, 2, 3))
            layer_difference = (term - per_layer[i].flatten()).abs().max().item()
            print(f"  layer {i}: max difference {layer_difference:.1e}")
            assert layer_difference < 1e-6


if __name__ == "__main__":
    main()
