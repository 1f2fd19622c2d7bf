#!/usr/bin/env python
"""Synthetic abdominal phantoms for the demo model (models/README.md): CT-like volumes with two organs.

    python models/prep_phantoms.py --out target/demo_phantoms

Each volume (48 x 48 x 32 voxels, 3 mm, RAS, int16 HU): air (-1000) around an elliptic body of fat (-100 HU)
with a muscle wall (50 HU), a "liver" ellipsoid (local id 1, 120 HU) and a "spleen" ellipsoid (local id 2, 160 HU)
at random positions and sizes, Gaussian noise (sd 20 HU) and a light smoothing. Six volumes from seeds 0-5:
0-3 training (fold 1), 4-5 validation (fold 0). Writes `datalist.json` next to them.
"""

import argparse
import json
import os

import nibabel as nib
import numpy as np

SHAPE = (48, 48, 32)
SPACING = 3.0


def ellipsoid(grid, centre, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) < 1.0


def phantom(seed: int):
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in SHAPE], indexing="ij")
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    label = np.zeros(SHAPE, dtype=np.uint8)
    body_c = (23.5 + rng.uniform(-2, 2), 23.5 + rng.uniform(-2, 2), 15.5)
    body = ellipsoid(grid[:2], body_c[:2], (21 + rng.uniform(-2, 1), 17 + rng.uniform(-2, 1)))
    inner = ellipsoid(grid[:2], body_c[:2], (18, 14))
    hu[body] = 50.0  # muscle wall
    hu[inner] = -100.0  # fat
    # liver on the patient's right (low x in RAS), spleen on the left
    liver_c = (body_c[0] - 7 + rng.uniform(-2, 2), body_c[1] + rng.uniform(-3, 3), 15.5 + rng.uniform(-4, 4))
    liver_r = (7 + rng.uniform(-1, 2), 8 + rng.uniform(-1, 2), 9 + rng.uniform(-2, 3))
    spleen_c = (body_c[0] + 9 + rng.uniform(-2, 2), body_c[1] + 3 + rng.uniform(-3, 3), 15.5 + rng.uniform(-4, 4))
    spleen_r = (3.5 + rng.uniform(-0.5, 1), 4.5 + rng.uniform(-1, 1), 6 + rng.uniform(-1, 2))
    liver = ellipsoid(grid, liver_c, liver_r) & inner
    spleen = ellipsoid(grid, spleen_c, spleen_r) & inner & ~liver
    hu[liver] = 120.0
    hu[spleen] = 160.0
    label[liver] = 1
    label[spleen] = 2
    hu += rng.normal(0, 20, SHAPE).astype(np.float32)
    # light 3-point smoothing along each axis (partial-volume look)
    for a in range(3):
        hu = (np.roll(hu, 1, a) + 2 * hu + np.roll(hu, -1, a)) / 4
    return np.round(hu).astype(np.int16), label


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    affine = np.diag([SPACING, SPACING, SPACING, 1.0])
    items = []
    for seed in range(6):
        hu, label = phantom(seed)
        img, lab = f"phantom_{seed}_ct.nii.gz", f"phantom_{seed}_seg.nii.gz"
        nib.save(nib.Nifti1Image(hu, affine), os.path.join(args.out, img))
        nib.save(nib.Nifti1Image(label, affine), os.path.join(args.out, lab))
        fold = 0 if seed >= 4 else 1
        items.append({"image": img, "label": lab, "fold": fold})
        print(f"phantom {seed}: fold {fold}, liver {int((label == 1).sum())} voxels, spleen {int((label == 2).sum())}")
    with open(os.path.join(args.out, "datalist.json"), "w") as f:
        json.dump({"training": items}, f, indent=1)


if __name__ == "__main__":
    main()
