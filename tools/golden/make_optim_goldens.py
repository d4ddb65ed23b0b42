#!/usr/bin/env python3
"""Writes optimisation golden cases for dynamicid from torch and diffusers.

Cases (tests/data/golden/optim/), one safetensors file each; the JSON in the
"config" metadata entry holds the hyperparameters.

  adamw_*.safetensors      torch.optim.AdamW (single-tensor CPU path) over STEPS steps
                           input.param.{i}  initial value of parameter i (flat index over the groups)
                           input.grad.{i}   (STEPS, ...) the gradient fed at each step
                           output.param.{i} (STEPS, ...) the parameter after each step
                           output.exp_avg.{i}, output.exp_avg_sq.{i} (and output.max_exp_avg_sq.{i}
                           with amsgrad) the state after the last step
                           output.total_norm (STEPS) when clipping: clip_grad_norm_'s return value
  lr_schedules.safetensors diffusers.optimization.get_scheduler: output.<name> (STEPS) F64 = the
                           learning rate used at step k (param_groups[0]["lr"] before scheduler.step())
  grad_scaler.safetensors  torch.amp.GradScaler("cpu") driving AdamW with injected inf/NaN
                           gradients: input.param, input.grad (STEPS, ...) unscaled gradients
                           (inf/NaN where injected), output.scale (STEPS) the scale each step's
                           gradients were multiplied by, output.stepped (STEPS) 1 when the optimizer
                           step ran, output.param (STEPS, ...), output.final_scale (1)

Usage (developer tool only; tests never run it):
    python3 tools/golden/make_optim_goldens.py [--out tests/data/golden/optim]
"""

import argparse
import json
from pathlib import Path

import diffusers
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[2]
STEPS = 10


def save(path, tensors, config):
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={"config": json.dumps(config), "torch": torch.__version__,
                                            "diffusers": diffusers.__version__})
    print(f"wrote {path.name} ({path.stat().st_size} bytes)")


def adamw_case(out, name, seed, groups, betas=(0.9, 0.999), eps=1e-8, amsgrad=False, max_norm=None):
    """groups: list of (lr, weight_decay, [shapes])."""
    g = torch.Generator().manual_seed(seed)
    params, grads = [], []
    torch_groups = []
    for lr, wd, shapes in groups:
        ps = []
        for s in shapes:
            p = torch.randn(s, generator=g).requires_grad_(True)
            params.append(p)
            # Gradients of varied magnitude so that clipping and the moments matter.
            grads.append(torch.randn((STEPS,) + tuple(s), generator=g) * 3.0)
            ps.append(p)
        torch_groups.append({"params": ps, "lr": lr, "weight_decay": wd})
    initial = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(torch_groups, betas=betas, eps=eps, amsgrad=amsgrad, foreach=False, fused=False)
    history = [[] for _ in params]
    norms = []
    for k in range(STEPS):
        for p, gr in zip(params, grads):
            p.grad = gr[k].clone()
        if max_norm is not None:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False).detach().clone())
        opt.step()
        for i, p in enumerate(params):
            history[i].append(p.detach().clone())
    tensors = {}
    for i, p in enumerate(params):
        tensors[f"input.param.{i}"] = initial[i]
        tensors[f"input.grad.{i}"] = grads[i]
        tensors[f"output.param.{i}"] = torch.stack(history[i])
        st = opt.state[p]
        tensors[f"output.exp_avg.{i}"] = st["exp_avg"]
        tensors[f"output.exp_avg_sq.{i}"] = st["exp_avg_sq"]
        if amsgrad:
            tensors[f"output.max_exp_avg_sq.{i}"] = st["max_exp_avg_sq"]
    if max_norm is not None:
        tensors["output.total_norm"] = torch.stack(norms).reshape(STEPS)
    config = {"module": "torch.optim.AdamW", "steps": STEPS, "betas": list(betas), "eps": eps, "amsgrad": amsgrad,
              "groups": [{"lr": lr, "weight_decay": wd, "shapes": [list(s) for s in shapes]} for lr, wd, shapes in groups]}
    if max_norm is not None:
        config["max_norm"] = max_norm
    save(out / f"adamw_{name}.safetensors", tensors, config)


def lr_schedule_case(out):
    steps = 25
    cases = {
        "constant": dict(num_warmup_steps=0, num_training_steps=20),
        "constant_with_warmup": dict(num_warmup_steps=5, num_training_steps=20),
        "linear": dict(num_warmup_steps=5, num_training_steps=20),
        "linear_no_warmup": dict(num_warmup_steps=0, num_training_steps=20),
        "cosine": dict(num_warmup_steps=5, num_training_steps=20),
    }
    base_lr = 1e-4
    tensors, config = {}, {"module": "diffusers.optimization.get_scheduler", "base_lr": base_lr, "steps": steps,
                           "cases": {}}
    for name, kw in cases.items():
        kind = name.replace("_no_warmup", "")
        p = torch.zeros(1, requires_grad=True)
        opt = torch.optim.AdamW([p], lr=base_lr)
        sched = get_scheduler(kind, optimizer=opt, **kw)
        lrs = []
        for _ in range(steps):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        tensors[f"output.{name}"] = torch.tensor(lrs, dtype=torch.float64)
        config["cases"][name] = {"kind": kind, **kw}
    save(out / "lr_schedules.safetensors", tensors, config)


def grad_scaler_case(out, seed=5):
    g = torch.Generator().manual_seed(seed)
    steps = 14
    growth_interval = 3
    shape = (3, 4)
    p = torch.randn(shape, generator=g).requires_grad_(True)
    initial = p.detach().clone()
    grads = torch.randn((steps,) + shape, generator=g)
    # Overflow at steps 2, 3 (back to back), 8 and a NaN at step 12.
    grads[2, 0, 1] = float("inf")
    grads[3, 2, 3] = float("-inf")
    grads[8, 1, 1] = float("inf")
    grads[12, 0, 0] = float("nan")
    opt = torch.optim.AdamW([p], lr=1e-2, weight_decay=0.01, foreach=False, fused=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=65536.0, growth_factor=2.0, backoff_factor=0.5,
                                  growth_interval=growth_interval)
    scales, stepped, history = [], [], []
    for k in range(steps):
        scales.append(scaler.get_scale())
        # loss = sum(p * g) has gradient g, so the scaled backward leaves scale * g in p.grad.
        opt.zero_grad(set_to_none=True)
        scaler.scale((p * grads[k]).sum()).backward()
        before = p.detach().clone()
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        stepped.append(0.0 if torch.equal(before, p.detach()) else 1.0)
        history.append(p.detach().clone())
    tensors = {"input.param": initial, "input.grad": grads, "output.scale": torch.tensor(scales, dtype=torch.float64),
               "output.stepped": torch.tensor(stepped, dtype=torch.float32), "output.param": torch.stack(history),
               "output.final_scale": torch.tensor([scaler.get_scale()], dtype=torch.float64)}
    config = {"module": "torch.amp.GradScaler", "steps": steps, "init_scale": 65536.0, "growth_factor": 2.0,
              "backoff_factor": 0.5, "growth_interval": growth_interval, "lr": 1e-2, "weight_decay": 0.01}
    save(out / "grad_scaler.safetensors", tensors, config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "tests" / "data" / "golden" / "optim"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    two_groups = [(1e-2, 0.1, [(4, 3), (5,)]), (5e-3, 0.0, [(3, 2)])]
    adamw_case(out, "two_groups", seed=1, groups=two_groups)
    adamw_case(out, "two_groups_clip", seed=2, groups=two_groups, max_norm=0.5)
    adamw_case(out, "clip_inactive", seed=3, groups=[(1e-3, 0.01, [(6,), (2, 2)])], max_norm=1e3)
    adamw_case(out, "amsgrad", seed=4, groups=[(2e-2, 0.05, [(3, 3)])], betas=(0.8, 0.95), eps=1e-6, amsgrad=True)
    lr_schedule_case(out)
    grad_scaler_case(out)


if __name__ == "__main__":
    main()
