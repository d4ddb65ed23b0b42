#!/usr/bin/env python3
"""PyTorch baseline for benchmarks/bench_cuda.cu (dev-only; needs torch with a GPU).

Times, with CUDA events (median of the timed calls after warm-up), the same
work dynamicid_bench_cuda does:

  attention  torch.nn.functional.scaled_dot_product_attention in f16 on
             (2 images, 8 heads, 4096 tokens, dim 40) and (2, 8, 1024, 80);
  unet       one diffusers UNet2DConditionModel evaluation with SD1.5's config
             and random weights, f16, batch 2, 64x64 latent (512x512 image),
             77 text tokens (skipped with a note when diffusers is missing).

  python3 tools/bench/pytorch_cuda_baseline.py [attention|unet] [--iters N]
"""
import argparse
import statistics
import sys

import torch

SD15_UNET_CONFIG = dict(
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


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def bench_attention(iters):
    gen = torch.Generator(device="cuda").manual_seed(0)
    for heads_batch, tokens, dim in ((16, 4096, 40), (16, 1024, 80)):
        shape = (2, heads_batch // 2, tokens, dim)
        q, k, v = (torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen) for _ in range(3))
        with torch.no_grad():
            ms = time_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), 3, iters)
        flops = 4.0 * heads_batch * tokens * tokens * dim
        print(f"torch_sdpa_f16 batch*heads={heads_batch} tokens={tokens} dim={dim}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s",
              flush=True)


def bench_unet(iters):
    try:
        from diffusers import UNet2DConditionModel
    except ImportError as e:
        print(f"torch_unet: skipped, diffusers is not importable ({e})", flush=True)
        return
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).to("cuda", torch.float16).eval()
    sample = torch.randn(2, 4, 64, 64, device="cuda", dtype=torch.float16)
    text = 0.5 * torch.randn(2, 77, 768, device="cuda", dtype=torch.float16)
    t = torch.full((2,), 981, device="cuda", dtype=torch.long)
    with torch.no_grad():
        ms = time_ms(lambda: unet(sample, t, encoder_hidden_states=text).sample, 3, iters)
    print(f"torch_unet_sd15_f16 batch=2 image=512: {ms:.2f} ms, max memory allocated "
          f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=("attention", "unet"))
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name()}", flush=True)
    if args.what in (None, "attention"):
        bench_attention(max(1, args.iters))
    if args.what in (None, "unet"):
        bench_unet(max(1, args.iters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
