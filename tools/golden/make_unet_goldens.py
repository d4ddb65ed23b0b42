#!/usr/bin/env python3
"""Writes golden cases for dynamicid's UNet modules, computed by diffusers.

Every case is one safetensors file in the golden format (tests/data/golden
and the project's golden format notes): `param.<key>` weights under diffusers'
state-dict keys, `input.<name>`, `output.<name>`, and __metadata__["config"],
a JSON object whose "module" names the diffusers class.

Weights are diffusers' default initialisation from torch.manual_seed, with the
normalisation affines and every bias perturbed so that a dropped or swapped
bias shows. Weights are rounded to float16 (stored as F16) *before* the
reference runs, so the float32 reference computed exactly on the stored
values; inputs and outputs are float32.

Cases and their config keys:

  UNet2DConditionModel   config = the model's own config dict (unet.config),
                         plus "attn_processors": the keys of
                         unet.attn_processors in diffusers' order.
                         inputs sample (B,4,h,w), timestep (B,) float32,
                         encoder_hidden_states (B,L,D) -> output sample.
      unet_tiny_2level   block_out_channels (32, 64), layers_per_block 1,
                         attention_head_dim 8, cross_attention_dim 32,
                         norm_num_groups 8, (CrossAttnDown, Down) / (Up,
                         CrossAttnUp), 16x16, batch 2.
      unet_tiny_3level   (16, 16, 32), layers_per_block 2, per-block
                         attention_head_dim [2, 4, 8], linear projections,
                         flip_sin_to_cos false, freq_shift 1, norm_eps 1e-6,
                         transformer_layers_per_block 2, non-square 8x16, batch 1.

  ResnetBlock2D          keys in_channels, out_channels, temb_channels, groups,
                         eps, output_scale_factor; inputs x (B,C,H,W), temb
                         (B,temb_channels) -> output y.
  Transformer2DModel     keys num_attention_heads, attention_head_dim,
                         in_channels, cross_attention_dim, norm_num_groups,
                         use_linear_projection, num_layers; inputs
                         hidden_states (B,C,H,W), encoder_hidden_states (B,L,D)
                         -> output sample.

The narrow block cases (width 64) keep the everyday files small; `--sd15 DIR`
also writes the SD1.5-width cases (ResnetBlock2D 320->320 and 320->640 with
conv_shortcut, Transformer2DModel 8 heads of 40 with 768-wide text). Their
committed copies (about 23 MB) sit in tests/data/golden/unet/ next to the
others, so the unit tests and the conformance CLI run them too.

Usage (developer tool; tests never run it):

    python3 tools/golden/make_unet_goldens.py [--out tests/data/golden/unet] [--sd15 tests/data/golden/unet]
"""

import argparse
import json
from pathlib import Path

import diffusers
import torch
from diffusers import Transformer2DModel, UNet2DConditionModel
from diffusers.models.resnet import ResnetBlock2D
from safetensors.torch import save_file


def perturb_and_round(module, seed):
    """Perturbs norm affines and biases, then rounds every weight to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):  # GroupNorm / LayerNorm scale
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def params_of(module):
    return {"param." + k: v.detach().half().contiguous() for k, v in module.state_dict().items()}


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


def unet_case(path, seed, config, batch, height, width, text_len, timesteps):
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config).eval()
    perturb_and_round(unet, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    sample = torch.randn(batch, unet.config.in_channels, height, width, generator=g)
    text = torch.randn(batch, text_len, unet.config.cross_attention_dim, generator=g)
    timestep = torch.tensor(timesteps, dtype=torch.float32)
    with torch.no_grad():
        out = unet(sample, timestep, encoder_hidden_states=text).sample
    cfg = jsonable(dict(unet.config))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg["module"] = "UNet2DConditionModel"
    cfg["attn_processors"] = list(unet.attn_processors.keys())
    tensors = params_of(unet)
    tensors.update({"input.sample": sample, "input.timestep": timestep, "input.encoder_hidden_states": text,
                    "output.sample": out})
    write(path, tensors, cfg)


def resnet_case(path, seed, in_channels, out_channels, temb_channels, groups, eps, size, batch=1, output_scale_factor=1.0):
    torch.manual_seed(seed)
    block = ResnetBlock2D(in_channels=in_channels, out_channels=out_channels, temb_channels=temb_channels, groups=groups,
                          eps=eps, output_scale_factor=output_scale_factor).eval()
    perturb_and_round(block, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    temb = torch.randn(batch, temb_channels, generator=g)
    with torch.no_grad():
        y = block(x, temb)
    cfg = {"module": "ResnetBlock2D", "in_channels": in_channels, "out_channels": out_channels,
           "temb_channels": temb_channels, "groups": groups, "eps": eps, "output_scale_factor": output_scale_factor}
    tensors = params_of(block)
    tensors.update({"input.x": x, "input.temb": temb, "output.y": y})
    write(path, tensors, cfg)


def transformer_case(path, seed, heads, dim_head, in_channels, cross_dim, groups, linear, layers, size, text_len, batch=1):
    torch.manual_seed(seed)
    model = Transformer2DModel(num_attention_heads=heads, attention_head_dim=dim_head, in_channels=in_channels,
                               num_layers=layers, cross_attention_dim=cross_dim, norm_num_groups=groups,
                               use_linear_projection=linear).eval()
    perturb_and_round(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(batch, in_channels, size, size, generator=g)
    text = torch.randn(batch, text_len, cross_dim, generator=g)
    with torch.no_grad():
        y = model(x, encoder_hidden_states=text).sample
    cfg = {"module": "Transformer2DModel", "num_attention_heads": heads, "attention_head_dim": dim_head,
           "in_channels": in_channels, "cross_attention_dim": cross_dim, "norm_num_groups": groups,
           "use_linear_projection": linear, "num_layers": layers}
    tensors = params_of(model)
    tensors.update({"input.hidden_states": x, "input.encoder_hidden_states": text, "output.sample": y})
    write(path, tensors, cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/golden/unet")
    ap.add_argument("--sd15", default=None, help="also write the SD1.5-width block cases here")
    args = ap.parse_args()
    out = Path(args.out)

    unet_case(out / "unet_tiny_2level.safetensors", 100, dict(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8),
        batch=2, height=16, width=16, text_len=7, timesteps=[999.0, 17.5])
    unet_case(out / "unet_tiny_3level.safetensors", 200, dict(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 16, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=[2, 4, 8], cross_attention_dim=24, norm_num_groups=8, norm_eps=1e-6,
        use_linear_projection=True, flip_sin_to_cos=False, freq_shift=1, transformer_layers_per_block=2),
        batch=1, height=8, width=16, text_len=5, timesteps=[421.0])

    resnet_case(out / "resnet_64.safetensors", 300, 64, 64, 256, 32, 1e-5, 8)
    resnet_case(out / "resnet_64_128_shortcut.safetensors", 301, 64, 128, 256, 32, 1e-5, 8, batch=2)
    transformer_case(out / "transformer_2d_conv.safetensors", 400, 4, 16, 64, 48, 32, False, 1, 8, 11)
    transformer_case(out / "transformer_2d_linear.safetensors", 401, 2, 16, 32, 40, 8, True, 2, 6, 9, batch=2)

    if args.sd15:
        sd = Path(args.sd15)
        resnet_case(sd / "sd15_resnet_320.safetensors", 500, 320, 320, 1280, 32, 1e-5, 8)
        resnet_case(sd / "sd15_resnet_320_640.safetensors", 501, 320, 640, 1280, 32, 1e-5, 8)
        transformer_case(sd / "sd15_transformer_320.safetensors", 502, 8, 40, 320, 768, 32, False, 1, 8, 77)


if __name__ == "__main__":
    main()
