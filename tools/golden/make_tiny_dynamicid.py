#!/usr/bin/env python3
"""Writes tests/data/tiny_dynamicid/: random-weight DynamicID add-on models that
fit the tiny SD checkpoint in tests/data/tiny_sd/diffusers, for command-line
and pipeline smoke tests (not goldens: the numbers are checked elsewhere).

    image_encoder/    transformers CLIPVisionModelWithProjection (image 32,
                      patch 8, hidden 16, 2 layers), config.json + model.safetensors
    SAA.safetensors   projection (ArcFace width 8, CLIP width 16, 4 tokens of 16)
                      and one SA/SAA adapter per attention layer of the UNet, in
                      diffusers' attn_processors order, read from diffusers itself
    alice.safetensors, bob.safetensors   8-wide "ArcFace" embeddings (L2-normalised)
    alice.png, bob.png                   reference images (48 x 40 and 40 x 48)
    alice_106.txt                        106 "x y" landmark lines on a 512 x 512 frame
    IMR.safetensors   IMR (width 64, one 64-wide head, depth 1 + 1, tokens 16, face
                      prompt width 16 = the tiny text encoder's)
    key_point_encoder.safetensors   the released KeyPointEncoder layout with 4
                      channels per unit and a 16-wide output

Usage: python3 tools/golden/make_tiny_dynamicid.py [--out tests/data/tiny_dynamicid]
"""
import argparse
import json
import pathlib

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

ROOT = pathlib.Path(__file__).resolve().parents[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests/data/tiny_dynamicid"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(2024)

    def rnd(*shape, scale=0.3, offset=0.0):
        return (torch.randn(*shape, generator=g) * scale + offset).contiguous()

    # Vision tower.
    torch.manual_seed(5)
    vcfg = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=8, hidden_act="quick_gelu")
    vision = CLIPVisionModelWithProjection(vcfg).eval()
    (out / "image_encoder").mkdir(exist_ok=True)
    vision.save_pretrained(out / "image_encoder", safe_serialization=True)

    # Adapter layer order and widths from diffusers.
    unet = UNet2DConditionModel.from_pretrained(ROOT / "tests/data/tiny_sd/diffusers/unet")
    c = unet.config.cross_attention_dim
    id_dim, clip_dim, inner = 8, vcfg.hidden_size, 64
    t = {}
    p = "proj_module."
    t[p + "proj.0.weight"] = rnd(2 * id_dim, id_dim)
    t[p + "proj.0.bias"] = rnd(2 * id_dim)
    t[p + "proj.2.weight"] = rnd(4 * c, 2 * id_dim)
    t[p + "proj.2.bias"] = rnd(4 * c)
    t[p + "norm.weight"] = rnd(c, scale=0.1, offset=1.0)
    t[p + "norm.bias"] = rnd(c, scale=0.1)
    r = p + "perceiver_resampler."
    t[r + "proj_in.weight"] = rnd(c, clip_dim)
    t[r + "proj_in.bias"] = rnd(c)
    t[r + "proj_out.weight"] = rnd(c, c)
    t[r + "proj_out.bias"] = rnd(c)
    t[r + "norm_out.weight"] = rnd(c, scale=0.1, offset=1.0)
    t[r + "norm_out.bias"] = rnd(c, scale=0.1)
    l = r + "layers.0."
    for n in ("0.norm1", "0.norm2", "1.0"):
        t[l + n + ".weight"] = rnd(c, scale=0.1, offset=1.0)
        t[l + n + ".bias"] = rnd(c, scale=0.1)
    t[l + "0.to_q.weight"] = rnd(inner, c)
    t[l + "0.to_kv.weight"] = rnd(2 * inner, c)
    t[l + "0.to_out.weight"] = rnd(c, inner)
    t[l + "1.1.weight"] = rnd(4 * c, c)
    t[l + "1.3.weight"] = rnd(c, 4 * c)
    names = list(unet.attn_processors.keys())
    for i, name in enumerate(names):
        module = unet.get_submodule(name.rsplit(".processor", 1)[0])
        hidden = module.to_q.in_features
        cross = name.endswith("attn2.processor")
        ctx_w = c if cross else hidden
        q = f"SAA_module.{i}."
        for n in ("to_q_lora", "to_k_lora", "to_v_lora", "to_out_lora"):
            kv = n in ("to_k_lora", "to_v_lora")
            t[q + n + ".down.weight"] = rnd(2, ctx_w if kv else hidden)
            t[q + n + ".up.weight"] = rnd(hidden, 2)
        if cross:
            t[q + "to_k_ip.weight"] = rnd(hidden, c)
            t[q + "to_v_ip.weight"] = rnd(hidden, c)
    save_file({k: v.half() for k, v in t.items()}, out / "SAA.safetensors",
              metadata={"note": "random weights for tests; processor order " + json.dumps(names)})

    # IMR and KeyPointEncoder (key names as the released state dicts).
    dim, emb, txt, nq = 64, c, 16, 4
    m = {}
    m["feature_fusion.0.weight"] = rnd(emb + txt, scale=0.1, offset=1.0)
    m["feature_fusion.0.bias"] = rnd(emb + txt, scale=0.1)
    m["feature_fusion.1.weight"] = rnd(dim, emb + txt)
    m["feature_fusion.1.bias"] = rnd(dim)
    m["feature_fusion.3.weight"] = rnd(dim, scale=0.1, offset=1.0)
    m["feature_fusion.3.bias"] = rnd(dim, scale=0.1)
    m["feature_fusion.4.weight"] = rnd(nq * dim, dim, scale=0.1)
    m["feature_fusion.4.bias"] = rnd(nq * dim)
    for n, w in (("norm_in", emb), ("norm_out", dim)):
        m[n + ".weight"] = rnd(w, scale=0.1, offset=1.0)
        m[n + ".bias"] = rnd(w, scale=0.1)
    m["proj_in.weight"] = rnd(dim, emb)
    m["proj_in.bias"] = rnd(dim)
    m["proj_out.weight"] = rnd(emb, dim, scale=0.1)
    m["proj_out.bias"] = rnd(emb)
    for net in ("disentangleNet", "entangleNet"):
        b = f"{net}.0."
        for n in ("0.norm1", "0.norm2", "1.norm1", "2.0"):
            m[b + n + ".weight"] = rnd(dim, scale=0.1, offset=1.0)
            m[b + n + ".bias"] = rnd(dim, scale=0.1)
        for a in ("0", "1"):
            m[b + a + ".to_q.weight"] = rnd(64, dim, scale=0.1)
            m[b + a + ".to_kv.weight"] = rnd(128, dim, scale=0.1)
            m[b + a + ".to_out.weight"] = rnd(dim, 64, scale=0.1)
        m[b + "2.1.weight"] = rnd(4 * dim, dim, scale=0.1)
        m[b + "2.3.weight"] = rnd(dim, 4 * dim, scale=0.1)
    save_file({k: v.half() for k, v in m.items()}, out / "IMR.safetensors")
    layout = [[(7, False)], [(3, False), (3, True), (3, True)], [(3, False), (3, True), (3, True), (3, True)],
              [(3, False), (3, True), (3, True)], [(3, False), (3, True), (3, True)], [(3, False), (3, True)],
              [(3, False), (1, False)]]
    k = {}
    cin = 1
    for i, block in enumerate(layout):
        for j, (kernel, _) in enumerate(block):
            cout = emb if (i == len(layout) - 1 and j == len(block) - 1) else 4
            p = f"blocks.{i}.{j}.conv_block."
            k[p + "0.weight"] = rnd(cout, cin, kernel, kernel, scale=0.5)
            k[p + "0.bias"] = rnd(cout, scale=0.1)
            k[p + "1.weight"] = rnd(cout, scale=0.1, offset=1.0)
            k[p + "1.bias"] = rnd(cout, scale=0.1)
            k[p + "1.running_mean"] = rnd(cout, scale=0.1)
            k[p + "1.running_var"] = rnd(cout, scale=0.1, offset=1.0).abs()
            cin = cout
    save_file({k2: v.half() for k2, v in k.items()}, out / "key_point_encoder.safetensors")

    rng = np.random.default_rng(7)
    for who, (h, w) in (("alice", (48, 40)), ("bob", (40, 48))):
        e = torch.from_numpy(rng.standard_normal(id_dim).astype(np.float32))
        save_file({"embedding": e / e.norm()}, out / f"{who}.safetensors")
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(xx * 255 // max(w - 1, 1)), (yy * 255 // max(h - 1, 1)),
                        rng.integers(0, 256, size=(h, w))], axis=-1).astype(np.uint8)
        Image.fromarray(img).save(out / f"{who}.png")
    pts = [(256 + 150 * np.cos(a), 256 + 180 * np.sin(a)) for a in np.linspace(0, 2 * np.pi, 106, endpoint=False)]
    (out / "alice_106.txt").write_text("".join(f"{x:.2f} {y:.2f}\n" for x, y in pts))


if __name__ == "__main__":
    main()
