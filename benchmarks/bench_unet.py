"""Time one call of our SD 1.5 U-Net against diffusers' UNet2DConditionModel on the same weights and input.

    python benchmarks/bench_unet.py

On the CPU: fp32, batch 2, a 24x24 latent. With a CUDA device, also fp16 at 64x64 (512 px), with the
peak GPU memory of each call. Prints the ours/diffusers time ratio; the target is at most 1.0.
"""
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from ldm_teach import pretrained


def timed(call, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(device: torch.device, dtype: torch.dtype, batch: int, side: int, runs: int) -> None:
    torch.manual_seed(0)
    reference = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).to(device, dtype).eval()
    ours = pretrained.unet_from_diffusers(reference)
    generator = torch.Generator(device).manual_seed(1)
    x = torch.randn(batch, 4, side, side, generator=generator, device=device, dtype=dtype)
    context = torch.randn(batch, 77, 768, generator=generator, device=device, dtype=dtype)
    t = torch.tensor([500] * batch, device=device)
    calls = {
        "diffusers": lambda: reference(x, t, encoder_hidden_states=context).sample,
        "ours": lambda: ours(x, t, context),
    }
    times = {name: [] for name in calls}
    peaks = {}
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call()
        for _ in range(runs):  # interleaved, so a slow patch of the machine hits both
            for name, call in calls.items():
                times[name].append(timed(call, device))
        if device.type == "cuda":
            for name, call in calls.items():
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                call()
                peaks[name] = (torch.cuda.max_memory_allocated() - before) / 2**30
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"{device.type} {str(dtype).removeprefix('torch.')}, batch {batch}, {side}x{side} latent, median of {runs}:")
    for name in calls:
        peak = f", peak {peaks[name]:.2f} GiB above the weights" if peaks else ""
        print(f"  {name:9s} {medians[name]:.3f} s{peak}")
    print(f"  ours/diffusers time ratio: {medians['ours'] / medians['diffusers']:.3f}")


if __name__ == "__main__":
    compare(torch.device("cpu"), torch.float32, batch=2, side=24, runs=5)
    if torch.cuda.is_available():
        compare(torch.device("cuda"), torch.float16, batch=2, side=64, runs=10)
