#!/usr/bin/env python3
"""PyTorch CPU baseline for benchmarks/bench_onednn.cpp (dev-only).

Times, on the CPU with random weights (no download) and the same shapes and
thread count as the C++ benchmark, in f32 and bf16:
  unet_sd15/256, unet_sd15/512  diffusers' UNet2DConditionModel with Stable
                                Diffusion 1.5's config, batch 2, 77 tokens, t 981
  vae_decode/512                diffusers' AutoencoderKL (SD1.5 config) decode of
                                a (1, 4, 64, 64) latent
  text_encoder                  transformers' CLIPTextModel (ViT-L/14 text tower),
                                batch 2 x 77 tokens
Each is the best of N timed runs after a warm-up, printed as lines
"pytorch <row> <seconds>", which dynamicid_bench_onednn reads (it runs this
script itself when torch and diffusers are installed, or reads a saved copy):

    python3 tools/bench/pytorch_cpu_baseline.py --threads 2 > pytorch.txt
    dynamicid_bench_onednn --threads=2 --pytorch=pytorch.txt
    python3 tools/bench/pytorch_cpu_baseline.py --threads 2 --filter 'unet_sd15/512'
"""
import argparse
import re
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

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

# Its VAE (vae/config.json).
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
)


def best_of(fn, runs):
    best = float("inf")
    with torch.inference_mode():
        for i in range(runs + 1):
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if i > 0:  # the first run is a warm-up
                best = min(best, elapsed)
    return best


def unet_case(image):
    def make(dtype):
        unet = UNet2DConditionModel(**SD15_UNET).eval().to(dtype)
        latent = image // 8
        sample = torch.randn(2, 4, latent, latent, dtype=dtype)
        text = 0.5 * torch.randn(2, 77, 768, dtype=dtype)
        t = torch.tensor([981.0, 981.0])
        return lambda: unet(sample, t, encoder_hidden_states=text)
    return make


def vae_decode(dtype):
    vae = AutoencoderKL(**SD15_VAE).eval().to(dtype)
    z = torch.randn(1, 4, 64, 64, dtype=dtype)
    return lambda: vae.decode(z)


def text_encoder(dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                         projection_dim=768, hidden_act="quick_gelu", max_position_embeddings=77)
    model = CLIPTextModel(cfg).eval().to(dtype)
    ids = torch.randint(320, 40000, (2, 77))
    ids[:, 0] = 49406
    return lambda: model(input_ids=ids)


CASES = {
    "unet_sd15/256": unet_case(256),
    "unet_sd15/512": unet_case(512),
    "vae_decode/512": vae_decode,
    "text_encoder": text_encoder,
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=1, help="timed runs after one warm-up")
    p.add_argument("--filter", default="", help="regular expression: only rows it matches (searched in '<row>/<type>')")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# torch {torch.__version__}, threads {a.threads}, mkldnn {torch.backends.mkldnn.is_available()}", flush=True)
    for name, make in CASES.items():
        for dtype, type_name in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            row = f"{name}/{type_name}"
            if a.filter and not re.search(a.filter, row):
                continue
            torch.manual_seed(0)
            seconds = best_of(make(dtype), a.runs)
            print(f"pytorch {row} {seconds:.4f}", flush=True)


if __name__ == "__main__":
    main()
