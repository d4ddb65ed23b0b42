#!/usr/bin/env python3
"""Writes the identity-module gradient goldens read by tests/unit/identity_grad.cpp.

Gradients come from torch autograd through the authors' released modules
(ByteCat-bot/DynamicID, commit 0cd30a5): ProjPlusModel and
FacePerceiverResampler from functions.py, IMR, KeyPointEncoder and its Conv2d
unit from model.py. They are imported at generation time from a clone or bare
git directory of that repository; nothing of it is stored here. Two
adjustments, both documented in the shared reference:

  * model.py's reshape_tensor folds the heads into the batch, after which its
    own permute raises, so the released IMR cannot run; it is replaced by
    functions.py's 4-d reshape_tensor (the intended multi-head form).
  * The released sizes are too large for small fixtures, so the modules are
    built with small sizes: ProjPlusModel's perceiver_resampler (hard-wired to
    depth 4, dim_head 64) is swapped for the authors' own
    FacePerceiverResampler with a smaller depth and head size, and
    KeyPointEncoder's `blocks` for a short stack of the authors' Conv2d units.

Everything runs in float64 on weights and inputs rounded to float16 / float32
values (the stored values), so the goldens are what the modules compute on
exactly the stored numbers. The released attention casts its softmax to
float32, which bounds the agreement to ~1e-7 relative.

Every file holds one case:

    param.<key>          weights (F16 values; BatchNorm running stats F32)
    input.<name>         inputs, incl. input.grad_output (the upstream gradient)
    output.<name>        forward outputs; output.loss = sum(out * grad_output)
                         unless the case is a loss
    grad.param.<key>     d loss / d weight for every trainable weight
    grad.input.<name>    d loss / d input
    updated.<key>        BatchNorm running stats after the training-mode forward

and __metadata__["config"] (JSON) with the module's sizes.

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_identity_grad_goldens.py --repo /path/to/DynamicID.git [--out tests/data/golden/identity_grad]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

RELEASED_COMMIT = "0cd30a5"


def import_released(repo, workdir):
    for name in ("functions.py", "model.py"):
        text = subprocess.run(["git", f"--git-dir={repo}", "show", f"{RELEASED_COMMIT}:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (workdir / name).write_text(text)
    # functions.py imports libraries only its plotting helpers use.
    for stub in ("einops", "einops.layers", "einops.layers.torch", "cv2", "matplotlib", "matplotlib.pyplot"):
        if stub not in sys.modules:
            try:
                __import__(stub)
            except ImportError:
                m = types.ModuleType(stub)
                m.rearrange = m.Rearrange = None
                sys.modules[stub] = m
    sys.path.insert(0, str(workdir))
    import functions  # noqa: E402
    import model  # noqa: E402
    model.reshape_tensor = functions.reshape_tensor  # the intended multi-head form (see above)
    return functions, model


def randomise(module, seed):
    """Random weights rounded to float16 values; norm scales near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
            p.copy_(p.half().double())
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_((0.3 * torch.randn(b.shape, generator=g)).float().double())
            elif name.endswith("running_var"):
                b.copy_((0.5 + torch.rand(b.shape, generator=g)).float().double())


def rounded(t, dtype=torch.float32):
    return t.to(dtype).double()


def params_of(module, prefix="param."):
    out = {}
    for k, v in module.state_dict().items():
        if k.endswith("num_batches_tracked"):
            continue
        out[prefix + k] = v.detach().float() if "running_" in k else v.detach().half()
    return out


def grads_of(module, prefix="grad.param."):
    return {prefix + k: p.grad.detach().float() for k, p in module.named_parameters()}


def running_of(module, prefix="updated."):
    return {prefix + k: v.detach().float() for k, v in module.state_dict().items() if "running_" in k}


def save(out, name, config, tensors):
    path = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"config": json.dumps(config, sort_keys=True)})
    print(f"{path}: {path.stat().st_size} bytes")


def with_grad(t):
    return t.clone().requires_grad_(True)


# ---- ProjPlusModel ----------------------------------------------------------

PROJ = dict(cross_attention_dim=32, id_embeddings_dim=12, clip_embeddings_dim=20, num_tokens=3, depth=2, dim_head=16, heads=2,
            ff_mult=2, batch=2, clip_tokens=5)


def proj_case(functions, out):
    c = PROJ
    m = functions.ProjPlusModel(cross_attention_dim=c["cross_attention_dim"], id_embeddings_dim=c["id_embeddings_dim"],
                                clip_embeddings_dim=c["clip_embeddings_dim"], num_tokens=c["num_tokens"])
    m.perceiver_resampler = functions.FacePerceiverResampler(
        dim=c["cross_attention_dim"], depth=c["depth"], dim_head=c["dim_head"], heads=c["heads"],
        embedding_dim=c["clip_embeddings_dim"], output_dim=c["cross_attention_dim"], ff_mult=c["ff_mult"])
    m = m.double()
    randomise(m, 101)
    g = torch.Generator().manual_seed(102)
    id_embeds = with_grad(rounded(torch.randn(c["batch"], c["id_embeddings_dim"], generator=g)))
    clip_embeds = with_grad(rounded(torch.randn(c["batch"], c["clip_tokens"], c["clip_embeddings_dim"], generator=g)))
    grad_output = rounded(torch.randn(c["batch"], c["num_tokens"], c["cross_attention_dim"], generator=g))
    tokens = m(id_embeds, clip_embeds)
    loss = (tokens * grad_output).sum()
    loss.backward()
    t = params_of(m)
    t.update({"input.id_embeds": id_embeds.detach().float(), "input.clip_embeds": clip_embeds.detach().float(),
              "input.grad_output": grad_output.float(), "output.tokens": tokens.detach().float(),
              "output.loss": loss.detach().float().reshape(1), "grad.input.id_embeds": id_embeds.grad.float(),
              "grad.input.clip_embeds": clip_embeds.grad.float()})
    t.update(grads_of(m))
    save(out, "proj_plus", dict(module="ProjPlusModel.backward", **c), t)


# ---- IMR --------------------------------------------------------------------

IMR = dict(dim=32, dim_head=8, heads=2, num_queries=2, embedding_dim=12, txt_dim=10, ff_mult=2, disentangle_depth=2,
           entangle_depth=1, targets=3, tokens=3)


def imr_inputs(c, g):
    return dict(x=rounded(torch.randn(1, c["tokens"], c["embedding_dim"], generator=g)),
                src_text=rounded(torch.randn(1, c["txt_dim"], generator=g)),
                tgt_text=rounded(torch.randn(c["targets"], c["txt_dim"], generator=g)))


def make_imr(model, c, seed):
    m = model.IMR(dim=c["dim"], dim_head=c["dim_head"], heads=c["heads"], num_queries=c["num_queries"],
                  embedding_dim=c["embedding_dim"], txt_dim=c["txt_dim"], ff_mult=c["ff_mult"],
                  erase_layer_num=c["disentangle_depth"], drive_layer_num=c["entangle_depth"]).double()
    randomise(m, seed)
    return m


def imr_case(model, out):
    c = IMR
    m = make_imr(model, c, 201)
    g = torch.Generator().manual_seed(202)
    inp = {k: with_grad(v) for k, v in imr_inputs(c, g).items()}
    inp["src_landmark"] = with_grad(rounded(torch.randn(1, c["embedding_dim"], generator=g)))
    inp["tgt_landmark"] = with_grad(rounded(torch.randn(c["targets"], c["embedding_dim"], generator=g)))
    grad_output = rounded(torch.randn(c["targets"], c["tokens"], c["embedding_dim"], generator=g))
    tokens = m(inp["x"], inp["src_landmark"], inp["tgt_landmark"], inp["src_text"], inp["tgt_text"])
    loss = (tokens * grad_output).sum()
    loss.backward()
    t = params_of(m)
    for k, v in inp.items():
        t["input." + k] = v.detach().float()
        t["grad.input." + k] = v.grad.float()
    t.update({"input.grad_output": grad_output.float(), "output.tokens": tokens.detach().float(),
              "output.loss": loss.detach().float().reshape(1)})
    t.update(grads_of(m))
    save(out, "imr", dict(module="IMR.backward", **c), t)


# ---- KeyPointEncoder --------------------------------------------------------

# (cin, cout, kernel, stride, padding, residual) per unit, per block.
KPE_LAYOUT = [
    [(1, 4, 7, 1, 3, False)],
    [(4, 8, 3, 2, 1, False), (8, 8, 3, 1, 1, True)],
    [(8, 8, 3, 2, 1, False)],
    [(8, 8, 3, 1, 0, False), (8, 12, 1, 1, 0, False)],
]


def make_keypoint_encoder(model, seed):
    m = model.KeyPointEncoder(embedding_dim=12)
    m.blocks = torch.nn.ModuleList(
        [torch.nn.Sequential(*[model.Conv2d(ci, co, k, s, p, residual=r) for ci, co, k, s, p, r in block]) for block in KPE_LAYOUT])
    m = m.double()
    randomise(m, seed)
    return m


def layout_config():
    return [[dict(kernel=k, stride=s, padding=p, residual=r) for _, _, k, s, p, r in block] for block in KPE_LAYOUT]


def landmark_images(n, side, g):
    """Sparse +1 dots on a -1 background, like the landmark raster."""
    img = -torch.ones(n, 1, side, side, dtype=torch.float64)
    img[torch.rand(n, 1, side, side, generator=g) < 0.2] = 1.0
    return img


def keypoint_case(model, out, training):
    m = make_keypoint_encoder(model, 301)
    m.train(training)
    g = torch.Generator().manual_seed(302)
    side = 12
    x = with_grad(landmark_images(4, side, g) + rounded(0.1 * torch.randn(4, 1, side, side, generator=g)))
    t = params_of(m)
    y = m(x)
    grad_output = rounded(torch.randn(y.shape, generator=g))
    loss = (y * grad_output).sum()
    loss.backward()
    t.update({"input.landmark_image": x.detach().float(), "input.grad_output": grad_output.float(),
              "output.features": y.detach().float(), "output.loss": loss.detach().float().reshape(1),
              "grad.input.landmark_image": x.grad.float()})
    t.update(grads_of(m))
    if training:
        t.update(running_of(m))
    save(out, "keypoint_train" if training else "keypoint_eval",
         dict(module="KeyPointEncoder.backward", training=training, momentum=0.1, eps=1e-5, blocks=layout_config()), t)


# ---- losses -----------------------------------------------------------------

def mse_case(out):
    g = torch.Generator().manual_seed(401)
    pred = with_grad(rounded(torch.randn(2, 3, 5, generator=g)))
    target = with_grad(rounded(torch.randn(2, 3, 5, generator=g)))
    loss = F.mse_loss(pred, target, reduction="mean")
    loss.backward()
    save(out, "mse", dict(module="mse_loss", reduction="mean"),
         {"input.prediction": pred.detach().float(), "input.target": target.detach().float(),
          "output.loss": loss.detach().float().reshape(1), "grad.input.prediction": pred.grad.float(),
          "grad.input.target": target.grad.float()})


def reconfiguration_case(model, out):
    """One reconfiguration step as train_IMR.py intends it, without the UNet term:
    KeyPointEncoder (training mode) on source + targets -> IMR -> DFM = MSE(pred, target tokens)."""
    c = dict(IMR, disentangle_depth=1, entangle_depth=1)
    kpe = make_keypoint_encoder(model, 501)
    kpe.train(True)
    imr = make_imr(model, c, 502)
    g = torch.Generator().manual_seed(503)
    inp = imr_inputs(c, g)
    landmarks = landmark_images(1 + c["targets"], 12, g)
    target_tokens = rounded(torch.randn(c["targets"], c["tokens"], c["embedding_dim"], generator=g))
    t = params_of(kpe, "param.kpe.")
    t.update(params_of(imr, "param.imr."))
    feature = kpe(landmarks).reshape(1 + c["targets"], -1)
    pred = imr(inp["x"], feature[:1], feature[1:], inp["src_text"], inp["tgt_text"])
    loss = F.mse_loss(pred, target_tokens, reduction="mean")
    loss.backward()
    t.update({"input.landmark_image": landmarks.float(), "input.target_tokens": target_tokens.float(),
              "output.tokens": pred.detach().float(), "output.loss": loss.detach().float().reshape(1)})
    t.update({"input." + k: v.float() for k, v in inp.items()})
    t.update(grads_of(kpe, "grad.param.kpe."))
    t.update(grads_of(imr, "grad.param.imr."))
    t.update(running_of(kpe, "updated.kpe."))
    save(out, "reconfiguration_step", dict(module="reconfiguration_step", imr=c, blocks=layout_config(), momentum=0.1, eps=1e-5), t)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repo", required=True, help="clone or bare git directory of ByteCat-bot/DynamicID")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/data/golden/identity_grad"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        functions, model = import_released(args.repo, Path(tmp))
        proj_case(functions, out)
        imr_case(model, out)
        keypoint_case(model, out, training=True)
        keypoint_case(model, out, training=False)
        mse_case(out)
        reconfiguration_case(model, out)


if __name__ == "__main__":
    main()
