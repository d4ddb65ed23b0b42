#!/usr/bin/env python3
"""Writes scheduler golden cases for dynamicid from diffusers.

Cases (tests/data/golden/schedulers/), one safetensors file each:

  DDIMScheduler            config = the scheduler's config dict + num_inference_steps, eta,
                           use_clipped_model_output
                           input.sample (initial), input.model_outputs (T, ...) fixed random
                           tensors, input.noise (T, ...) the variance noise when eta > 0
                           -> output.timesteps (T) I64, output.samples (T, ...) = the sample
                           after each step, output.alphas_cumprod (N)
  DDPMScheduler.add_noise  input.original_samples, input.noise, input.timesteps (B) I64
                           -> output.noisy_samples, output.velocity, output.alphas_cumprod
  EulerDiscreteScheduler   (for examples/samplers/euler_sampler.hpp) input.sample (initial,
                           already multiplied by init_noise_sigma), input.model_outputs
                           -> output.timesteps (T) F32, output.sigmas (T+1),
                           output.init_noise_sigma (1), output.scaled_inputs (T, ...) =
                           scale_model_input before each step, output.samples (T, ...)

Usage (developer tool only; tests never run it):
    python3 tools/golden/make_scheduler_goldens.py [--out tests/data/golden/schedulers]
"""

import argparse
import json
from pathlib import Path

import diffusers
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (1, 4, 8, 8)
SD15 = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def config_dict(scheduler):
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


def save(path, tensors, config):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(config), "diffusers": diffusers.__version__,
                                            "torch": torch.__version__})
    size = path.stat().st_size
    print(f"wrote {path.name} ({size} bytes)")


def ddim_case(out, name, seed, steps, eta=0.0, use_clipped_model_output=False, **kwargs):
    sched = DDIMScheduler(**kwargs)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    g = torch.Generator().manual_seed(seed)
    count = len(timesteps)
    sample = torch.randn(SHAPE, generator=g)
    model_outputs = torch.randn((count,) + SHAPE, generator=g)
    noise = torch.randn((count,) + SHAPE, generator=g)
    x = sample
    samples = []
    for i, t in enumerate(timesteps):
        x = sched.step(model_outputs[i], int(t), x, eta=eta, use_clipped_model_output=use_clipped_model_output,
                       variance_noise=noise[i] if eta > 0 else None).prev_sample
        samples.append(x)
    tensors = {"input.sample": sample, "input.model_outputs": model_outputs,
               "output.timesteps": timesteps.to(torch.int64), "output.samples": torch.stack(samples),
               "output.alphas_cumprod": sched.alphas_cumprod.to(torch.float32)}
    if eta > 0:
        tensors["input.noise"] = noise
    config = {"module": "DDIMScheduler", **config_dict(sched), "num_inference_steps": steps, "eta": eta,
              "use_clipped_model_output": use_clipped_model_output}
    save(out / f"ddim_{name}.safetensors", tensors, config)


def ddpm_add_noise_case(out, name, seed, timesteps, **kwargs):
    sched = DDPMScheduler(**kwargs)
    g = torch.Generator().manual_seed(seed)
    shape = (len(timesteps),) + SHAPE[1:]
    x0 = torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    t = torch.tensor(timesteps, dtype=torch.int64)
    tensors = {"input.original_samples": x0, "input.noise": noise, "input.timesteps": t,
               "output.noisy_samples": sched.add_noise(x0, noise, t),
               "output.velocity": sched.get_velocity(x0, noise, t),
               "output.alphas_cumprod": sched.alphas_cumprod.to(torch.float32)}
    save(out / f"ddpm_{name}.safetensors", tensors, {"module": "DDPMScheduler.add_noise", **config_dict(sched)})


def euler_case(out, name, seed, steps, **kwargs):
    sched = EulerDiscreteScheduler(**kwargs)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps.clone()
    g = torch.Generator().manual_seed(seed)
    count = len(timesteps)
    sample = torch.randn(SHAPE, generator=g) * sched.init_noise_sigma
    model_outputs = torch.randn((count,) + SHAPE, generator=g)
    x = sample
    scaled, samples = [], []
    for i, t in enumerate(timesteps):
        scaled.append(sched.scale_model_input(x, t))
        x = sched.step(model_outputs[i], t, x).prev_sample
        samples.append(x)
    tensors = {"input.sample": sample, "input.model_outputs": model_outputs,
               "output.timesteps": timesteps.to(torch.float32), "output.sigmas": sched.sigmas.to(torch.float32),
               "output.init_noise_sigma": torch.tensor([float(sched.init_noise_sigma)], dtype=torch.float32),
               "output.scaled_inputs": torch.stack(scaled), "output.samples": torch.stack(samples)}
    config = {"module": "EulerDiscreteScheduler", **config_dict(sched), "num_inference_steps": steps}
    save(out / f"euler_{name}.safetensors", tensors, config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "golden" / "schedulers"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # SD1.5's DDIM: leading spacing, steps_offset 1, final alpha = abar[0].
    ddim_case(out, "sd15_leading", 1, 20, **SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ddim_case(out, "trailing", 2, 10, **SD15, clip_sample=False, timestep_spacing="trailing")
    ddim_case(out, "trailing_61", 3, 61, **SD15, clip_sample=False, timestep_spacing="trailing")  # numpy arange gives 62
    ddim_case(out, "linspace", 4, 7, **SD15, clip_sample=False, set_alpha_to_one=False, timestep_spacing="linspace")
    ddim_case(out, "eta05_noise", 5, 10, eta=0.5, **SD15, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    ddim_case(out, "v_prediction_zero_snr", 6, 10, **SD15, clip_sample=False, prediction_type="v_prediction",
              timestep_spacing="trailing", rescale_betas_zero_snr=True)
    ddim_case(out, "clip_sample_linear", 7, 10)  # DDIMScheduler defaults: linear betas, clip_sample, alpha_to_one
    ddim_case(out, "clip_range_clipped_output", 8, 10, eta=1.0, use_clipped_model_output=True, clip_sample=True,
              clip_sample_range=0.5)
    ddim_case(out, "cosine_sample", 9, 12, beta_schedule="squaredcos_cap_v2", prediction_type="sample",
              clip_sample=False)

    ddpm_add_noise_case(out, "add_noise_sd15", 10, [0, 1, 250, 500, 999], **SD15)
    ddpm_add_noise_case(out, "add_noise_sigmoid", 11, [3, 777], beta_schedule="sigmoid")

    euler_case(out, "sd15_linspace", 12, 10, **SD15)
    euler_case(out, "sd15_leading", 13, 8, **SD15, timestep_spacing="leading", steps_offset=1)
    euler_case(out, "v_prediction_trailing", 14, 6, **SD15, timestep_spacing="trailing", prediction_type="v_prediction")


if __name__ == "__main__":
    main()
