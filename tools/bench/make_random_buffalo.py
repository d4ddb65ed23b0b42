#!/usr/bin/env python3
"""Writes full-size, random-weight stand-ins for insightface's buffalo_l models
(which cannot be fetched everywhere) for timing the face front end:

    <out>/det_10g.onnx      SCRFD-10G with keypoints: ResNetV1e backbone (deep stem, average-pool
                            downsampling, BasicBlocks (3, 4, 2, 3) at widths 56/88/88/224), PAFPN
                            to 56 channels on strides 8/16/32, per-stride heads of 3 conv-BN-ReLU
                            at 80 channels, 2 anchors; input (1, 3, H, W) with H, W dynamic, and
                            the nine outputs laid out as tests/data/face/scrfd_tiny.onnx
    <out>/w600k_r50.onnx    insightface's IResNet-50 (layers (3, 4, 14, 3), widths 64/128/256/512),
                            (1, 3, 112, 112) -> 512
    <out>/2d106det.onnx     a MobileNetV1-0.5-like regressor with PReLU, (1, 3, 192, 192) -> 212
    <out>/1k3d68.onnx       a ResNet-50-like regressor (bottlenecks (3, 4, 6, 3)),
                            (1, 3, 192, 192) -> 3309
    <out>/meanshape_68.txt  copy of data/face/meanshape_68.txt (the analyzer finds the repository's
                            copy by itself; this one is for installs without it)

Opset 11 and the operators of tools/golden/make_onnx_goldens.py (the executor's set). The
networks share their definitions with the tiny test networks (tools/golden/face_nets.py).
Weights are random, so the detector finds no faces: benchmarks/bench_face.cpp times the
stages separately and describes a forced face box.

What this script builds, against the real models' published figures (parameters after
BatchNorm folding, as in the ONNX files; GMACs = 1e9 multiply-adds of Conv and Gemm, the unit
SCRFD's and insightface's "GFLOPs" tables count):

    model       here: params / file   GMACs (input)            real: params / file       GFLOPs (input)
    det_10g      4.23 M / 16.9 MB    10.01 (640 x 480)        3.86 M (paper) / 16.9 MB   9.98 (640 x 480)
                                      8.54 (512 x 512, what the analyzer feeds)
    w600k_r50   43.59 M / 174 MB      6.31 (112 x 112)        43.6 M / 174 MB            ~6.3 (112 x 112)
    2d106det     1.19 M / 4.8 MB      0.11 (192 x 192)        ~1.2 M / 5.0 MB            not published
    1k3d68      30.26 M / 121 MB      3.01 (192 x 192)        ~35 M / 143 MB             not published

The real det_10g file holds more than the paper's 3.86 M (the keypoint branch; the file sizes
agree). 1k3d68's backbone is not published in a form this script could follow, so a ResNet-50
of the same order of size and compute stands in (about 15 % fewer parameters than the file
implies). The script prints its own counts.

    python3 tools/bench/make_random_buffalo.py --out /work/buffalo-random       # ~320 MB, under a minute
    DYNAMICID_BENCH_FACE_MODELS=/work/buffalo-random build/benchmarks/dynamicid_bench_face

Needs torch and onnx (onnxruntime, when installed, checks that each file runs).
"""
import argparse
import os
import pathlib
import shutil
import sys

import onnx
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools" / "golden"))
sys.dont_write_bytecode = True  # no __pycache__ in the repository
from face_nets import IResNet, randomise, scrfd_outputs  # noqa: E402


def conv_bn_relu(i, o, k=3, s=1, groups=1):
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(o), nn.ReLU())


# ---- det_10g: SCRFD-10G (ResNetV1e + PAFPN + SCRFD heads) --------------------------
class BasicBlock(nn.Module):
    def __init__(self, i, o, stride):
        super().__init__()
        self.conv1 = conv_bn_relu(i, o, 3, stride)
        self.conv2 = nn.Sequential(nn.Conv2d(o, o, 3, 1, 1, bias=False), nn.BatchNorm2d(o))
        self.down = None
        if stride != 1 or i != o:
            # ResNetV1e's average-pool downsampling: the 1x1 conv sees every pixel.
            pool = [nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False)] if stride != 1 else []
            self.down = nn.Sequential(*pool, nn.Conv2d(i, o, 1, 1, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.conv2(self.conv1(x)) + identity)


class SCRFD10G(nn.Module):
    def __init__(self, blocks=(3, 4, 2, 3), planes=(56, 88, 88, 224), base=56, neck=56, feat=80, stacked=3, anchors=2):
        super().__init__()
        self.stem = nn.Sequential(conv_bn_relu(3, base // 2, 3, 2), conv_bn_relu(base // 2, base // 2),
                                  conv_bn_relu(base // 2, base), nn.MaxPool2d(3, 2, 1))  # /4
        stages, i = [], base
        for k, (n, o) in enumerate(zip(blocks, planes)):
            stages.append(nn.Sequential(*[BasicBlock(i if b == 0 else o, o, 2 if (b == 0 and k > 0) else 1) for b in range(n)]))
            i = o
        self.stages = nn.ModuleList(stages)  # strides 4, 8, 16, 32
        used = planes[1:]  # PAFPN from stride 8
        self.lateral = nn.ModuleList([nn.Conv2d(c, neck, 1) for c in used])
        self.fpn = nn.ModuleList([nn.Conv2d(neck, neck, 3, 1, 1) for _ in used])
        self.downsample = nn.ModuleList([nn.Conv2d(neck, neck, 3, 2, 1) for _ in used[1:]])
        self.pafpn = nn.ModuleList([nn.Conv2d(neck, neck, 3, 1, 1) for _ in used[1:]])
        self.heads = nn.ModuleList()
        for _ in used:
            tower = [conv_bn_relu(neck if j == 0 else feat, feat) for j in range(stacked)]
            self.heads.append(nn.ModuleDict({
                "tower": nn.Sequential(*tower),
                "cls": nn.Conv2d(feat, anchors, 3, 1, 1),
                "reg": nn.Conv2d(feat, 4 * anchors, 3, 1, 1),
                "kps": nn.Conv2d(feat, 10 * anchors, 3, 1, 1)}))
        self.scales = nn.Parameter(torch.ones(len(used)))

    def forward(self, x):
        feats = []
        x = self.stem(x)
        for s in self.stages:
            x = s(x)
            feats.append(x)
        lat = [conv(f) for conv, f in zip(self.lateral, feats[1:])]
        for k in range(len(lat) - 1, 0, -1):
            lat[k - 1] = lat[k - 1] + F.interpolate(lat[k], scale_factor=2.0, mode="nearest")
        inter = [conv(v) for conv, v in zip(self.fpn, lat)]
        for k in range(len(inter) - 1):
            inter[k + 1] = inter[k + 1] + self.downsample[k](inter[k])
        outs = [inter[0]] + [conv(v) for conv, v in zip(self.pafpn, inter[1:])]
        return scrfd_outputs(self.heads, self.scales, outs)


# ---- 2d106det: MobileNetV1-0.5-like landmark regressor ------------------------------
class MobileLandmarks(nn.Module):
    def __init__(self, outputs=212, alpha=0.5, hidden=512):
        super().__init__()
        c = lambda n: int(n * alpha)
        def dw_sep(i, o, s):
            return nn.Sequential(nn.Conv2d(i, i, 3, s, 1, groups=i, bias=False), nn.BatchNorm2d(i), nn.PReLU(i),
                                 nn.Conv2d(i, o, 1, bias=False), nn.BatchNorm2d(o), nn.PReLU(o))
        plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]
        layers, i = [nn.Conv2d(3, c(32), 3, 2, 1, bias=False), nn.BatchNorm2d(c(32)), nn.PReLU(c(32))], c(32)
        for o, s in plan:
            layers.append(dw_sep(i, c(o), s))
            i = c(o)
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(i, hidden)
        self.fc2 = nn.Linear(hidden, outputs)

    def forward(self, x):
        x = torch.flatten(self.pool(self.body(x)), 1)
        return self.fc2(F.relu(self.fc1(x)))


# ---- 1k3d68: ResNet-50-like landmark regressor ---------------------------------------
class Bottleneck(nn.Module):
    def __init__(self, i, mid, stride):
        super().__init__()
        o = 4 * mid
        self.body = nn.Sequential(conv_bn_relu(i, mid, 1), conv_bn_relu(mid, mid, 3, stride),
                                  nn.Conv2d(mid, o, 1, bias=False), nn.BatchNorm2d(o))
        self.down = None if stride == 1 and i == o else nn.Sequential(nn.Conv2d(i, o, 1, stride, bias=False), nn.BatchNorm2d(o))

    def forward(self, x):
        return F.relu(self.body(x) + (x if self.down is None else self.down(x)))


class ResNetLandmarks(nn.Module):
    def __init__(self, outputs=3309, blocks=(3, 4, 6, 3)):
        super().__init__()
        layers, i = [conv_bn_relu(3, 64, 7, 2), nn.MaxPool2d(3, 2, 1)], 64
        for k, n in enumerate(blocks):
            mid = 64 << k
            for b in range(n):
                layers.append(Bottleneck(i, mid, 2 if (b == 0 and k > 0) else 1))
                i = 4 * mid
        self.body = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(i, outputs)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.body(x)), 1))


# ---- export and report ---------------------------------------------------------------
def gmacs(model, x):
    """Multiply-adds of the Conv and Linear layers for input x, in units of 1e9."""
    total = [0]

    def hook(m, inp, out):
        if isinstance(m, nn.Conv2d):
            total[0] += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total[0] += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return total[0] / 1e9


def export(model, x, path, outputs, dynamic=None):
    kw = dict(input_names=["input.1"], output_names=outputs, opset_version=11, do_constant_folding=True, dynamo=False)
    if dynamic:
        kw["dynamic_axes"] = dynamic
    torch.onnx.export(model, x, str(path), **kw)
    m = onnx.load(str(path))
    params = sum(int(torch.tensor(t.dims).prod()) if t.dims else 1 for t in m.graph.initializer)
    ops = sorted({n.op_type for n in m.graph.node})
    try:
        import numpy as np
        import onnxruntime as ort
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = sess.run(None, {"input.1": x.numpy()})
        finite = all(np.isfinite(o).all() for o in outs)
        checked = f"onnxruntime ok, outputs {[tuple(o.shape) for o in outs][:3]}{'...' if len(outs) > 3 else ''}, finite={finite}"
    except ImportError:
        checked = "onnxruntime not installed: not run"
    return params, ops, checked


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="/work/buffalo-random", help="folder for the model files (outside the repository)")
    out = pathlib.Path(ap.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    det = randomise(SCRFD10G(), 11)
    # A face-detector prior (sigmoid(-4.6) = 0.01) and small classifier weights: random
    # features then score far below 0.5, so decoding does not meet thousands of boxes.
    for h in det.heads:
        h["cls"].weight.mul_(0.01)
        h["cls"].bias.fill_(-4.6)
    rec = randomise(IResNet(layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), num_features=512, stem=64), 12)
    l2d = randomise(MobileLandmarks(), 13)
    l3d = randomise(ResNetLandmarks(), 14)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    jobs = [
        ("det_10g.onnx", det, (512, 512), names, {"input.1": {2: "h", 3: "w"}}, [(640, 480), (512, 512)]),
        ("w600k_r50.onnx", rec, (112, 112), ["embedding"], None, [(112, 112)]),
        ("2d106det.onnx", l2d, (192, 192), ["fc1"], None, [(192, 192)]),
        ("1k3d68.onnx", l3d, (192, 192), ["fc1"], None, [(192, 192)]),
    ]
    for file, model, (w, h), outputs, dynamic, flop_sizes in jobs:
        x = torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))
        params, ops, checked = export(model, x, out / file, outputs, dynamic)
        macs = ", ".join(f"{gmacs(model, torch.zeros(1, 3, fh, fw)):.2f} GMACs at {fw}x{fh}" for fw, fh in flop_sizes)
        size = os.path.getsize(out / file) / 1e6
        print(f"{file}: {params / 1e6:.2f} M parameters (ONNX initializers), {size:.1f} MB, {macs}")
        print(f"    operators: {' '.join(ops)}\n    {checked}")
    shutil.copyfile(ROOT / "data" / "face" / "meanshape_68.txt", out / "meanshape_68.txt")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
