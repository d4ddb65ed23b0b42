#!/usr/bin/env python3
"""Writes the torch-autograd golden of the UNet's parameter gradients, read by
tests/unit/unet_param_grad.cpp (tests/data/golden/base_grad/unet_param_grad.safetensors).

A tiny random diffusers UNet2DConditionModel (the two-level layout the
training goldens use: block_out_channels (8, 16), one layer per block, cross
attention 16 wide, GroupNorm(4)); weights randomised with norm scales near 1
and every bias non-zero, rounded to float16 values so that float32 and
float64 runs see the same model. The loss is sum(unet(sample, t, states) * r)
for a fixed random r, computed in float64.

Keys (float32):
    unet.<key>                     the UNet's weights (diffusers' state-dict keys)
    input.sample, input.encoder_hidden_states, input.timestep, input.r
    output.loss (1,)
    grad.sample, grad.encoder_hidden_states
    grad.unet.<key>                d loss / d weight for every parameter
__metadata__["config"]: {"unet": the UNet config}

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_unet_param_grad_goldens.py [--out tests/data/golden/base_grad]
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

UNET_CONFIG = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                   down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                   attention_head_dim=2, cross_attention_dim=16, norm_num_groups=4)


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
                fan_in = p[0].numel()
                p.copy_(0.8 * torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            p.copy_(p.half().float())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/golden/base_grad")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    randomise(unet, 41)
    unet = unet.double()
    g = torch.Generator().manual_seed(42)
    # Inputs are float32 values (what the test uploads), differentiated in float64.
    sample = torch.randn(2, 4, 8, 8, generator=g).double().requires_grad_(True)
    states = torch.randn(2, 5, UNET_CONFIG["cross_attention_dim"], generator=g).double().requires_grad_(True)
    timestep = torch.tensor([401.0, 17.0], dtype=torch.float64)
    eps = unet(sample, timestep, encoder_hidden_states=states).sample
    r = torch.randn(eps.shape, generator=g).double()
    loss = (eps * r).sum()
    loss.backward()

    t = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    t.update({f"grad.unet.{k}": p.grad for k, p in unet.named_parameters()})
    missing = [k for k, p in unet.named_parameters() if p.grad is None]
    assert not missing, missing
    t.update({"input.sample": sample, "input.encoder_hidden_states": states, "input.timestep": timestep, "input.r": r,
              "output.loss": loss.reshape(1), "grad.sample": sample.grad, "grad.encoder_hidden_states": states.grad})
    t = {k: v.detach().float().contiguous() for k, v in t.items()}
    cfg = json.loads(json.dumps({k: v for k, v in dict(unet.config).items() if not k.startswith("_")}, default=list))
    path = out / "unet_param_grad.safetensors"
    save_file(t, str(path), metadata={"config": json.dumps({"unet": cfg}, sort_keys=True)})
    print(path, path.stat().st_size, "bytes;", len(list(unet.named_parameters())), "parameters; loss", float(loss.detach()))


if __name__ == "__main__":
    main()
