"""Random-weight networks shaped like insightface's buffalo_l models, shared by
tools/golden/make_onnx_goldens.py (tiny versions for the goldens) and
tools/bench/make_random_buffalo.py (full-size versions for timing).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class IBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        if self.downsample is not None:
            identity = self.downsample(x)
        return out + identity


class IResNet(nn.Module):
    """insightface's IResNet; the defaults are the tiny test network, w600k_r50 is
    IResNet(layers=(3, 4, 14, 3), widths=(64, 128, 256, 512), num_features=512, stem=64)."""

    def __init__(self, layers=(1, 1, 1, 1), widths=(8, 16, 16, 8), num_features=128, stem=8):
        super().__init__()
        self.inplanes = stem
        self.conv1 = nn.Conv2d(3, self.inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes, eps=1e-05)
        self.prelu = nn.PReLU(self.inplanes)
        self.layer1 = self._make_layer(widths[0], layers[0], 2)
        self.layer2 = self._make_layer(widths[1], layers[1], 2)
        self.layer3 = self._make_layer(widths[2], layers[2], 2)
        self.layer4 = self._make_layer(widths[3], layers[3], 2)
        self.bn2 = nn.BatchNorm2d(widths[3], eps=1e-05)
        self.dropout = nn.Dropout(p=0.0)
        self.fc = nn.Linear(widths[3] * 7 * 7, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)

    def _make_layer(self, planes, blocks, stride):
        down = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, down)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x))
        return self.features(self.fc(torch.flatten(x, 1)))


def scrfd_outputs(heads, scales, levels):
    """The nine outputs in insightface's SCRFD export order (scores of strides 8,
    16, 32, then distances, then keypoints), each (H/s * W/s * anchors, n):
    what include/dynamicid/face/detection.hpp decodes."""
    scores, boxes, kpss = [], [], []
    for k, p in enumerate(levels):
        h = heads[k]
        t = h["tower"](p)
        scores.append(torch.sigmoid(h["cls"](t)).permute(0, 2, 3, 1).reshape(-1, 1))
        boxes.append((h["reg"](t) * scales[k]).permute(0, 2, 3, 1).reshape(-1, 4).abs())
        kpss.append(h["kps"](t).permute(0, 2, 3, 1).reshape(-1, 10))
    return (*scores, *boxes, *kpss)


class SCRFDTiny(nn.Module):
    """Backbone to strides 8/16/32, top-down FPN, shared-structure heads with 2 anchors."""

    def __init__(self, c=8):
        super().__init__()
        def block(i, o, s, g=1):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1, groups=g, bias=False), nn.BatchNorm2d(o), nn.ReLU())
        self.stem = nn.Sequential(block(3, c, 2), nn.MaxPool2d(2, 2))                      # /4
        self.s8 = nn.Sequential(block(c, c, 2, g=c), block(c, 2 * c, 1))                  # /8 depthwise + conv
        self.s16 = nn.Sequential(block(2 * c, 2 * c, 2, g=2), block(2 * c, 2 * c, 1))     # /16 grouped
        self.s32 = nn.Sequential(block(2 * c, 2 * c, 2), block(2 * c, 2 * c, 1, g=2 * c))
        self.lat = nn.ModuleList([nn.Conv2d(2 * c, c, 1) for _ in range(3)])
        self.heads = nn.ModuleList()
        for _ in range(3):
            self.heads.append(nn.ModuleDict({
                "tower": nn.Sequential(nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.LeakyReLU(0.1)),
                "cls": nn.Conv2d(c, 2, 3, 1, 1),
                "reg": nn.Conv2d(c, 8, 3, 1, 1),
                "kps": nn.Conv2d(c, 20, 3, 1, 1)}))
        self.scales = nn.Parameter(torch.tensor([1.0, 1.2, 0.8]))

    def forward(self, x):
        f8 = self.s8(self.stem(x))
        f16 = self.s16(f8)
        f32 = self.s32(f16)
        p32 = self.lat[2](f32)
        p16 = self.lat[1](f16) + F.interpolate(p32, scale_factor=2.0, mode="nearest")
        p8 = self.lat[0](f8) + F.interpolate(p16, scale_factor=2.0, mode="nearest")
        return scrfd_outputs(self.heads, self.scales, (p8, p16, p32))


class LandmarkTiny(nn.Module):
    def __init__(self, outputs, c=8, features=16):
        super().__init__()
        layers, i = [], 3
        for o in (c, 2 * c, 2 * c, 2 * c):
            layers += [nn.Conv2d(i, o, 3, 2, 1, bias=False), nn.BatchNorm2d(o), nn.PReLU(o)]
            i = o
        self.body = nn.Sequential(*layers, nn.Conv2d(i, i, 3, 1, 1, groups=i), nn.AvgPool2d(2, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(i, features)
        self.fc2 = nn.Linear(features, outputs)

    def forward(self, x):
        x = torch.flatten(self.pool(self.body(x)), 1)
        return self.fc2(torch.sigmoid(self.fc1(x))) * 0.5


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            elif isinstance(m, nn.PReLU):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.3)
    return model.eval()
