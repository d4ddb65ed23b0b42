#!/usr/bin/env python3
"""Writes golden cases for dynamicid's VAE (diffusers AutoencoderKL).

Every case is one safetensors file in the golden format: `param.<key>` weights
under diffusers' state-dict keys, `input.<name>`, `output.<name>`, and
__metadata__["config"], a JSON object whose "module" names the call and whose
other keys are the model's own config dict (vae.config).

Weights are diffusers' default initialisation from torch.manual_seed, with the
normalisation affines and every bias perturbed so that a dropped or swapped
bias shows. Weights are rounded to float16 (stored as F16) *before* the
reference runs, so the float32 reference computed exactly on the stored
values; inputs and outputs are float32.

Only the half of the model a call uses is stored (encoder.* and quant_conv.*
for encode; post_quant_conv.* and decoder.* for decode) to keep the files small.

Cases:

  AutoencoderKL.encode   input image (B,3,H,W) in [-1, 1] -> outputs mean and
                         logvar of vae.encode(image).latent_dist (logvar
                         already clamped to [-30, 20] by diffusers).
  AutoencoderKL.decode   input latents (B,latent,h,w), no scaling applied ->
                         output decoded = vae.decode(latents).sample.

      vae_2level_encode    block_out_channels (32, 64), layers_per_block 1,
                           norm_num_groups 8, latent 4, image 2x3x32x32.
      vae_2level_decode    same model, latents 2x4x16x16.
      vae_3level_decode    (16, 32, 32), layers_per_block 2, norm_num_groups 8,
                           non-square latents 1x4x6x8 (-> 24x32 image).
      vae_noattn_encode    (16, 32), layers_per_block 1, no mid-block attention,
                           no quant_conv, odd-sized image 1x3x19x26 (pins the
                           downsampler's one-sided (0, 1, 0, 1) padding).

Usage (developer tool; tests never run it):

    python3 tools/golden/make_vae_goldens.py [--out tests/data/golden/vae]
"""

import argparse
import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file


def perturb_and_round(module, seed):
    """Perturbs norm affines and biases, then rounds every weight to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):  # GroupNorm scale
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def params_of(module, prefixes):
    return {"param." + k: v.detach().half().contiguous() for k, v in module.state_dict().items() if k.startswith(prefixes)}


def jsonable(value):
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    return value


def write(path, tensors, config):
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(config, sort_keys=True), "torch": torch.__version__,
                "diffusers": diffusers.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print(f"{path}: {path.stat().st_size / 1024:.1f} KiB")


def make_vae(seed, block_out_channels, layers_per_block, **extra):
    torch.manual_seed(seed)
    n = len(block_out_channels)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                        latent_channels=4, norm_num_groups=8, **extra).eval()
    perturb_and_round(vae, seed + 1)
    return vae


def config_of(vae, module):
    cfg = jsonable(dict(vae.config))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["module"] = module
    return cfg


def encode_case(path, vae, seed, shape):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(*shape, generator=g) * 2.0 - 1.0
    with torch.no_grad():
        dist = vae.encode(image).latent_dist
    tensors = params_of(vae, ("encoder.", "quant_conv."))
    tensors.update({"input.image": image, "output.mean": dist.mean, "output.logvar": dist.logvar})
    write(path, tensors, config_of(vae, "AutoencoderKL.encode"))


def decode_case(path, vae, seed, shape):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(*shape, generator=g)
    with torch.no_grad():
        decoded = vae.decode(latents).sample
    tensors = params_of(vae, ("decoder.", "post_quant_conv."))
    tensors.update({"input.latents": latents, "output.decoded": decoded})
    write(path, tensors, config_of(vae, "AutoencoderKL.decode"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/data/golden/vae"))
    args = parser.parse_args()
    out = Path(args.out)
    torch.set_num_threads(2)

    vae = make_vae(100, (32, 64), 1)
    encode_case(out / "vae_2level_encode.safetensors", vae, 102, (2, 3, 32, 32))
    decode_case(out / "vae_2level_decode.safetensors", vae, 103, (2, 4, 16, 16))

    vae = make_vae(200, (16, 32, 32), 2)
    decode_case(out / "vae_3level_decode.safetensors", vae, 203, (1, 4, 6, 8))

    vae = make_vae(300, (16, 32), 1, mid_block_add_attention=False, use_quant_conv=False)
    encode_case(out / "vae_noattn_encode.safetensors", vae, 302, (1, 3, 19, 26))


if __name__ == "__main__":
    main()
