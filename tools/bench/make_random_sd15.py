#!/usr/bin/env python3
"""Writes full-size, random-weight Stable Diffusion 1.5 + DynamicID files for
timing and memory measurements (the real ones cannot be fetched everywhere):

    <out>/sd15/              diffusers folder (UNet, VAE, CLIP-L text encoder,
                             DDIM scheduler config), float16 safetensors, SD1.5 configs
    <out>/image_encoder/     CLIP-ViT-H/14 vision tower (transformers), float16
    <out>/SAA.safetensors    ProjPlusModel (depth 4, 12 heads of 64) and rank-128
                             SA/SAA adapters on all 32 attention layers, as SAA.bin lays them out
    <out>/id0.safetensors, id1.safetensors, id0.png, id1.png   two identities

About 3.5 GB on disk. Used by benchmarks/bench_dynamicid.cpp:

    python3 tools/bench/make_random_sd15.py --out /tmp/sd15-random
    DYNAMICID_BENCH_MODELS=/tmp/sd15-random build/benchmarks/dynamicid_bench_dynamicid
"""
import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    out = pathlib.Path(ap.parse_args().out)
    sd = out / "sd15"
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
    unet.half().save_pretrained(sd / "unet")
    names = list(unet.attn_processors.keys())
    hidden = {n: unet.get_submodule(n.rsplit(".processor", 1)[0]).to_q.in_features for n in names}
    del unet
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=512,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  block_out_channels=(128, 256, 512, 512), layers_per_block=2).half().save_pretrained(sd / "vae")
    CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                                 max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
                  ).half().save_pretrained(sd / "text_encoder", safe_serialization=True)
    DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(sd / "scheduler")
    # The real CLIP vocabulary (the tiny test checkpoint carries SD1.5's tokenizer files).
    root = pathlib.Path(__file__).resolve().parents[2]
    shutil.copytree(root / "tests/data/tiny_sd/diffusers/tokenizer", sd / "tokenizer", dirs_exist_ok=True)
    (sd / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"]}, indent=2))

    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                                   num_attention_heads=16, patch_size=14, image_size=224,
                                                   projection_dim=1024, hidden_act="gelu")
                                  ).half().save_pretrained(out / "image_encoder", safe_serialization=True)

    g = torch.Generator().manual_seed(1)

    def rnd(*shape, scale=0.02, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).half()

    c, id_dim, clip_dim, inner, depth, rank = 768, 512, 1280, 768, 4, 128
    t = {}
    p = "proj_module."
    t[p + "proj.0.weight"], t[p + "proj.0.bias"] = rnd(2 * id_dim, id_dim), rnd(2 * id_dim)
    t[p + "proj.2.weight"], t[p + "proj.2.bias"] = rnd(4 * c, 2 * id_dim), rnd(4 * c)
    t[p + "norm.weight"], t[p + "norm.bias"] = rnd(c, offset=1.0), rnd(c)
    r = p + "perceiver_resampler."
    t[r + "proj_in.weight"], t[r + "proj_in.bias"] = rnd(c, clip_dim), rnd(c)
    t[r + "proj_out.weight"], t[r + "proj_out.bias"] = rnd(c, c), rnd(c)
    t[r + "norm_out.weight"], t[r + "norm_out.bias"] = rnd(c, offset=1.0), rnd(c)
    for i in range(depth):
        l = f"{r}layers.{i}."
        for n in ("0.norm1", "0.norm2", "1.0"):
            t[l + n + ".weight"], t[l + n + ".bias"] = rnd(c, offset=1.0), rnd(c)
        t[l + "0.to_q.weight"], t[l + "0.to_kv.weight"] = rnd(inner, c), rnd(2 * inner, c)
        t[l + "0.to_out.weight"] = rnd(c, inner)
        t[l + "1.1.weight"], t[l + "1.3.weight"] = rnd(4 * c, c), rnd(c, 4 * c)
    for i, name in enumerate(names):
        h = hidden[name]
        cross = name.endswith("attn2.processor")
        q = f"SAA_module.{i}."
        for n in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
            kv = n in ("to_k_lora", "to_v_lora")
            t[q + n + ".down.weight"] = rnd(rank, (c if cross else h) if kv else h)
            t[q + n + ".up.weight"] = torch.zeros(h, rank).half()
        if cross:
            t[q + "to_k_ip.weight"], t[q + "to_v_ip.weight"] = rnd(h, c), rnd(h, c)
    save_file(t, out / "SAA.safetensors")

    rng = np.random.default_rng(3)
    for i in range(2):
        e = torch.from_numpy(rng.standard_normal(512).astype(np.float32))
        save_file({"embedding": e / e.norm()}, out / f"id{i}.safetensors")
        Image.fromarray(rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)).save(out / f"id{i}.png")
    print("wrote", out)


if __name__ == "__main__":
    main()
