#!/usr/bin/env python3
"""Writes golden cases for dynamicid's CLIP modules, computed by transformers.

Every case is one safetensors file in the golden format: `param.<key>`
weights under the checkpoint's keys, `input.<name>`, `output.<name>`, and
__metadata__["config"], a JSON object whose "module" names the transformers
class. Weights are transformers' default initialisation from
torch.manual_seed, with every bias and LayerNorm affine perturbed so that a
dropped or swapped one shows; weights, inputs and outputs are float32.

Cases:

  CLIPTextModel            config = the model's config dict (model.config);
                           input_ids (B,L) I64 -> last_hidden_state,
                           pooler_output, penultimate_hidden_state
                           (hidden_states[-2], the "clip skip" state).
      clip_text_tiny       hidden 32, 2 layers, 4 heads, vocab 1000,
                           eos_token_id 407 (first-EOS pooling, and the ids
                           hold larger ids so argmax would pick another
                           position), quick_gelu, L = 77, keys stored with the
                           "text_model." prefix of SD1.x text encoders (the
                           script checks that transformers loads them).
      clip_text_legacy_eos2 eos_token_id 2 (argmax pooling, a row with its
                           largest id twice), gelu, eps 1e-6, 3 layers,
                           L = 16 < max_position_embeddings 20, bare keys (as
                           transformers 5 saves CLIPTextModel).

  CLIPVisionModelWithProjection  config = model.config; pixel_values
                           (B,C,S,S) -> penultimate_hidden_state
                           (hidden_states[-2]), image_embeds, last_hidden_state.
      clip_vision_tiny     image 32, patch 8, hidden 32, 2 layers, 4 heads,
                           projection 24, quick_gelu, batch 2.
      clip_vision_gelu3    image 24, patch 4, hidden 24, 3 layers, 2 heads,
                           projection 16, gelu, eps 1e-6, batch 1.

  CLIPImageProcessor       config = the processor's to_dict() plus "module";
                           input image (H,W,3) U8 -> pixel_values (1,3,h,w).
                           The reference is transformers 5's default
                           CLIPImageProcessor (torchvision backend: uint8
                           antialiased bicubic resize, which follows PIL).
                           The script also reports the PIL backend's output
                           (CLIPImageProcessorPil) for comparison, and the two
                           smaller cases store it as output pixel_values_pil.
      clip_image_300x200   300 wide, 200 high, default settings (upscale to
                           336x224, crop 224).
      clip_image_97x131    97 wide, 131 high, shortest edge 64, crop 64
                           (antialiased downscale).
      clip_image_250x150   250 wide, 150 high, shortest edge 96, crop 80x96
                           (downscale, non-square crop).

A pixel of a resized 8-bit image that lands one step away from the reference
differs by 1/255/std ~ 0.015 in normalised units, so the image cases carry
atol 2e-2.

Usage (developer tool; tests never run it):

    python3 tools/golden/make_clip_goldens.py [--out tests/data/golden/clip]
"""

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import (CLIPImageProcessor, CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)


def perturb(module, seed):
    """Perturbs LayerNorm affines and biases (transformers initialises them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))


def jsonable(value):
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def config_of(model, module):
    cfg = jsonable(model.config.to_dict())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["module"] = module
    return cfg


def write(path, tensors, config):
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(config, sort_keys=True), "torch": torch.__version__,
                "transformers": transformers.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"{path}: {path.stat().st_size / 1024:.1f} KiB")


def text_case(path, seed, config, ids, key_prefix=""):
    torch.manual_seed(seed)
    model = CLIPTextModel(config).eval()
    perturb(model, seed + 1)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    state = {key_prefix + k: v.detach().clone() for k, v in model.state_dict().items()}
    if key_prefix:
        # The stored keys are the checkpoint's (SD1.x text encoders carry "text_model."):
        # transformers must load them into the same model.
        with tempfile.TemporaryDirectory() as d:
            config.save_pretrained(d)
            save_file(state, str(Path(d) / "model.safetensors"), metadata={"format": "pt"})
            again = CLIPTextModel.from_pretrained(d).eval()
            with torch.no_grad():
                check = again(input_ids=ids).last_hidden_state
            assert torch.equal(check, out.last_hidden_state), "transformers did not load the prefixed keys"
    tensors = {"param." + k: v for k, v in state.items()}
    tensors.update({"input.input_ids": ids.to(torch.int64), "output.last_hidden_state": out.last_hidden_state,
                    "output.pooler_output": out.pooler_output,
                    "output.penultimate_hidden_state": out.hidden_states[-2]})
    write(path, tensors, config_of(model, "CLIPTextModel"))


def vision_case(path, seed, config, batch):
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(config).eval()
    perturb(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size, generator=g)
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
        # hidden_states[0] is the encoder's input: the embeddings after pre_layrnorm.
        vm = model.vision_model
        first = vm.pre_layrnorm(vm.embeddings(pixels))
    assert torch.allclose(out.hidden_states[0], first)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    tensors = {"param." + k: v.detach().clone() for k, v in model.state_dict().items()}
    tensors.update({"input.pixel_values": pixels, "output.penultimate_hidden_state": out.hidden_states[-2],
                    "output.image_embeds": out.image_embeds, "output.last_hidden_state": out.last_hidden_state})
    write(path, tensors, config_of(model, "CLIPVisionModelWithProjection"))


def synthetic_image(seed, height, width):
    """Gradients, a hard-edged checkerboard and noise: exercises ringing and antialiasing."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 255 * x / max(width - 1, 1)
    gch = 255 * (0.5 + 0.5 * np.sin(y / 5.0 + x / 9.0))
    b = np.where(((y // 7) + (x // 7)) % 2 == 0, 250.0, 5.0)
    img = np.stack([r, gch, b], axis=-1) + rng.normal(0, 12, size=(height, width, 3))
    img[height // 3: height // 3 + 4, :, :] = 255  # a bright bar
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def image_case(path, seed, width, height, keep_pil=False, **settings):
    image = synthetic_image(seed, height, width)
    proc = CLIPImageProcessor(**settings)
    ref = proc(images=image, return_tensors="pt")["pixel_values"]
    pil = CLIPImageProcessorPil(**settings)(images=image, return_tensors="pt")["pixel_values"]
    diff = (ref - pil).abs()
    print(f"  torchvision vs PIL backend: max {diff.max().item():.3g}, pixels differing "
          f"{(diff > 1e-5).float().mean().item() * 100:.2f}%")
    cfg = jsonable(proc.to_dict())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update({"module": "CLIPImageProcessor", "atol": 2e-2, "rtol": 0.0})
    tensors = {"input.image": torch.from_numpy(image), "output.pixel_values": ref.to(torch.float32)}
    if keep_pil:
        tensors["output.pixel_values_pil"] = pil.to(torch.float32)
    write(path, tensors, cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/golden/clip")
    out = Path(ap.parse_args().out)

    # Text, first-EOS pooling: eos 407 below the largest ids present.
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16,
                         bos_token_id=406, eos_token_id=407, pad_token_id=1)
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(500, 1000, (2, 77), generator=g)
    ids[:, 0] = 406
    ids[0, 9] = 407
    ids[0, 10:] = 407  # padded with EOS, as the SD tokenizer pads: the first EOS counts
    ids[1, 40] = 407
    ids[1, 41:] = 1
    text_case(out / "clip_text_tiny.safetensors", 100, cfg, ids, key_prefix="text_model.")

    # Text, legacy eos_token_id == 2: argmax of the ids.
    cfg = CLIPTextConfig(vocab_size=300, hidden_size=24, intermediate_size=40, num_attention_heads=3,
                         num_hidden_layers=3, max_position_embeddings=20, hidden_act="gelu", layer_norm_eps=1e-6,
                         projection_dim=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    g = torch.Generator().manual_seed(12)
    ids = torch.randint(3, 290, (3, 16), generator=g)
    ids[0, 5] = 299
    ids[0, 6:] = 1
    ids[1, 3] = 298
    ids[1, 11] = 298  # ties: the first maximum
    ids[2, 15] = 299
    text_case(out / "clip_text_legacy_eos2.safetensors", 200, cfg, ids)

    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                            image_size=32, patch_size=8, projection_dim=24, hidden_act="quick_gelu")
    vision_case(out / "clip_vision_tiny.safetensors", 300, vcfg, batch=2)
    vcfg = CLIPVisionConfig(hidden_size=24, intermediate_size=50, num_attention_heads=2, num_hidden_layers=3,
                            image_size=24, patch_size=4, projection_dim=16, hidden_act="gelu", layer_norm_eps=1e-6)
    vision_case(out / "clip_vision_gelu3.safetensors", 400, vcfg, batch=1)

    image_case(out / "clip_image_300x200.safetensors", 500, 300, 200)
    image_case(out / "clip_image_97x131.safetensors", 501, 97, 131, keep_pil=True, size={"shortest_edge": 64},
               crop_size={"height": 64, "width": 64})
    image_case(out / "clip_image_250x150.safetensors", 502, 250, 150, keep_pil=True, size={"shortest_edge": 96},
               crop_size={"height": 80, "width": 96})


if __name__ == "__main__":
    main()
