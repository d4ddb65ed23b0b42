#!/usr/bin/env python3
"""PyTorch CPU baseline for benchmarks/bench_onednn.cpp (dev-only).

Times one evaluation of diffusers' UNet2DConditionModel with Stable Diffusion
1.5's config and random weights (no download) on the CPU, with the same shapes
and thread count as the C++ benchmark: 256 x 256 images (latent 32 x 32),
batch 2, 77 text tokens, timestep 981. Prints the best of N timed runs after a
warm-up, in f32 and (with --bf16) in bf16 weights and activations.

    python3 tools/bench/pytorch_cpu_baseline.py --threads 2
    python3 tools/bench/pytorch_cpu_baseline.py --threads 2 --bf16 --runs 2

Pass the printed seconds to the C++ benchmark:
    dynamicid_bench_onednn --pytorch-seconds=F32,BF16
"""
import argparse
import time

import torch
from diffusers import UNet2DConditionModel

# Stable Diffusion 1.5's UNet (runwayml/stable-diffusion-v1-5, unet/config.json).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)


def time_unet(dtype, image, threads, runs):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval().to(dtype)
    latent = image // 8
    sample = torch.randn(2, 4, latent, latent, dtype=dtype)
    text = 0.5 * torch.randn(2, 77, 768, dtype=dtype)
    t = torch.tensor([981.0, 981.0])
    best = float("inf")
    with torch.inference_mode():
        for i in range(runs + 1):
            start = time.perf_counter()
            unet(sample, t, encoder_hidden_states=text)
            elapsed = time.perf_counter() - start
            if i > 0:  # the first run is a warm-up
                best = min(best, elapsed)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--image", type=int, default=256)
    p.add_argument("--runs", type=int, default=2, help="timed runs after one warm-up")
    p.add_argument("--bf16", action="store_true", help="also time bf16")
    a = p.parse_args()
    print(f"torch {torch.__version__}, threads {a.threads}, mkldnn enabled {torch.backends.mkldnn.is_available()}, "
          f"SD1.5 UNet {a.image}x{a.image}, batch 2, 77 tokens")
    f32 = time_unet(torch.float32, a.image, a.threads, a.runs)
    print(f"pytorch f32: {f32:.3f} s")
    seconds = [f"{f32:.3f}"]
    if a.bf16:
        bf16 = time_unet(torch.bfloat16, a.image, a.threads, a.runs)
        print(f"pytorch bf16: {bf16:.3f} s")
        seconds.append(f"{bf16:.3f}")
    print("--pytorch-seconds=" + ",".join(seconds))


if __name__ == "__main__":
    main()
