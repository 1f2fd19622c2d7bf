#!/usr/bin/env python
"""Dice of a `vista3d infer` label map of TotalSegmentator's example CT against its reference segmentation.

    python models/eval_demo.py --data "$VISTA3D_DATA" --pred target/demo_infer/example_ct_sm/example_ct_sm_trans.nii.gz

Classes: liver (VISTA3D 1 <-> TotalSegmentator 5) and spleen (VISTA3D 3 <-> TotalSegmentator 1). Prints the Dice on
the whole volume and on the held-out slab z 10-19 (the demo model's validation slab; z 0-9 and 20-29 were trained on).
"""

import argparse
import os

import nibabel as nib
import numpy as np

CLASSES = {"liver": (1, 5), "spleen": (3, 1)}  # name: (VISTA3D id, TotalSegmentator id)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float("nan") if b.sum() == 0 else 2.0 * float((a & b).sum()) / float(s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--pred", required=True)
    args = ap.parse_args()
    ref = np.asanyarray(nib.load(os.path.join(args.data, "totalsegmentator", "example_seg.nii.gz")).dataobj)
    pred = np.asanyarray(nib.load(args.pred).dataobj)
    assert pred.shape == ref.shape, (pred.shape, ref.shape)
    for region, sl in [("whole volume", np.s_[:, :, :]), ("held-out slab z 10-19", np.s_[:, :, 10:20])]:
        scores = {n: dice(pred[sl] == v, ref[sl] == t) for n, (v, t) in CLASSES.items()}
        mean = float(np.nanmean(list(scores.values())))
        print(f"{region}: " + ", ".join(f"{n} {d:.4f}" for n, d in scores.items()) + f", mean {mean:.4f}")


if __name__ == "__main__":
    main()
