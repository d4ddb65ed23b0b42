#!/usr/bin/env python3
"""Writes tests/data/tiny_train/: a six-picture dataset (two persons x three
32 x 32 pictures) and its JSON-lines manifest for the `dynamicid train` command
tests. The pictures are simple procedural faces; the 8-wide "ArcFace"
embeddings and the landmarks (tests/data/tiny_dynamicid/alice_106.txt,
shifted per picture) fit the tiny models of tests/data/tiny_dynamicid.

Usage: python3 tools/golden/make_tiny_train.py
"""
import json
import math
import pathlib

import numpy as np
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "tests/data/tiny_train"
PROMPTS = ["the expression is happy, the face is front view", "the expression is neutral, the face is slightly turned to the left",
           "the expression is surprised, the face is front view"]


def picture(person, view):
    y, x = np.mgrid[0:32, 0:32].astype(np.float32)
    cx, cy = 16 + 3 * (view - 1), 16
    face = ((x - cx) ** 2 / (9 + 2 * person) ** 2 + (y - cy) ** 2 / 11 ** 2) < 1
    img = np.zeros((32, 32, 3), np.float32)
    img[...] = [40 + 80 * person, 90, 160 - 60 * person]
    img[face] = [220 - 40 * person, 180 - 20 * person, 150]
    for ex in (cx - 4, cx + 4):
        img[(x - ex) ** 2 + (y - 13) ** 2 < 2.5] = [20, 20, 20]
    mouth = (abs(y - (21 + view)) < 1) & (abs(x - cx) < 4)
    img[mouth] = [150, 30, 30]
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    lmk = [float(v) for v in (ROOT / "tests/data/tiny_dynamicid/alice_106.txt").read_text().split()]
    lines = []
    for p in range(2):
        emb = [math.sin(1.3 * k + 2.1 * p) + 0.1 * p for k in range(8)]
        n = math.sqrt(sum(e * e for e in emb))
        for v in range(3):
            name = f"p{p}_{v}.png"
            picture(p, v).save(OUT / name)
            shifted = [round(c + (9.0 * v if k % 2 else -7.0 * v + 5.0 * p), 2) for k, c in enumerate(lmk)]
            lines.append(json.dumps({"person": f"p{p}", "image": name, "text": f"a photo of person {p}",
                                     "arcface": [round(e / n, 6) for e in emb], "landmarks": shifted,
                                     "face_prompt": PROMPTS[v]}))
    (OUT / "train.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
