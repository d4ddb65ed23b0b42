#!/usr/bin/env python3
"""Writes tests/data/face/landmark_raster.safetensors, the landmark-image case
read by tests/unit/face_prompt.cpp.

The released DynamicID code is not runnable here, so the raster is computed
from the rule it implements (shared reference, official-semantics.md section
3, "Landmark image"), written the way the released pipeline writes it: a
float32 (106, 2) insightface landmark array divided by the Python float
512/96, a uint8 96x96 canvas with 255 at [int(y), int(x)] for points strictly
inside (0, 96), then canvas / 127.5 - 1.

    input.points   (2, 106, 2) float32, (x, y) on the 512x512 detection image
    output.raster  (2, 1, 96, 96) float32 in {-1, 1}

Face 0 is a plausible face outline; face 1 mixes random points with edge
cases (0, 512, just inside each border, negative, NaN).

Usage (developer tool only; tests never run it):

    python3 tools/golden/make_landmark_raster_fixture.py [--out tests/data/face]
"""

import argparse
import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file


def raster(landmark):
    landmark = landmark / (512 / 96)
    canvas = np.zeros((96, 96), dtype=np.uint8)
    for x, y in landmark:
        if 0 < x < 96 and 0 < y < 96:
            canvas[int(y), int(x)] = 255
    return canvas / 127.5 - 1


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "tests" / "data" / "face"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(106)

    t = np.linspace(0, 2 * np.pi, 106, endpoint=False)
    face = np.stack([256 + 150 * np.cos(t) + rng.normal(0, 3, 106), 270 + 190 * np.sin(t) + rng.normal(0, 3, 106)], 1)
    face = face.astype(np.float32)

    mixed = rng.uniform(-40, 560, (106, 2)).astype(np.float32)
    edge = [(0.0, 100.0), (100.0, 0.0), (512.0, 100.0), (100.0, 512.0), (511.999, 511.999), (0.001, 0.001),
            (5.3333335, 5.3333335), (5.333333, 10.666667), (-0.5, 200.0), (200.0, -3.0), (np.nan, 50.0),
            (50.0, np.nan), (255.99998, 256.0), (1e-30, 300.0), (511.99997, 1.0)]
    mixed[: len(edge)] = np.array(edge, dtype=np.float32)

    points = np.stack([face, mixed])
    rasters = np.stack([raster(p) for p in points]).astype(np.float32)[:, None]
    save_file({"input.points": points, "output.raster": rasters}, str(out / "landmark_raster.safetensors"),
              metadata={"config": json.dumps({"module": "landmark_raster", "size": 96, "source_size": 512}),
                        "numpy": np.__version__})
    print(out / "landmark_raster.safetensors", int((rasters > 0).sum()), "lit pixels")


if __name__ == "__main__":
    main()
