#!/usr/bin/env python3
"""Writes the DynamicID end-to-end fixtures read by tests/unit/dynamicid_pipeline.cpp.

A tiny random-weight diffusers UNet2DConditionModel (the two-level layout of
make_unet_goldens.py's unet_tiny_2level with narrower blocks and a 64-wide
context, since the released ProjPlusModel needs cross_attention_dim >= 64)
gets the authors' own attention processors, SAAProcessor on every attn2 and
SAProcessor on every attn1, installed exactly as the released pipeline's
set_ip_adapter() does. The processor and projection classes are imported at
generation time from the authors' repository (ByteCat-bot/DynamicID, commit
0cd30a5, attention.py and functions.py; the unused imports of functions.py,
einops/cv2/matplotlib, are replaced by empty stand-in modules). Nothing of
that repository is stored here.

Each case then runs the released pipeline's denoising loop (DDIM with the
SD1.5 scheduler settings, batched classifier-free guidance [uncond, cond],
the processor counters reset per generation as enable_processor() does) from
fixed latents, with identity tokens from a tiny random ProjPlusModel:

    cond tokens   = concat_i proj(arcface_i, clip_i)                       (1, 4 n, 64)
    uncond tokens = proj(zeros, clip_uncond) repeated n times              (1, 4 n, 64)
    states        = [text_uncond ; uncond tokens], [text_cond ; cond tokens]

Files (tests/data/dynamicid_e2e/):

    unet.safetensors   the UNet's weights (float16 values) + its config in
                       __metadata__["config"]
    SAA.bin            torch.save({"proj_module": ..., "SAA_module": ...}) as the
                       released SAA.bin is laid out (float16 tensors)
    cases.safetensors  per case <case>.input.* (arcface, clip, clip_uncond,
                       text_cond, text_uncond, latents), <case>.output.*
                       (id_tokens, uncond_tokens, latents_step<k>, eps_step0),
                       cases and settings in __metadata__["cases"]

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_dynamicid_e2e.py --repo /path/to/DynamicID.git [--out tests/data/dynamicid_e2e]

--repo is a clone (or bare git directory) of the authors' repository.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from safetensors.torch import save_file

RELEASED_COMMIT = "0cd30a5"

UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=4, cross_attention_dim=64, norm_num_groups=8)

# SD1.5's scheduler (the released pipeline's DDIM settings).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                        prediction_type="epsilon")

ID_DIM, CLIP_DIM, CLIP_LEN, TEXT_LEN, LORA_RANK = 16, 24, 5, 7, 4

CASES = [
    # name, id_num, bbox (None: vertical strips), activate_query, infer_scale, infer_end, mix_scale, id_scale, guidance, steps
    dict(name="two_ids_boxes", id_num=2, bbox=[[0.0, 0.0, 1.0, 0.5], [0.25, 0.5, 0.9, 1.0]], activate_query=True,
         infer_scale=2.0, infer_end=2, mix_scale=None, id_scale=1.0, guidance=5.0, steps=4, seed=11),
    dict(name="id_mix", id_num=2, bbox=[[0.1, 0.2, 0.8, 0.9]], activate_query=True,
         infer_scale=4.0, infer_end=1, mix_scale=0.7, id_scale=1.0, guidance=5.0, steps=3, seed=12),
    dict(name="single_default_strips", id_num=1, bbox=None, activate_query=True,
         infer_scale=4.0, infer_end=3, mix_scale=None, id_scale=1.0, guidance=5.0, steps=4, seed=13),
    dict(name="no_gating", id_num=2, bbox=None, activate_query=False,
         infer_scale=4.0, infer_end=3, mix_scale=None, id_scale=0.8, guidance=3.0, steps=2, seed=14),
]


def import_released(repo, workdir):
    """Imports attention.py and functions.py of the released commit from `repo`."""
    for name in ("attention.py", "functions.py"):
        text = subprocess.run(["git", f"--git-dir={repo}", "show", f"{RELEASED_COMMIT}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (workdir / name).write_text(text)
    # functions.py imports libraries only its plotting/utility helpers use.
    for stub in ("einops", "einops.layers", "einops.layers.torch", "cv2", "matplotlib", "matplotlib.pyplot"):
        if stub not in sys.modules:
            try:
                __import__(stub)
            except ImportError:
                m = types.ModuleType(stub)
                m.rearrange = m.Rearrange = None
                sys.modules[stub] = m
    sys.path.insert(0, str(workdir))
    import attention  # noqa: E402  (the authors' SAAProcessor / SAProcessor)
    import functions  # noqa: E402  (the authors' ProjPlusModel)
    return attention, functions


def randomise(module, seed, scale=0.2):
    """Random weights (norm scales near 1), rounded to float16 values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1] if p.dim() >= 2 else 1
                p.copy_(scale * torch.randn(p.shape, generator=g) / max(1.0, fan_in ** 0.5) * 2.0)
            p.copy_(p.half().float())


def install_processors(unet, attention):
    """The released set_ip_adapter(), with a tiny LoRA rank."""
    procs = {}
    for name in unet.attn_processors.keys():
        cross = None if name.endswith("attn1.processor") else unet.config.cross_attention_dim
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name[len("up_blocks.")])]
        else:
            hidden = unet.config.block_out_channels[int(name[len("down_blocks.")])]
        if cross is None:
            procs[name] = attention.SAProcessor(hidden_size=hidden, cross_attention_dim=cross, rank=LORA_RANK)
        else:
            procs[name] = attention.SAAProcessor(hidden_size=hidden, cross_attention_dim=cross, scale=1.0, rank=LORA_RANK,
                                                 num_tokens=4)
    unet.set_attn_processor(procs)
    return torch.nn.ModuleList(unet.attn_processors.values())


def enable_processor(unet, attention, c):
    """The released enable_processor() (square images: no root size)."""
    bbox = c["bbox"]
    if bbox is None:
        bbox = [[0, i / c["id_num"], 1, (i + 1) / c["id_num"]] for i in range(c["id_num"])]
    for p in unet.attn_processors.values():
        if isinstance(p, attention.SAAProcessor):
            p.id_scale = c["id_scale"]
            p.attn_maps = []
            p.activate_query = c["activate_query"]
            p.record_map = False
            p.bbox = bbox
            p.id_num = c["id_num"]
            p.count = 0
            p.infer_scale = c["infer_scale"]
            p.infer_end = c["infer_end"]
            p.mix_scale = c["mix_scale"]
            p.root_img_height = None
            p.root_img_width = None


def run_case(unet, proj, attention, c, tensors):
    g = torch.Generator().manual_seed(c["seed"])
    n = c["id_num"]
    arcface = torch.nn.functional.normalize(torch.randn(n, ID_DIM, generator=g), dim=-1)
    clip = torch.randn(n, CLIP_LEN, CLIP_DIM, generator=g)
    clip_uncond = torch.randn(1, CLIP_LEN, CLIP_DIM, generator=g)  # stands for CLIP features of the all-zero image
    text_cond = torch.randn(1, TEXT_LEN, UNET_CONFIG["cross_attention_dim"], generator=g)
    text_uncond = torch.randn(1, TEXT_LEN, UNET_CONFIG["cross_attention_dim"], generator=g)
    latents = torch.randn(1, 4, 16, 16, generator=g)

    with torch.no_grad():
        id_tokens = torch.cat([proj(arcface[i:i + 1], clip[i:i + 1]) for i in range(n)], dim=1)
        uncond_one = proj(torch.zeros(1, ID_DIM), clip_uncond)
        uncond_tokens = torch.cat([uncond_one] * n, dim=1)
        states = torch.cat([torch.cat([text_uncond, uncond_tokens], dim=1), torch.cat([text_cond, id_tokens], dim=1)])

        enable_processor(unet, attention, c)
        sched = DDIMScheduler(**SCHEDULER_CONFIG)
        sched.set_timesteps(c["steps"])
        x = latents * sched.init_noise_sigma
        p = c["name"]
        for i, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(torch.cat([x] * 2), t)
            eps = unet(inp, t, encoder_hidden_states=states).sample
            u, cnd = eps.chunk(2)
            eps = u + c["guidance"] * (cnd - u)
            if i == 0:
                tensors[f"{p}.output.eps_step0"] = eps
            x = sched.step(eps, t, x, eta=0.0).prev_sample
            tensors[f"{p}.output.latents_step{i}"] = x
        timesteps = [int(t) for t in sched.timesteps]

    tensors.update({f"{p}.input.arcface": arcface, f"{p}.input.clip": clip, f"{p}.input.clip_uncond": clip_uncond,
                    f"{p}.input.text_cond": text_cond, f"{p}.input.text_uncond": text_uncond, f"{p}.input.latents": latents,
                    f"{p}.output.id_tokens": id_tokens, f"{p}.output.uncond_tokens": uncond_tokens})
    return dict(c, timesteps=timesteps)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="git directory of ByteCat-bot/DynamicID")
    ap.add_argument("--out", default="tests/data/dynamicid_e2e")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        attention, functions = import_released(args.repo, Path(tmp))

        torch.manual_seed(0)
        unet = UNet2DConditionModel(**UNET_CONFIG).eval()
        randomise(unet, 1)
        unet_cfg = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
        unet_cfg = json.loads(json.dumps(unet_cfg, default=list))
        save_file({k: v.detach().half().contiguous() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"),
                  metadata={"config": json.dumps(unet_cfg, sort_keys=True), "attn_processors": json.dumps(list(unet.attn_processors.keys())),
                            "diffusers": diffusers.__version__, "torch": torch.__version__})

        procs = install_processors(unet, attention)
        randomise(procs, 2, scale=0.3)
        proj = functions.ProjPlusModel(cross_attention_dim=UNET_CONFIG["cross_attention_dim"], id_embeddings_dim=ID_DIM,
                                       clip_embeddings_dim=CLIP_DIM, num_tokens=4).eval()
        randomise(proj, 3)
        half = lambda sd: {k: v.detach().half().clone() for k, v in sd.items()}
        torch.save({"proj_module": half(proj.state_dict()), "SAA_module": half(procs.state_dict())}, str(out / "SAA.bin"))

        tensors, cases = {}, []
        for c in CASES:
            cases.append(run_case(unet, proj, attention, c, tensors))
        meta = {"cases": json.dumps(cases), "scheduler": json.dumps(SCHEDULER_CONFIG), "released_commit": RELEASED_COMMIT,
                "lora_rank": str(LORA_RANK), "diffusers": diffusers.__version__, "torch": torch.__version__}
        save_file({k: v.detach().float().contiguous() for k, v in tensors.items()}, str(out / "cases.safetensors"), metadata=meta)

    for f in sorted(out.iterdir()):
        print(f"{f}: {f.stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
