#!/usr/bin/env python3
"""Goldens for the face front end (tests/data/face/).

Three random-weight networks shaped like insightface's buffalo_l models are
exported with torch.onnx and run with onnxruntime:

  iresnet_tiny.onnx   insightface's IResNet (IBasicBlock: BN-conv-BN-PReLU-conv-BN,
                      1x1 downsample, BN-dropout-flatten-fc-BN1d head), narrow and shallow
  scrfd_tiny.onnx     a SCRFD-style detector: strides 8/16/32, 2 anchors, an FPN with
                      nearest upsampling, grouped and depthwise convs, score/bbox/kps heads
  lmk106_tiny.onnx    a 2d106det-style landmark regressor (212 outputs)
  lmk3d68_tiny.onnx   a 1k3d68-style regressor (3309 outputs = 1103 x 3)

face_goldens.safetensors holds the inputs and onnxruntime's outputs, and the
geometry and post-processing references: skimage's SimilarityTransform (umeyama)
estimates, OpenCV warps and resizes, insightface's published SCRFD decoding and
NMS re-implemented in numpy, the 2d106/3d68 landmark mapping and the pose fit
(least-squares affine, P2sRt, matrix2angle). face_photo.png is the synthetic
photo the end-to-end references use. meanshape_68.txt (data/face/) is the 68-point
mean shape insightface ships (insightface/data/objects/meanshape_68.pkl).

Run: python3 tools/golden/make_onnx_goldens.py   (torch, onnx, onnxruntime,
scikit-image, opencv-python-headless, safetensors; insightface's wheel only for
the mean shape, via --meanshape PATH_TO_PKL).
"""
import argparse
import math
import os
import pickle
import sys

import cv2
import numpy as np
import onnxruntime as ort
import torch
from safetensors.numpy import save_file
from skimage.transform import SimilarityTransform

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # no __pycache__ in the repository
from face_nets import IResNet, LandmarkTiny, SCRFDTiny, randomise  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(ROOT, "tests", "data", "face")
ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float32)


def export(model, x, name, dynamic=None, outputs=None):
    path = os.path.join(OUT, name)
    kw = dict(input_names=["input.1"], opset_version=11, do_constant_folding=True, dynamo=False)
    if outputs:
        kw["output_names"] = outputs
    if dynamic:
        kw["dynamic_axes"] = dynamic
    torch.onnx.export(model, x, path, **kw)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess, path


# ---- insightface's published pre/post-processing, in numpy -----------------------
def similarity(src, dst):
    t = SimilarityTransform()
    t.estimate(src, dst)
    return t.params[0:2, :].astype(np.float64)


def letterbox(img, size):
    im_ratio = float(img.shape[0]) / img.shape[1]
    model_ratio = float(size[1]) / size[0]
    if im_ratio > model_ratio:
        new_h = size[1]
        new_w = int(new_h / im_ratio)
    else:
        new_w = size[0]
        new_h = int(new_w * im_ratio)
    det_scale = float(new_h) / img.shape[0]
    resized = cv2.resize(img, (new_w, new_h))
    canvas = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    canvas[:new_h, :new_w, :] = resized
    return canvas, det_scale, resized


def nms(dets, thresh):
    x1, y1, x2, y2, scores = dets[:, 0], dets[:, 1], dets[:, 2], dets[:, 3], dets[:, 4]
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = scores.argsort()[::-1]
    keep = []
    while order.size > 0:
        i = order[0]
        keep.append(i)
        xx1 = np.maximum(x1[i], x1[order[1:]])
        yy1 = np.maximum(y1[i], y1[order[1:]])
        xx2 = np.minimum(x2[i], x2[order[1:]])
        yy2 = np.minimum(y2[i], y2[order[1:]])
        w = np.maximum(0.0, xx2 - xx1 + 1)
        h = np.maximum(0.0, yy2 - yy1 + 1)
        inter = w * h
        ovr = inter / (areas[i] + areas[order[1:]] - inter)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def decode(outs, size, det_scale, thresh=0.5, nms_thresh=0.4):
    scores_l, boxes_l, kps_l = [], [], []
    for idx, stride in enumerate((8, 16, 32)):
        scores = outs[idx]
        bbox = outs[idx + 3] * stride
        kps = outs[idx + 6] * stride
        h, w = size[1] // stride, size[0] // stride
        centers = np.stack(np.mgrid[:h, :w][::-1], axis=-1).astype(np.float32)
        centers = (centers * stride).reshape((-1, 2))
        centers = np.stack([centers] * 2, axis=1).reshape((-1, 2))
        pos = np.where(scores >= thresh)[0]
        b = np.stack([centers[:, 0] - bbox[:, 0], centers[:, 1] - bbox[:, 1],
                      centers[:, 0] + bbox[:, 2], centers[:, 1] + bbox[:, 3]], axis=-1)
        k = np.stack([centers[:, i % 2] + kps[:, i] for i in range(10)], axis=-1).reshape((-1, 5, 2))
        scores_l.append(scores[pos])
        boxes_l.append(b[pos])
        kps_l.append(k[pos])
    scores = np.vstack(scores_l)
    order = scores.ravel().argsort()[::-1]
    boxes = np.vstack(boxes_l) / det_scale
    kpss = np.vstack(kps_l) / det_scale
    pre = np.hstack((boxes, scores)).astype(np.float32, copy=False)[order, :]
    keep = nms(pre, nms_thresh)
    return pre[keep, :], kpss[order, :, :][keep, :, :]


def landmark_transform(center, output_size, scale):
    t1 = SimilarityTransform(scale=scale)
    t2 = SimilarityTransform(translation=(-center[0] * scale, -center[1] * scale))
    t3 = SimilarityTransform(rotation=0.0)
    t4 = SimilarityTransform(translation=(output_size / 2, output_size / 2))
    return (t1 + t2 + t3 + t4).params[0:2]


def landmark_post(pred, M, count, input_size):
    pred = pred.reshape((-1, 3)) if pred.shape[0] >= 3000 else pred.reshape((-1, 2))
    if count < pred.shape[0]:
        pred = pred[count * -1:, :]
    pred = pred.copy()
    pred[:, 0:2] += 1
    pred[:, 0:2] *= input_size // 2
    if pred.shape[1] == 3:
        pred[:, 2] *= input_size // 2
    IM = cv2.invertAffineTransform(M)
    out = np.zeros_like(pred)
    out[:, 0:2] = (IM[:, 0:2] @ pred[:, 0:2].T).T + IM[:, 2]
    if pred.shape[1] == 3:
        out[:, 2] = pred[:, 2] * np.sqrt(IM[0][0] ** 2 + IM[0][1] ** 2)
    return out


def pose_of(mean68, pts):
    X = np.hstack((mean68, np.ones([mean68.shape[0], 1])))
    P = np.linalg.lstsq(X, pts, rcond=None)[0].T
    R1, R2 = P[0:1, :3], P[1:2, :3]
    r1, r2 = R1 / np.linalg.norm(R1), R2 / np.linalg.norm(R2)
    R = np.concatenate((r1, r2, np.cross(r1, r2)), 0)
    sy = math.sqrt(R[0, 0] ** 2 + R[1, 0] ** 2)
    if sy >= 1e-6:
        x, y, z = math.atan2(R[2, 1], R[2, 2]), math.atan2(-R[2, 0], sy), math.atan2(R[1, 0], R[0, 0])
    else:
        x, y, z = math.atan2(-R[1, 2], R[1, 1]), math.atan2(-R[2, 0], sy), 0.0
    return np.array([x, y, z]) * 180 / np.pi


def blob(img_rgb, mean, std):
    return ((img_rgb.astype(np.float32) - mean) / std).transpose(2, 0, 1)[None].copy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--meanshape", default=None, help="insightface/data/objects/meanshape_68.pkl")
    args = ap.parse_args()
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    rng = np.random.default_rng(1234)
    g = {}

    # Networks and onnxruntime outputs on random inputs.
    rec = randomise(IResNet(), 1)
    x = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    sess, _ = export(rec, x, "iresnet_tiny.onnx", outputs=["embedding"])

    det = randomise(SCRFDTiny(), 3)
    names = [f"{k}_{s}" for k in ("score", "bbox", "kps") for s in (8, 16, 32)]
    x = torch.randn(1, 3, 128, 96, generator=torch.Generator().manual_seed(4))
    det_sess, _ = export(det, x, "scrfd_tiny.onnx", dynamic={"input.1": {2: "h", 3: "w"}}, outputs=names)

    lmk = randomise(LandmarkTiny(212), 5)
    x = torch.randn(1, 3, 192, 192, generator=torch.Generator().manual_seed(6))
    lmk_sess, _ = export(lmk, x, "lmk106_tiny.onnx", outputs=["fc1"])

    l3d = randomise(LandmarkTiny(3309), 7)
    l3d_sess, _ = export(l3d, x, "lmk3d68_tiny.onnx", outputs=["fc1"])
    rec_sess = ort.InferenceSession(os.path.join(OUT, "iresnet_tiny.onnx"), providers=["CPUExecutionProvider"])

    # Geometry: umeyama similarity and OpenCV warps of a smooth image.
    src = ARCFACE_DST * 0.8 + np.array([30.0, 12.0], np.float32) + rng.normal(0, 2.0, (5, 2)).astype(np.float32)
    g["geo.kps"] = src.astype(np.float32)
    g["geo.M112"] = similarity(src, ARCFACE_DST)
    g["geo.M224"] = similarity(src, ARCFACE_DST * 2.0)
    def smooth_image(hgt, wid):
        yy, xx = np.mgrid[0:hgt, 0:wid]
        return np.clip(np.stack([128 + 100 * np.sin(xx / 17.0), 128 + 100 * np.cos(yy / 13.0),
                                 128 + 60 * np.sin((xx + yy) / 23.0)], -1), 0, 255).astype(np.uint8)
    smooth = smooth_image(120, 160)
    g["geo.image"] = smooth
    g["geo.warp112"] = cv2.warpAffine(smooth, g["geo.M112"], (112, 112), borderValue=0.0)
    g["geo.resize"] = cv2.resize(smooth, (100, 75))

    # Detection post-processing on a photo.
    photo = smooth_image(240, 300)
    photo[60:180, 90:210] = rng.integers(0, 255, (120, 120, 3), dtype=np.uint8)
    cv2.imwrite(os.path.join(OUT, "face_photo.png"), photo[:, :, ::-1])
    size = (128, 128)
    canvas, det_scale, _ = letterbox(photo, size)
    g["det.canvas"] = canvas
    g["det.det_scale"] = np.array([det_scale], np.float64)
    outs = det_sess.run(None, {"input.1": blob(canvas, 127.5, 128.0)})
    for n, o in zip(names, outs):
        g["post.raw." + n] = o
    dets, kpss = decode(outs, size, det_scale)
    g["post.dets"] = dets
    g["post.kps"] = kpss.astype(np.float32)

    # Recognition on the largest face, landmarks and pose.
    areas = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    best = int(np.argmax(areas))
    M = similarity(kpss[best], ARCFACE_DST)
    crop = cv2.warpAffine(photo, M, (112, 112), borderValue=0.0)
    g["e2e.best"] = np.array([best], np.int64)
    g["e2e.M"] = M
    g["e2e.crop"] = crop
    emb = rec_sess.run(None, {"input.1": blob(crop, 127.5, 127.5)})[0][0]
    g["e2e.embedding"] = emb
    bbox = dets[best, :4]
    w, h = bbox[2] - bbox[0], bbox[3] - bbox[1]
    center = ((bbox[2] + bbox[0]) / 2, (bbox[3] + bbox[1]) / 2)
    scale = 192 / (max(w, h) * 1.5)
    LM = landmark_transform(center, 192, scale)
    g["e2e.lmk_M"] = LM
    aimg = cv2.warpAffine(photo, LM, (192, 192), borderValue=0.0)
    g["e2e.lmk_crop"] = aimg
    pred = lmk_sess.run(None, {"input.1": blob(aimg, 127.5, 128.0)})[0][0]
    g["e2e.lmk_raw"] = pred
    g["e2e.lmk106"] = landmark_post(pred, LM, 106, 192).astype(np.float32)
    pred3 = l3d_sess.run(None, {"input.1": blob(aimg, 127.5, 128.0)})[0][0]
    g["e2e.l3d_raw"] = pred3
    l68 = landmark_post(pred3, LM, 68, 192)
    g["e2e.lmk68"] = l68.astype(np.float32)

    mean_path = os.path.join(ROOT, "data", "face", "meanshape_68.txt")
    if args.meanshape:
        with open(args.meanshape, "rb") as f:
            mean68 = np.asarray(pickle.load(f), np.float64)
        os.makedirs(os.path.dirname(mean_path), exist_ok=True)
        np.savetxt(mean_path, mean68, fmt="%.9g", header="insightface meanshape_68 (68 x 3)")
    mean68 = np.loadtxt(mean_path)
    g["pose.lmk68"] = l68.astype(np.float64)
    g["pose.angles"] = pose_of(mean68, l68.astype(np.float64))
    # A known rotation too: the mean shape turned by (10, -20, 5) degrees.
    a = np.deg2rad([10.0, -20.0, 5.0])
    Rx = np.array([[1, 0, 0], [0, np.cos(a[0]), -np.sin(a[0])], [0, np.sin(a[0]), np.cos(a[0])]])
    Ry = np.array([[np.cos(a[1]), 0, np.sin(a[1])], [0, 1, 0], [-np.sin(a[1]), 0, np.cos(a[1])]])
    Rz = np.array([[np.cos(a[2]), -np.sin(a[2]), 0], [np.sin(a[2]), np.cos(a[2]), 0], [0, 0, 1]])
    turned = (Rz @ Ry @ Rx @ mean68.T).T * 1.3 + np.array([5.0, -3.0, 2.0])
    g["pose.turned"] = turned
    g["pose.turned_angles"] = pose_of(mean68, turned)

    save_file({k: np.ascontiguousarray(v) for k, v in g.items()}, os.path.join(OUT, "face_goldens.safetensors"))
    for f in sorted(os.listdir(OUT)):
        print(f, os.path.getsize(os.path.join(OUT, f)))


if __name__ == "__main__":
    main()
