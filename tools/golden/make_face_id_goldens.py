#!/usr/bin/env python3
"""Writes the face-identity encoder goldens read by tests/unit/face_id_net.cpp.

The network is insightface's IResNet (arcface_torch/backbones/iresnet.py),
written out here from its published architecture at a tiny size:

  conv1 3x3 -> bn1 -> prelu -> layer1..layerK -> bn2 -> flatten -> fc -> features (BatchNorm1d)
  IBasicBlock: bn1 -> conv1 3x3 -> bn2 -> prelu -> conv2 3x3 (stride) -> bn3, plus
               downsample (conv 1x1 stride -> BatchNorm2d) on the first block of a stage

The loss is arcface_torch's ArcFace (CombinedMarginLoss with m1 = 1, m2 = m,
m3 = 0, including its threshold / easy-margin branches) after partial_fc_v2's
normalised linear and clamp, followed by cross entropy with mean reduction.

Everything runs in float64 on values rounded to float32 (the stored values),
so the goldens are what torch autograd computes on exactly the stored numbers.
Unlike insightface, features.weight is left trainable here so that its
gradient is checked too (the trainer freezes it, as insightface does).

Files (one case each; __metadata__["config"] holds the sizes):

  face_id_train   training-mode forward + ArcFace loss: param.<key> (state dict),
                  param.margin.weight (class weights), input.images, input.labels,
                  output.embedding, output.loss, grad.param.<key> for every
                  parameter, grad.input.images, updated.<key> (running statistics
                  after the step)
  face_id_eval    eval-mode forward and backward of sum(embedding * grad_output)
  arcface         the loss alone on hand-placed embeddings that reach both sides
                  of the threshold; arcface_easy the same with easy_margin

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_face_id_goldens.py [--out tests/data/golden/face_id]
"""

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file


# ---- the network ----------------------------------------------------------------

class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride, downsample):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x):
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNet(nn.Module):
    def __init__(self, in_channels, input_size, widths, blocks, embedding_size):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        inplanes, side = widths[0], input_size
        for i, (planes, count) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(count):
                stride = 2 if j == 0 else 1
                down = None
                if stride != 1 or inplanes != planes:
                    down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-5))
                layers.append(IBasicBlock(inplanes, planes, stride, down))
                inplanes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
            side = (side - 1) // 2 + 1
        self.stages = len(widths)
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=1e-5)
        self.fc = nn.Linear(widths[-1] * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.bn2(x), 1)
        return self.features(self.fc(x))


# ---- the loss -------------------------------------------------------------------

def arcface_logits(cosine, labels, s, m, easy_margin):
    cos_m, sin_m = math.cos(m), math.sin(m)
    theta, sinmm = math.cos(math.pi - m), math.sin(math.pi - m) * m
    index = torch.arange(cosine.shape[0])
    target = cosine[index, labels]
    sin_theta = torch.sqrt(1.0 - target ** 2)
    cos_theta_m = target * cos_m - sin_theta * sin_m
    if easy_margin:
        final = torch.where(target > 0, cos_theta_m, target)
    else:
        final = torch.where(target > theta, cos_theta_m, target - sinmm)
    logits = cosine.clone()
    logits[index, labels] = final
    return logits * s


def arcface_loss(embeddings, class_weights, labels, s=64.0, m=0.5, easy_margin=False):
    cosine = F.linear(F.normalize(embeddings), F.normalize(class_weights)).clamp(-1, 1)
    return F.cross_entropy(arcface_logits(cosine, labels, s, m, easy_margin), labels)


# ---- helpers --------------------------------------------------------------------

def rounded(t):
    return t.float().double()


def randomise(module, g):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("prelu.weight"):
                p.copy_(0.25 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            p.copy_(rounded(p))
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(rounded(0.3 * torch.randn(b.shape, generator=g)))
            elif name.endswith("running_var"):
                b.copy_(rounded(0.5 + torch.rand(b.shape, generator=g)))


def state_of(module, prefix="param."):
    return {prefix + k: v.detach().float() for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}


def grads_of(module, prefix="grad.param."):
    return {prefix + k: p.grad.detach().float() for k, p in module.named_parameters()}


def save(out, name, config, tensors):
    path = out / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"config": json.dumps(config, sort_keys=True)})
    print(f"{path}: {path.stat().st_size} bytes")


NET = dict(in_channels=3, input_size=12, widths=[4, 6], blocks=[2, 1], embedding_size=5)
BATCH, CLASSES = 4, 3


def make_net(seed):
    g = torch.Generator().manual_seed(seed)
    net = IResNet(**NET).double()
    randomise(net, g)
    return net, g


def train_case(out):
    net, g = make_net(11)
    net.train()
    images = rounded(torch.rand(BATCH, NET["in_channels"], NET["input_size"], NET["input_size"], generator=g) * 2 - 1).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 2])
    class_weights = rounded(0.5 * torch.randn(CLASSES, NET["embedding_size"], generator=g)).requires_grad_(True)
    t = state_of(net)
    embedding = net(images)
    loss = arcface_loss(embedding, class_weights, labels)
    loss.backward()
    t.update({"param.margin.weight": class_weights.detach().float(), "input.images": images.detach().float(), "input.labels": labels,
              "output.embedding": embedding.detach().float(), "output.loss": loss.detach().float().reshape(1),
              "grad.input.images": images.grad.float(), "grad.param.margin.weight": class_weights.grad.float()})
    t.update(grads_of(net))
    t.update({"updated." + k[len("param."):]: v for k, v in state_of(net).items() if "running_" in k})
    save(out, "face_id_train", dict(module="IResNet.train_arcface", training=True, momentum=0.1, eps=1e-5, scale=64.0, margin=0.5, **NET), t)


def eval_case(out):
    net, g = make_net(21)
    net.eval()
    images = rounded(torch.rand(BATCH, NET["in_channels"], NET["input_size"], NET["input_size"], generator=g) * 2 - 1).requires_grad_(True)
    t = state_of(net)
    embedding = net(images)
    grad_output = rounded(torch.randn(embedding.shape, generator=g))
    loss = (embedding * grad_output).sum()
    loss.backward()
    t.update({"input.images": images.detach().float(), "input.grad_output": grad_output.float(), "output.embedding": embedding.detach().float(),
              "output.loss": loss.detach().float().reshape(1), "grad.input.images": images.grad.float()})
    t.update(grads_of(net))
    save(out, "face_id_eval", dict(module="IResNet.eval", training=False, eps=1e-5, **NET), t)


def loss_case(out, easy_margin):
    g = torch.Generator().manual_seed(31 if easy_margin else 32)
    n, c, e, m, s = 6, 4, 5, 0.5, 64.0
    weights = rounded(torch.randn(c, e, generator=g))
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    emb = torch.randn(n, e, generator=g)
    wn = F.normalize(weights)
    # Rows 0-1 nearly along their class (far above the threshold), rows 2-3 nearly
    # opposite it (below cos(pi - m) = -0.878, the sinmm branch), rows 4-5 near
    # orthogonal (around the easy-margin switch at 0).
    emb[0] = 2.0 * wn[0] + 0.2 * emb[0]
    emb[1] = 0.5 * wn[1] + 0.05 * emb[1]
    emb[2] = -3.0 * wn[2] + 0.3 * emb[2]
    emb[3] = -1.0 * wn[3] + 0.1 * emb[3]
    emb[4] = emb[4] - (emb[4] @ wn[1]) * wn[1] + 0.05 * wn[1]
    emb[5] = emb[5] - (emb[5] @ wn[0]) * wn[0] - 0.05 * wn[0]
    emb = rounded(emb).requires_grad_(True)
    weights.requires_grad_(True)
    cosine = F.linear(F.normalize(emb), F.normalize(weights))
    loss = arcface_loss(emb, weights, labels, s, m, easy_margin)
    loss.backward()
    t = {"input.embeddings": emb.detach().float(), "input.class_weights": weights.detach().float(), "input.labels": labels,
         "output.cosine": cosine.detach().float(), "output.loss": loss.detach().float().reshape(1),
         "grad.input.embeddings": emb.grad.float(), "grad.input.class_weights": weights.grad.float()}
    save(out, "arcface_easy" if easy_margin else "arcface", dict(module="ArcFace", scale=s, margin=m, easy_margin=easy_margin), t)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests/data/golden/face_id"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_default_dtype(torch.float64)
    train_case(out)
    eval_case(out)
    loss_case(out, False)
    loss_case(out, True)


if __name__ == "__main__":
    main()
