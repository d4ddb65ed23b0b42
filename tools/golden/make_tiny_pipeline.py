#!/usr/bin/env python3
"""Writes a tiny random-weight Stable Diffusion 1.x pipeline for dynamicid's tests.

Everything lands in tests/data/tiny_sd/:

  diffusers/                  StableDiffusionPipeline.save_pretrained(safe_serialization=True):
                              model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.
                              UNet and text encoder weights are stored as F16, the VAE as F32.
  single_file.safetensors     the same weights as one original (LDM / CompVis) checkpoint:
                              model.diffusion_model.*, first_stage_model.*,
                              cond_stage_model.transformer.text_model.*, all F16.
  e2e_reference.safetensors   a 3-step DDIM run of the diffusers pipeline (see below).

The model (SD1.5's layout, shrunk):
  UNet   block_out_channels (16, 32, 32), layers_per_block 2, norm_num_groups 8,
         attention_head_dim 2, cross_attention_dim 16; down blocks
         (CrossAttn, CrossAttn, Down), up blocks (Up, CrossAttn, CrossAttn), so the
         LDM output_blocks hold an upsampler both after a plain level (".1.conv")
         and after an attention level (".2.conv").
  VAE    block_out_channels (16, 32), layers_per_block 2, norm_num_groups 8, latent 4
         (image = 2 x latent), SD1.5 scaling factor.
  Text   CLIPTextModel with the real CLIP vocabulary (49408 ids), hidden 16, 2 layers,
         2 heads, intermediate 32, quick_gelu, 77 positions.
  Tokenizer  vocab.json / merges.txt derived from the shipped
         data/clip/bpe_simple_vocab_16e6.txt.gz exactly as CLIP derives them (no hub).
  Scheduler  DDIMScheduler with SD1.5's scheduler_config.

Weights are diffusers' / transformers' default initialisation under
torch.manual_seed(0), with norm affines and biases perturbed (so a dropped or
swapped bias shows) and every weight rounded to float16 before anything runs:
F16 storage is therefore lossless and the float32 reference ran on exactly the
stored values.

The single file is written by this script's own diffusers -> LDM key mapping
(diffusers 0.42 ships only the LDM -> diffusers direction). To check that
mapping independently, the single file is loaded back with diffusers'
StableDiffusionPipeline.from_single_file(..., config=<the diffusers folder>)
(offline; diffusers' own conversion code) and every tensor of every component
is compared with the folder's: they must be bit-identical, or the script fails.

e2e_reference.safetensors (float32 unless noted):
  input.latents            (1, 4, 16, 16) the initial latents passed as latents=
  input.prompt_ids         (1, 77) I64 tokenizer ids of PROMPT
  input.negative_ids       (1, 77) I64 ids of NEGATIVE
  output.prompt_embeds     (1, 77, 16) text encoder output for PROMPT
  output.negative_embeds   (1, 77, 16) for NEGATIVE
  output.timesteps         (3,) I64 DDIM timesteps
  output.latents_step<i>   (1, 4, 16, 16) latents after step i (scheduler.step's prev_sample)
  output.image             (1, 32, 32, 3) pipeline output, output_type="np" (values in [0, 1])
  output.decoded           (1, 3, 32, 32) vae.decode(latents / scaling_factor) before
                           postprocessing (values roughly in [-1, 1])
  __metadata__["config"]   JSON: prompt, negative_prompt, steps, guidance_scale, eta,
                           height, width, module "StableDiffusionPipeline"

Usage (developer tool; tests never run it):
    python3 tools/golden/make_tiny_pipeline.py [--out tests/data/tiny_sd]
"""

import argparse
import gzip
import json
import shutil
import tempfile
from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parents[2]
MERGES_GZ = ROOT / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"

PROMPT = "a photo of a person"
NEGATIVE = ""
STEPS = 3
GUIDANCE = 7.5
HEIGHT = WIDTH = 32

SD15_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "timestep_spacing": "leading", "trained_betas": None,
}


# ----------------------------------------------------------------------------- models

def perturb_and_round(module, seed):
    """Perturbs norm affines and biases, then rounds every parameter to float16."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1:
                if name.endswith("weight"):  # GroupNorm / LayerNorm scale
                    p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())


def byte_characters():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_folder(folder):
    lines = gzip.open(MERGES_GZ).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    vocab = byte_characters()
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_pipeline(work):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32, 32), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8, sample_size=32).eval()
    text_config = CLIPTextConfig(
        vocab_size=49408, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=16, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1)
    text_encoder = CLIPTextModel(text_config).eval()
    perturb_and_round(unet, 1)
    perturb_and_round(vae, 2)
    perturb_and_round(text_encoder, 3)

    tok_dir = work / "tokenizer_src"
    write_tokenizer_folder(tok_dir)
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), pad_token="<|endoftext|>",
                              model_max_length=77)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_folder(pipe, folder):
    if folder.exists():
        shutil.rmtree(folder)
    # UNet and text encoder in F16 (lossless: already rounded), the VAE in F32.
    pipe.unet.half()
    pipe.text_encoder.half()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    pipe.unet.float()
    pipe.text_encoder.float()
    # Keep the tokenizer folder to the vocab.json + merges.txt pair (and
    # tokenizer_config.json): tokenizer.json repeats both in 3.6 MB.
    write_tokenizer_folder(folder / "tokenizer")
    (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)


# ----------------------------------------------------------------------------- diffusers -> LDM names
#
# Original (CompVis / LDM) UNet layout, with L = layers_per_block and n levels:
#   input_blocks.0.0                   conv_in
#   input_blocks.k, k = 1 + i*(L+1) + j   level i, layer j: .0 resnet, .1 spatial transformer
#   input_blocks.(i+1)*(L+1).0.op     downsampler of level i (not the last)
#   middle_block.0 / .1 / .2           resnet, transformer, resnet
#   output_blocks.k, k = i*(L+1) + j   up block i, layer j (L+1 layers): .0 resnet, .1 transformer,
#                                      upsampler on the last layer at .1 (no attention) or .2
#   time_embed.0 / .2, out.0 / .2      time_embedding.linear_1 / _2, conv_norm_out / conv_out
# Resnets: in_layers.0 norm1, in_layers.2 conv1, emb_layers.1 time_emb_proj,
#          out_layers.0 norm2, out_layers.3 conv2, skip_connection conv_shortcut.
# Transformer internals keep their names.

RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def unet_key_to_ldm(key, cfg):
    L = cfg["layers_per_block"]
    n = len(cfg["block_out_channels"])
    up_has_attn = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    p = key.split(".")

    def resnet(rest):
        return RESNET_LDM[rest[0]] + "." + ".".join(rest[1:])

    if p[0] == "conv_in":
        return "input_blocks.0.0." + p[1]
    if p[0] == "time_embedding":
        return {"linear_1": "time_embed.0", "linear_2": "time_embed.2"}[p[1]] + "." + p[2]
    if p[0] == "conv_norm_out":
        return "out.0." + p[1]
    if p[0] == "conv_out":
        return "out.2." + p[1]
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{(i + 1) * (L + 1)}.0.op." + p[-1]
        j = int(p[3])
        k = 1 + i * (L + 1) + j
        if p[2] == "resnets":
            return f"input_blocks.{k}.0." + resnet(p[4:])
        return f"input_blocks.{k}.1." + ".".join(p[4:])
    if p[0] == "mid_block":
        j = int(p[2])
        if p[1] == "resnets":
            return f"middle_block.{2 * j}." + resnet(p[3:])
        return "middle_block.1." + ".".join(p[3:])
    if p[0] == "up_blocks":
        i = int(p[1])
        if p[2] == "upsamplers":
            k = i * (L + 1) + L
            return f"output_blocks.{k}.{2 if up_has_attn[i] else 1}.conv." + p[-1]
        j = int(p[3])
        k = i * (L + 1) + j
        if p[2] == "resnets":
            return f"output_blocks.{k}.0." + resnet(p[4:])
        return f"output_blocks.{k}.1." + ".".join(p[4:])
    raise KeyError(key)


VAE_ATTN_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_key_to_ldm(key, cfg):
    n = len(cfg["block_out_channels"])
    p = key.split(".")
    if p[0] in ("quant_conv", "post_quant_conv"):
        return key
    side = p[0]  # encoder / decoder
    rest = p[1:]

    def resnet(r):
        return ("nin_shortcut" if r[0] == "conv_shortcut" else r[0]) + "." + ".".join(r[1:])

    if rest[0] in ("conv_in", "conv_out"):
        return side + "." + ".".join(rest)
    if rest[0] == "conv_norm_out":
        return side + ".norm_out." + rest[1]
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            return side + f".mid.block_{int(rest[2]) + 1}." + resnet(rest[3:])
        # attentions.0.<name>[.0].<param>
        name = VAE_ATTN_LDM[rest[3]]
        return side + ".mid.attn_1." + name + "." + rest[-1]
    if rest[0] == "down_blocks":
        i = int(rest[1])
        if rest[2] == "downsamplers":
            return side + f".down.{i}.downsample.conv." + rest[-1]
        return side + f".down.{i}.block.{rest[3]}." + resnet(rest[4:])
    if rest[0] == "up_blocks":
        level = n - 1 - int(rest[1])
        if rest[2] == "upsamplers":
            return side + f".up.{level}.upsample.conv." + rest[-1]
        return side + f".up.{level}.block.{rest[3]}." + resnet(rest[4:])
    raise KeyError(key)


def to_single_file(pipe, path):
    out = {}
    ucfg = dict(pipe.unet.config)
    for k, v in pipe.unet.state_dict().items():
        out["model.diffusion_model." + unet_key_to_ldm(k, ucfg)] = v.half().contiguous()
    vcfg = dict(pipe.vae.config)
    for k, v in pipe.vae.state_dict().items():
        ldm = vae_key_to_ldm(k, vcfg)
        v = v.half()
        if ".mid.attn_1." in ldm and v.dim() == 2:  # LDM's attention projections are 1x1 convolutions
            v = v[:, :, None, None]
        out["first_stage_model." + ldm] = v.contiguous()
    for k, v in pipe.text_encoder.state_dict().items():
        # transformers 5 names CLIPTextModel's tensors without the "text_model."
        # level that transformers 4 (and so every SD1.x checkpoint) has.
        k = k[len("text_model."):] if k.startswith("text_model.") else k
        out["cond_stage_model.transformer.text_model." + k] = v.half().contiguous()
    # position_ids, as older checkpoints (v1-5-pruned-emaonly among them) carry it.
    out["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64)[None]
    assert len(set(out)) == len(out)
    save_file(out, str(path), metadata={"format": "pt"})
    return out


def verify_single_file(single, folder):
    """Loads the single file with diffusers' own converter and compares every tensor with the folder's."""
    converted = StableDiffusionPipeline.from_single_file(str(single), config=str(folder), local_files_only=True,
                                                         safety_checker=None, requires_safety_checker=False,
                                                         torch_dtype=torch.float32)
    reference = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, safety_checker=None,
                                                        requires_safety_checker=False, torch_dtype=torch.float32)
    checked = 0
    for name in ("unet", "vae", "text_encoder"):
        a = getattr(converted, name).state_dict()
        b = getattr(reference, name).state_dict()
        assert set(a) == set(b), (name, sorted(set(a) ^ set(b))[:10])
        for k in b:
            assert a[k].shape == b[k].shape, (name, k, a[k].shape, b[k].shape)
            assert torch.equal(a[k].float(), b[k].float()), (name, k)
            checked += 1
    print(f"from_single_file check: {checked} tensors of unet/vae/text_encoder identical to the folder's")


# ----------------------------------------------------------------------------- e2e reference

def run_reference(pipe, path):
    torch.manual_seed(0)
    h = HEIGHT // pipe.vae_scale_factor
    latents = torch.randn((1, 4, h, h), generator=torch.Generator().manual_seed(1234))
    tok = pipe.tokenizer
    ids = tok([PROMPT], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    neg_ids = tok([NEGATIVE], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        prompt_embeds = pipe.text_encoder(ids)[0]
        negative_embeds = pipe.text_encoder(neg_ids)[0]

    steps = []

    def on_step(p, i, t, kwargs):
        steps.append(kwargs["latents"].detach().clone())
        return kwargs

    with torch.no_grad():
        result = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                      guidance_scale=GUIDANCE, eta=0.0, latents=latents.clone(), output_type="np",
                      generator=torch.Generator().manual_seed(0), callback_on_step_end=on_step,
                      callback_on_step_end_tensor_inputs=["latents"])
        decoded = pipe.vae.decode(steps[-1] / pipe.vae.config.scaling_factor).sample
    image = torch.from_numpy(np.asarray(result.images)).float()
    timesteps = pipe.scheduler.timesteps.clone().to(torch.int64)
    assert len(steps) == STEPS

    tensors = {
        "input.latents": latents,
        "input.prompt_ids": ids.to(torch.int64),
        "input.negative_ids": neg_ids.to(torch.int64),
        "output.prompt_embeds": prompt_embeds,
        "output.negative_embeds": negative_embeds,
        "output.timesteps": timesteps,
        "output.image": image,
        "output.decoded": decoded,
    }
    for i, s in enumerate(steps):
        tensors[f"output.latents_step{i}"] = s
    config = {"module": "StableDiffusionPipeline", "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS,
              "guidance_scale": GUIDANCE, "eta": 0.0, "height": HEIGHT, "width": WIDTH}
    metadata = {"config": json.dumps(config, sort_keys=True), "torch": torch.__version__, "diffusers": diffusers.__version__,
                "transformers": transformers.__version__}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    print("timesteps", timesteps.tolist(), "image range", float(image.min()), float(image.max()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "data" / "tiny_sd")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(Path(tmp))
        folder = args.out / "diffusers"
        save_folder(pipe, folder)
        single = args.out / "single_file.safetensors"
        to_single_file(pipe, single)
        verify_single_file(single, folder)
        run_reference(pipe, args.out / "e2e_reference.safetensors")
    total = 0
    for f in sorted(args.out.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"{f.relative_to(args.out)}: {f.stat().st_size / 1024:.1f} KiB")
    print(f"total {total / 1024 / 1024:.2f} MiB")


if __name__ == "__main__":
    main()
