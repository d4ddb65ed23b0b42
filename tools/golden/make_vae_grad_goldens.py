#!/usr/bin/env python3
"""Writes the torch-autograd golden of the VAE's training backward, read by
tests/unit/vae_grad.cpp (tests/data/golden/base_grad/vae_grad.safetensors).

A tiny random diffusers AutoencoderKL (block_out_channels (8, 16), one layer
per block, GroupNorm(4), 4 latent channels, mid-block attention, quant and
post-quant convolutions); weights randomised with norm scales near 1 and every
bias non-zero, rounded to float16 values. In float64:

    dist  = vae.encode(image).latent_dist          (logvar clamped by diffusers)
    z     = dist.mean + dist.std * noise           (reparameterised, fixed noise)
    recon = vae.decode(z).sample
    loss  = mse(recon, image) + beta * dist.kl().mean()

Keys (float32):
    vae.<key>                  the weights (diffusers' state-dict keys)
    input.image, input.noise
    output.mean, output.logvar, output.recon, output.kl (N,), output.loss (1,)
    grad.image, grad.vae.<key> d loss / d (image, every weight)
__metadata__["config"]: {"vae": the VAE config, "beta": beta}

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_vae_grad_goldens.py [--out tests/data/golden/base_grad]
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from safetensors.torch import save_file

VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                  norm_num_groups=4, sample_size=8)
BETA = 0.25


def randomise(module, seed):
    """Norm scales near 1, small non-zero biases, fan-in scaled matrices; float16-representable values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.8 * torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            p.copy_(p.half().float())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/golden/base_grad")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CONFIG)
    randomise(vae, 51)
    vae = vae.double()
    g = torch.Generator().manual_seed(52)
    image = torch.randn(2, 3, 8, 8, generator=g).clamp(-1, 1).double().requires_grad_(True)
    noise = torch.randn(2, 4, 4, 4, generator=g).double()
    dist = vae.encode(image).latent_dist
    z = dist.mean + dist.std * noise
    recon = vae.decode(z).sample
    kl = dist.kl()
    loss = F.mse_loss(recon, image) + BETA * kl.mean()
    loss.backward()

    t = {f"vae.{k}": v for k, v in vae.state_dict().items()}
    t.update({f"grad.vae.{k}": p.grad for k, p in vae.named_parameters()})
    missing = [k for k, p in vae.named_parameters() if p.grad is None]
    assert not missing, missing
    t.update({"input.image": image, "input.noise": noise, "output.mean": dist.mean, "output.logvar": dist.logvar,
              "output.recon": recon, "output.kl": kl, "output.loss": loss.reshape(1), "grad.image": image.grad})
    t = {k: v.detach().float().contiguous() for k, v in t.items()}
    cfg = json.loads(json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}, default=list))
    path = out / "vae_grad.safetensors"
    save_file(t, str(path), metadata={"config": json.dumps({"vae": cfg, "beta": BETA}, sort_keys=True)})
    print(path, path.stat().st_size, "bytes;", len(list(vae.named_parameters())), "parameters; loss", float(loss.detach()),
          "kl", kl.detach().tolist())


if __name__ == "__main__":
    main()
