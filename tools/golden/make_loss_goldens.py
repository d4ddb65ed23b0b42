#!/usr/bin/env python3
"""Writes torch goldens for dynamicid's training losses that are not the
released modules' own (tests/unit/identity_grad.cpp reads them).

    weighted_mse   (weight * (prediction - target) ** 2).mean(), the anchoring
                   stage's face-weighted denoising loss, with a (N, 1, H, W)
                   weight broadcast over (N, C, H, W); gradients by autograd

Tensors are float64 computed on float32-rounded values and stored as float32:

    input.prediction, input.target, input.weight
    output.loss                    shape (1)
    grad.input.prediction, grad.input.target

__metadata__["config"] names the module.

Usage (developer tool only; tests never run it):

    pip install torch safetensors
    python3 tools/golden/make_loss_goldens.py [--out tests/data/golden/losses]
"""

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def rounded(t):
    return t.float().double()


def weighted_mse_case(out):
    g = torch.Generator().manual_seed(611)
    pred = rounded(torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    target = rounded(torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)).requires_grad_(True)
    weight = torch.ones(2, 1, 4, 5, dtype=torch.float64)
    weight[0, 0, 1:3, 2:5] = 4.0
    weight[1, 0, 0:2, 0:2] = 2.5
    weight[1, 0, 3, 4] = 0.0
    loss = (weight * (pred - target) ** 2).mean()
    loss.backward()
    tensors = {"input.prediction": pred.detach().float(), "input.target": target.detach().float(), "input.weight": weight.float(),
               "output.loss": loss.detach().float().reshape(1), "grad.input.prediction": pred.grad.float(),
               "grad.input.target": target.grad.float()}
    path = out / "weighted_mse.safetensors"
    config = {"module": "weighted_mse_loss", "formula": "(weight * (prediction - target) ** 2).mean()"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={"config": json.dumps(config, sort_keys=True), "torch": torch.__version__})
    print(f"{path}: {path.stat().st_size} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/data/golden/losses"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    weighted_mse_case(out)


if __name__ == "__main__":
    main()
