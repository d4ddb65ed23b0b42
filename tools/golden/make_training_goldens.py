#!/usr/bin/env python3
"""Writes the torch-autograd goldens of the training backward passes, read by
tests/unit/training_unet.cpp (tests/data/golden/training/).

Files (float32 tensors; settings in __metadata__["config"]):

    resnet.safetensors             diffusers ResnetBlock2D (8 -> 16 channels, 1x1 shortcut, temb 8)
    transformer_block.safetensors  diffusers BasicTransformerBlock (dim 8, 2 heads of 4, context 6, GEGLU)
    transformer_2d.safetensors     diffusers Transformer2DModel (linear projections, 2 layers); weights only,
                                   for the central-difference checks
    unet_saa.safetensors           a tiny random UNet2DConditionModel with the authors' SAProcessor (attn1)
                                   and SAAProcessor (attn2) installed as the released set_ip_adapter() does
                                   (two identities, two boxes, gating on, layout boost active)

Block files hold param.* (weights), input.* and input.r (a random cotangent);
the loss is sum(output * r) and grad.* are its gradients w.r.t. the inputs.
unet_saa holds unet.* (UNet weights), proc.<i>.* (processor weights, the
released SAA_module keys), input.sample, input.encoder_hidden_states (text
then 4 tokens per identity), input.target, input.timestep; the loss is
mean((unet(sample) - target)^2), and output.loss, grad.sample,
grad.encoder_hidden_states and grad.proc.<i>.* are its value and gradients.
Gradients come from torch autograd in float64 through the authors' code
(imported at generation time from their repository; nothing of it is stored
here), so they include the gate's path through the min-max normalisation.

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_training_goldens.py --repo /path/to/DynamicID.git [--out tests/data/golden/training]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_dynamicid_e2e as e2e  # noqa: E402  (import_released, randomise, install_processors)

UNET_CONFIG = dict(e2e.UNET_CONFIG, sample_size=8, block_out_channels=(8, 16), attention_head_dim=2, cross_attention_dim=16,
                   norm_num_groups=4)
TEXT_LEN, ID_NUM = 5, 2
SAA_SETTINGS = dict(bbox=[[0.0, 0.0, 1.0, 0.5], [0.25, 0.5, 0.9, 1.0]], activate_query=True, infer_scale=2.0, infer_end=2,
                    mix_scale=None, id_scale=1.0, id_num=ID_NUM)


def f32(d):
    return {k: v.detach().float().contiguous() for k, v in d.items()}


def block_case(module, inputs, config, seed):
    """Runs module(*inputs) in float64 and returns the golden tensors."""
    e2e.randomise(module, seed)
    module = module.double()
    g = torch.Generator().manual_seed(seed + 1)
    xs = {k: v.double().requires_grad_(True) for k, v in inputs.items()}
    y = module(*xs.values()) if not isinstance(module, BasicTransformerBlock) else module(
        xs["tokens"], encoder_hidden_states=xs["text"])
    y = y.sample if hasattr(y, "sample") else y
    r = torch.randn(y.shape, generator=g, dtype=torch.float64)
    (y * r).sum().backward()
    out = {f"param.{k}": v for k, v in module.state_dict().items()}
    out.update({f"input.{k}": v for k, v in xs.items()})
    out["input.r"] = r
    out["output.y"] = y
    out.update({f"grad.{k}": v.grad for k, v in xs.items()})
    return f32(out), {"config": json.dumps(config)}


def unet_case(attention, seed):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    e2e.randomise(unet, seed)
    procs = e2e.install_processors(unet, attention)
    e2e.randomise(procs, seed + 1)  # LoRA up starts at zero in the released init: randomise everything
    unet = unet.double()
    procs = procs.double()
    e2e.enable_processor(unet, attention, SAA_SETTINGS)

    margins = []
    original = attention.SAAProcessor.compute_activate_weight

    def recording(self, score, bboxs):
        with torch.no_grad():
            bsz, _, q, _ = score.shape
            w = score.permute(0, 2, 1, 3).reshape(bsz, q, -1).sum(-1)
            srt = w.sort(dim=1).values
            norm = (w - srt[:, :1]) / (srt[:, -1:] - srt[:, :1])
            margins.append(min(float((norm - 0.3).abs().min()), float((srt[:, 1] - srt[:, 0]).min() / (srt[:, -1] - srt[:, 0]).min()),
                               float((srt[:, -1] - srt[:, -2]).min() / (srt[:, -1] - srt[:, 0]).min())))
        return original(self, score, bboxs)

    attention.SAAProcessor.compute_activate_weight = recording
    g = torch.Generator().manual_seed(seed + 2)
    batch, ctx = 2, UNET_CONFIG["cross_attention_dim"]
    sample = torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64).float().double().requires_grad_(True)
    states = torch.randn(batch, TEXT_LEN + 4 * ID_NUM, ctx, generator=g, dtype=torch.float64).float().double().requires_grad_(True)
    target = torch.randn(batch, 4, 8, 8, generator=g, dtype=torch.float64).float().double()
    timestep = torch.tensor([401.0, 401.0], dtype=torch.float64)
    eps = unet(sample, timestep, encoder_hidden_states=states).sample
    loss = ((eps - target) ** 2).mean()
    loss.backward()
    attention.SAAProcessor.compute_activate_weight = original
    print(f"unet_saa: loss {float(loss.detach()):.6f}, smallest gate margin (threshold / arg-min / arg-max) {min(margins):.2e}")

    out = {f"unet.{k}": v for k, v in unet.state_dict().items() if ".processor." not in k}
    for k, v in procs.state_dict().items():
        out[f"proc.{k}"] = v
    for name, p in procs.named_parameters():
        out[f"grad.proc.{name}"] = p.grad
    out.update({"input.sample": sample, "input.encoder_hidden_states": states, "input.target": target,
                "input.timestep": timestep, "output.eps": eps, "output.loss": loss.reshape(1),
                "grad.sample": sample.grad, "grad.encoder_hidden_states": states.grad})
    cfg = dict(unet=UNET_CONFIG, text_tokens=TEXT_LEN, tokens_per_id=4, **SAA_SETTINGS, gate_margin=min(margins))
    return f32(out), {"config": json.dumps(cfg)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="git directory of ByteCat-bot/DynamicID")
    ap.add_argument("--out", default="tests/data/golden/training")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    g = torch.Generator().manual_seed(5)
    resnet_cfg = dict(in_channels=8, out_channels=16, temb_channels=8, groups=4, eps=1e-5)
    resnet = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=8, groups=4, eps=1e-5)
    t, m = block_case(resnet, {"x": torch.randn(2, 8, 4, 4, generator=g), "temb": torch.randn(2, 8, generator=g)}, resnet_cfg, 21)
    save_file(t, out / "resnet.safetensors", metadata=m)

    block_cfg = dict(dim=8, num_attention_heads=2, attention_head_dim=4, cross_attention_dim=6)
    block = BasicTransformerBlock(8, 2, 4, cross_attention_dim=6, activation_fn="geglu")
    t, m = block_case(block, {"tokens": torch.randn(2, 9, 8, generator=g), "text": torch.randn(2, 3, 6, generator=g)}, block_cfg, 22)
    save_file(t, out / "transformer_block.safetensors", metadata=m)

    t2d_cfg = dict(num_attention_heads=2, attention_head_dim=4, in_channels=8, num_layers=2, cross_attention_dim=6, norm_num_groups=4,
                   use_linear_projection=True)
    t2d = Transformer2DModel(**t2d_cfg)
    t, m = block_case(t2d, {"x": torch.randn(1, 8, 3, 3, generator=g), "text": torch.randn(1, 3, 6, generator=g)}, t2d_cfg, 23)
    save_file({k: v for k, v in t.items() if k.startswith("param.")}, out / "transformer_2d.safetensors", metadata=m)

    with tempfile.TemporaryDirectory() as tmp:
        attention, _ = e2e.import_released(args.repo, Path(tmp))
        t, m = unet_case(attention, 31)
    save_file(t, out / "unet_saa.safetensors", metadata=m)
    for f in sorted(out.glob("*.safetensors")):
        print(f, f.stat().st_size)


if __name__ == "__main__":
    main()
